"""The demo over seeds and intra-op thread counts: does CCS beat two-stream on every
floating-point trajectory? (SPEC §8, the accuracy target on the embedded data set.)

``python -m bench.demo_sweep`` runs ``ccs-fast demo`` (the default ``baseline`` and ``all``)
for seeds 0–4 with 1 and with 2 intra-op threads per variant, then ``cb`` and ``cs`` for seeds 0
and 1, checks every figure against the thresholds (``all``/``cb`` RGB+Flow ≥ 0.95;
``baseline``/``cs`` within chance + 0.15 on RGB, Flow and RGB+Flow), appends one row per run
to ``bench/results/demo-sweep-<cpu>.json`` (device, versions, date, command, the load average
before and after each run) and prints the table the README shows. Each seed's data set is
written once (``--work``/data<seed>) and shared by its runs; the variants of a run train
side by side (``demo --threads 1``: one process per core) or one after the other
(``--threads 2`` on two cores). Exit status 1 when any run misses a threshold.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from bench.common import append_rows, bench_parser, env_info, result_path

ABOVE_CHANCE = 0.15  # baseline and cs: every stream within chance + this
CCS_MIN = 0.95  # all and cb: RGB+Flow top-1 at least this


def parse_list(text: str) -> list[int]:
    """``"0-4"`` or ``"0,2,3"`` -> [0, 1, 2, 3, 4] / [0, 2, 3]."""
    values = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        values += range(int(low), int(high or low) + 1)
    return values


def verdict(variant: str, result: dict, chance: float) -> bool:
    """Whether one variant's figures meet the target of its kind."""
    if variant in ("all", "cb"):
        return result["fused"] >= CCS_MIN
    return all(result[stream] <= chance + ABOVE_CHANCE for stream in ("rgb", "flow", "fused"))


def load() -> float:
    return round(os.getloadavg()[0], 2)


def run(seed: int, threads: int | None, variants: tuple, work: Path, env: dict) -> list[dict]:
    from ccs_fast.demo import run_demo

    name = f"s{seed}-" + (f"t{threads}" if threads else "default") + "-" + "-".join(variants)
    before = load()
    report = run_demo(work / name, seed=seed, variants=variants, threads=threads,
                      data_dir=work / f"data{seed}", pictures=False)
    rows = []
    for variant in variants:
        figures = report["variants"][variant]
        rows.append({**env, "seed": seed, "threads": report["threads"], "variant": variant,
                     "plan": report["plan"], **{k: round(v, 4) for k, v in figures.items()},
                     "chance": report["chance"], "pass": verdict(variant, figures, report["chance"]),
                     "variant_s": round(report["variant_wall_s"][variant], 1),
                     "demo_s": round(report["wall_s"], 1), "synth_s": round(report["timings_s"]["synth_s"], 1),
                     "load_before": before, "load_after": load()})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| seed | threads | variant | RGB | Flow | RGB+Flow | pass | variant s | demo s (synth s) | load before/after |",
             "|---:|---:|---|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['threads']} | `{r['variant']}` | {r['rgb']:.3f} | {r['flow']:.3f} | "
                     f"{r['fused']:.3f} | {'yes' if r['pass'] else '**no**'} | {r['variant_s']:.0f} | "
                     f"{r['demo_s']:.0f} ({r['synth_s']:.0f}) | {r['load_before']:.1f} / {r['load_after']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = bench_parser(__doc__, results=False)
    parser.add_argument("--seeds", default="0-4", help="seeds of the baseline/all runs (default 0-4)")
    parser.add_argument("--threads", default="1,2", help="intra-op threads per variant (default 1,2)")
    parser.add_argument("--extra-seeds", default="0,1", help="seeds of the cb/cs runs (default 0,1; '' for none)")
    parser.add_argument("--work", default="runs/demo-sweep", help="run folders and data sets (default runs/demo-sweep)")
    parser.add_argument("--no-save", action="store_true", help="do not append rows to bench/results")
    args = parser.parse_args(argv)
    work = Path(args.work)
    env = env_info("cpu")
    start = time.perf_counter()
    rows = []
    jobs = [(seed, threads, ("baseline", "all")) for seed in parse_list(args.seeds)
            for threads in parse_list(args.threads)]
    if args.extra_seeds:
        jobs += [(seed, None, ("cb", "cs")) for seed in parse_list(args.extra_seeds)]
    for seed, threads, variants in jobs:
        new = run(seed, threads, variants, work, env)
        rows += new
        if not args.no_save:
            append_rows(result_path("demo-sweep", "cpu"), new)
        print(table(rows), flush=True)
    failed = [r for r in rows if not r["pass"]]
    print(f"[sweep] {len(rows)} variant runs in {time.perf_counter() - start:.0f} s, "
          f"{len(failed)} below target", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
