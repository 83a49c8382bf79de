"""The summary ``<out>/gpu-summary-<device>.md``: the stages, the §8 targets, every kernel row with
its fraction of the datasheet peak, loader, end-to-end and flow figures; rewritten after every stage."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.gpu.plan import DRY_TOTAL_BUDGET_S, TOTAL_BUDGET_S, Points
from bench.gpu.runner import Run, StageResult, repo_relative
from bench.gpu.targets import NOT_TAKEN, device_peak, evaluate_targets, flow_targets, loss_min_bytes


def new_rows(out: Path, start_counts: dict[str, int], prefix: str) -> list[dict]:
    """Rows appended during this run to ``<out>/<prefix>-*.json``."""
    rows = []
    for path in sorted(out.glob(f"{prefix}-*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        rows += data[start_counts.get(path.name, 0):]
    return rows


def _fmt(v, digits=3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def kernel_rows(rows_attention: list[dict], rows_losses: list[dict], peak) -> list[dict]:
    """One line per kernel benchmark row: TFLOP/s (attention, useful FLOPs) or GB/s (losses,
    minimal bytes), and the fraction of the datasheet peak (half-precision rows only for TFLOP/s)."""
    lines = []
    for r in rows_attention:
        pct = None
        if peak and r["dtype"] in ("bfloat16", "float16"):
            pct = 100 * r["tflops"] / peak[0]
        lines.append(dict(op=r["op"], provider=r["provider"], mode=r["mode"], dtype=r["dtype"],
                          shape=f"B={r['B']} N_f={r['N_f']} N_o={r['N_o']} d={r['d']} e={r['e']}",
                          ms=r["ms_p50"], tflops=r["tflops"], gbps=None, pct=pct,
                          pct_matmul=r.get("pct_peak"), mem=r.get("peak_mem_bytes")))
    for r in rows_losses:
        gbps = loss_min_bytes(r["op"], r["mode"], r["B"], r["D"], r["dtype"]) / (r["ms_p50"] * 1e-3) / 1e9
        lines.append(dict(op=r["op"], provider=r["provider"], mode=r["mode"], dtype=r["dtype"],
                          shape=f"B={r['B']} D={r['D']}", ms=r["ms_p50"], tflops=None, gbps=gbps,
                          pct=100 * gbps / peak[1] if peak else None, pct_matmul=None,
                          mem=r.get("peak_mem_bytes")))
    return lines


def write_summary(run: Run, results: list[StageResult], points: Points, start_counts: dict[str, int],
                  env: dict, wall_s: float, path: Path, not_run: list[str] = ()) -> str:
    """The summary of every stage run so far (``not_run``: the plan's stages still to come, listed
    as such: a run cut off after any stage leaves the figures it took). Written atomically."""
    peak = device_peak(env["device"])
    rows = {name: new_rows(run.out, start_counts, name) for name in ("cross_attention", "losses", "loader", "e2e",
                                                                      "flow")}
    lines = [*_header(run, env, wall_s, peak), *_stage_table(results, not_run), *_stage_notes(run, results),
             *_target_table(points, rows, peak), *_kernel_table(rows["cross_attention"], rows["losses"], peak),
             *_loader_table(rows["loader"], rows["e2e"]), *_flow_table(rows["flow"])]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return text


def _header(run: Run, env: dict, wall_s: float, peak) -> list[str]:
    lines = [f"# GPU figures: {env['device']}" + (" (dry run: toy sizes on CPU)" if run.dry_run else ""), ""]
    lines.append(f"`{env['command']}` on {env['date']}: torch {env['torch']}, triton {env['triton']}, "
                 f"Python {sys.version.split()[0]}; {wall_s:.0f} s of wall time (budget "
                 f"{(DRY_TOTAL_BUDGET_S if run.dry_run else TOTAL_BUDGET_S) * run.stretch:.0f} s"
                 + (f", every budget stretched ×{run.stretch:.2f} for the machine's load" if run.stretch > 1 else "")
                 + f"). Rows appended to `{repo_relative(run.out)}`; "
                 f"logs in `{repo_relative(run.logs)}`.")
    if run.dry_run:
        lines += ["", "Dry run: the kernels ran in the Triton interpreter at toy sizes, so the figures and the "
                  "pass/fail column below say nothing about speed; they show that every stage ran."]
    if peak:
        lines += ["", f"Datasheet peak used for the fractions: {peak[0]:.0f} TFLOP/s dense bf16, "
                  f"{peak[1] / 1e3:.2f} TB/s HBM."]
    return lines


def _stage_table(results: list[StageResult], not_run) -> list[str]:
    lines = ["", "## Stages", "", "| stage | status | wall s | budget s | rows appended | notes |", "|---|---|---|---|---|---|"]
    for r in results:
        rows = ", ".join(f"{n} {name}" for name, n in r.rows.items()) or "—"
        note = r.note
        if r.tests:
            t = r.tests
            note = (f"{t['passed']} passed, {t['failed']} failed, {t['error']} errors, {t['skipped']} skipped"
                    + (f", {t['collected']} collected" if "collected" in t else "") + (f"; {note}" if note else ""))
        if r.rc not in (None, 0):
            note = f"exit status {r.rc}" + (f"; {note}" if note else "")
        lines.append(f"| `{r.name}` | {r.status} | {r.wall_s:.0f} | {r.budget_s:.0f} | {rows} | {note} |")
    for name in not_run:
        lines.append(f"| `{name}` | not run yet | | | — | the run had not reached it when this summary was written |")
    return lines


def _stage_notes(run: Run, results: list[StageResult]) -> list[str]:
    """What was not measured for a missing package, what the kit installed, the failing tests."""
    lines = []
    missing = [f"`{r.name}`: {why}" for r in results for why in r.skipped]
    missing += [f"`{r.name}`: {r.note}" for r in results if r.status == "skipped" and "needs" in r.note]
    if missing:
        lines += ["", "Not measured for a missing package (`make gpu-kit` carries it; README, \"Taking the GPU "
                  "figures\"):", ""] + [f"- {m}" for m in missing]
    if run.kit:
        lines += ["", "Kit (`--kit`):", ""] + [f"- {line}" for line in run.kit.get("lines", [])]
    failing = [f for r in results if r.tests for f in r.tests["failing"]]
    if failing:
        lines += ["", "Failing tests:", ""] + [f"- `{f}`" for f in failing]
    return lines


def _target_table(points: Points, rows: dict[str, list[dict]], peak) -> list[str]:
    lines = ["", "## SPEC §8 targets", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in evaluate_targets(points, rows["cross_attention"], rows["losses"],
                                                                    rows["loader"], rows["e2e"], peak)]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in flow_targets(rows["flow"])]
    lines += [f"| {t} | not taken by `make gpu`: {why} | — |" for t, why in NOT_TAKEN]
    return lines


def _kernel_table(attention: list[dict], losses: list[dict], peak) -> list[str]:
    table = kernel_rows(attention, losses, peak)
    if not table:
        return []
    lines = ["", "## Kernel rows", "",
             "TFLOP/s from the useful FLOPs (attention); GB/s from the minimal bytes, inputs read and outputs "
             "written once (losses); % of the datasheet peak (bf16/fp16 rows for TFLOP/s); % of a measured "
             "dense matmul where the benchmark took one.", "",
             "| op | provider | mode | dtype | shape | ms (p50) | TFLOP/s | GB/s | % of peak | % of matmul | peak extra MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in table:
        mem = None if k["mem"] is None else k["mem"] / 2**20
        lines.append(f"| {k['op']} | {k['provider']} | {k['mode']} | {k['dtype']} | {k['shape']} | {_fmt(k['ms'])} "
                     f"| {_fmt(k['tflops'])} | {_fmt(k['gbps'])} | {_fmt(k['pct'])} | {_fmt(k['pct_matmul'])} "
                     f"| {_fmt(mem)} |")
    return lines


def _loader_table(loader: list[dict], e2e: list[dict]) -> list[str]:
    if not (loader or e2e):
        return []
    lines = ["", "## Loader and end to end", "", "| benchmark | case | clips/s |", "|---|---|---|"]
    lines += [f"| loader | {r['backend']} ({r['device']}) | {_fmt(r['clips_per_s'])} |" for r in loader]
    lines += [f"| e2e | {r['case']} ({r['backbone']}, {r['input_size']} px, batch {r['batch_size']}) "
              f"| {_fmt(r['clips_per_s'])} |" for r in e2e if "clips_per_s" in r]
    return lines


def _flow_table(flow: list[dict]) -> list[str]:
    speed = [r for r in flow if r.get("kind") == "speed"]
    if not speed:
        return []
    lines = ["", "## Optical flow", "", "| provider | device | frame | batch | pairs | pairs/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['provider']} | {r['flow_device']} | {r['width']}×{r['height']} | {r.get('batch') or '—'} "
              f"| {r['pairs']} | {_fmt(r['pairs_per_s'])} |" for r in speed]
    return lines
