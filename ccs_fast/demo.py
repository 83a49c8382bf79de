"""``ccs-fast demo``: the main job on the embedded default data set (SPEC §6, §8).

Writes the data set (or reuses one already written for the same seed), trains the variants
(``--variants``, default ``baseline`` and ``all``; ``baseline,cb,cs,all`` for the paper's
Table 3) with the packaged ``demo`` config, evaluates each on the test split (the config's
5 segments, centre crop) and writes ``report.json`` and ``report.md`` with the Table 3 layout
(RGB, Flow, RGB+Flow top-1, seed, wall time per variant): ``all`` reaches high RGB+Flow
accuracy while ``baseline`` stays near chance, because the class is a Latin square of
appearance and motion.

Where it runs (``distributed.plan_cpu``): on a CPU the variants train side by side, one
process with one intra-op thread each (and loading in that process), as many at once as there
are cores available to the demo (CPU affinity and cgroup quota, not the machine's core count);
``threads`` (``--threads``, or ``OMP_NUM_THREADS``) gives each variant more threads and runs
fewer at once. On a GPU they train one after the other. One line per variant and epoch
(prefixed ``[<variant>]``, with the loss and the variant's ETA), one per evaluation, and a
closing line with each variant's top-1 and the path of report.md.

Pictures beside report.md (with matplotlib, the ``[viz]`` extra; without it the demo runs and
says they were skipped): ``training_curves.png`` (loss and the training batches' top-1 per
epoch of every variant, and the test top-1 of the evaluation at the end),
``<variant>/confusion.png``, and for the last variant trained with a connection block (``all``
by default) ``cams/`` (class activation maps per stream, paper Fig. 6) and ``attention/``
(the block's attention) for ``PICTURE_VIDEOS`` test videos.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from ccs_fast.base.atomic import write_text
from ccs_fast.config import VARIANTS, Config, read_config
from ccs_fast.base.distributed import CpuPlan
from ccs_fast.base.errors import CCSError
from ccs_fast.evaluate import protocol
from ccs_fast.base.signals import end_with_parent
from ccs_fast.metrics import format_duration

DEMO_VARIANTS = ("baseline", "all")
PICTURE_VIDEOS = 3


def parse_variants(text: str) -> tuple[str, ...]:
    """``"baseline,cb,cs,all"`` → the variants in that order; CCSError on an unknown name."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        raise CCSError(f"--variants {text!r}: expected a comma-separated list of {', '.join(VARIANTS)}")
    return names


def demo_config(data_dir: Path, out_dir: Path, variant: str, seed: int, workers: int | None) -> Config:
    """The packaged ``demo`` config of one variant, not validated yet (``_variant_configs``
    validates each variant's config once it is complete)."""
    packaged = Path(__file__).parent / "configs" / "demo.yaml"
    cfg = read_config(packaged)
    cfg.model.variant = variant
    cfg.train.seed = seed
    cfg.train.out_dir = str(out_dir / variant)
    cfg.data.root = str(data_dir / "rawframes")
    cfg.data.train_list = str(data_dir / "annotations" / "train_rawframes.txt")
    cfg.data.val_list = str(data_dir / "annotations" / "val_rawframes.txt")
    if workers is not None:
        cfg.data.num_workers = workers
    return cfg


def ensure_dataset(data_dir: Path, seed: int, workers: int | None, **sizes) -> dict:
    """Write the embedded data set; a complete one already there is kept (synth resumes)."""
    from ccs_fast.dataloader.synth import make_synthetic_dataset

    return make_synthetic_dataset(data_dir, seed=seed, workers=workers, progress=True, **sizes)


def format_report(report: dict) -> str:
    """report.md: the paper's Table 3 layout of the variants, then the pictures."""
    from ccs_fast.paper_table import table3_markdown

    lines = [
        "# ccs-fast demo: embedded Latin-square data set",
        "",
        f"Classes: {report['classes']} (chance {report['chance']:.3f}); test videos: {report['test_videos']}; "
        f"seed {report['seed']}; wall time {report['wall_s']:.0f} s. Test protocol: "
        f"{report.get('protocol', '25 segments, centre crop')}.",
        "",
        table3_markdown(report["variants"], seed=report["seed"], wall_times=report.get("variant_wall_s"),
                        title="Top-1 per variant (paper Table 3 layout), percent").rstrip("\n"),
        "",
    ]
    pictures = report.get("pictures") or {}
    if pictures.get("skipped"):
        lines += [f"Pictures skipped: {pictures['skipped']}.", ""]
    elif pictures:
        lines += ["## Pictures", ""]
        if pictures.get("training_curves"):
            lines += ["Training loss and top-1 per epoch of each variant (dash-dot: the training batches; "
                      "markers: the test split, evaluated at the end):", "",
                      f"![training curves]({pictures['training_curves']})", ""]
        for variant, path in (pictures.get("confusion") or {}).items():
            lines += [f"Confusion matrix of `{variant}` (RGB+Flow, test split; rows: true class):", "",
                      f"![confusion {variant}]({path})", ""]
        if pictures.get("cams"):
            lines += [f"Class activation maps of `{pictures['picture_variant']}` per stream for the true class, "
                      "middle segment (paper Fig. 6):", ""]
            lines += [f"![CAM]({path})" for path in pictures["cams"]] + [""]
        if pictures.get("attention"):
            lines += [f"Connection-block attention of `{pictures['picture_variant']}`: row softmax of the centre "
                      "RGB position over the flow positions (left) and column softmax of the centre flow "
                      "position over the RGB positions (right), on the middle segment:", ""]
            lines += [f"![attention]({path})" for path in pictures["attention"]] + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _pictures(out: Path, cfgs: dict, results: dict, data: dict, variants, device) -> dict:
    """Write the demo's pictures; paths relative to ``out`` (report.md's folder)."""
    from ccs_fast.evaluate import load_model
    from ccs_fast.pictures import (confusion_title, picture_loader, video_names, write_attention, write_cams,
                                   write_confusion)
    from ccs_fast.viz import matplotlib_available, plot_training_curves

    if not matplotlib_available():
        return {"skipped": "matplotlib is not installed (pip install 'ccs_fast[viz]'; make demo installs it)"}
    pictures = {}
    curves = {v: Path(cfgs[v].train.out_dir) / "metrics.jsonl" for v in variants}
    pictures["training_curves"] = str(plot_training_curves(curves, out / "training_curves.png").relative_to(out))
    names = data.get("class_names")
    pictures["confusion"] = {
        v: str(write_confusion(results[v], Path(cfgs[v].train.out_dir) / "confusion.png", names,
                               title=f"variant {v}: {confusion_title(results[v])}").relative_to(out))
        for v in variants}
    with_block = [v for v in variants if v in ("cb", "all")]
    chosen = "all" if "all" in with_block else (with_block[-1] if with_block else variants[-1])
    cfg = cfgs[chosen]
    model = load_model(cfg, Path(cfg.train.out_dir) / "last.pt", device)
    pictures["picture_variant"] = chosen
    kwargs = dict(device=device, precision=cfg.train.precision, class_names=names, videos=video_names(cfg))
    pictures["cams"] = [str(p.relative_to(out)) for p in
                        write_cams(model, picture_loader(cfg, device), PICTURE_VIDEOS, out / "cams",
                                   fusion_weights=cfg.model.fusion_weights, **kwargs)]
    if with_block:
        pictures["attention"] = [str(p.relative_to(out)) for p in write_attention(
            model, picture_loader(cfg, device), PICTURE_VIDEOS, out / "attention", **kwargs)]
    return pictures


class _LinePrefix:
    """A text stream that writes whole lines, each with ``prefix``: the lines of variants
    trained in parallel processes stay whole and say whose they are."""

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self.pending = stream, prefix, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        if lines:
            self.stream.write("".join(f"{self.prefix}{line}\n" for line in lines))
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def _steps_per_epoch(cfg: Config) -> int:
    with open(cfg.data.train_list) as lines:
        videos = sum(1 for line in lines if line.strip())
    return max(1, videos // cfg.data.batch_size)


def train_variant(cfg: Config, threads: Optional[int] = None, prefix: Optional[str] = None) -> dict:
    """Train and evaluate one variant of the demo (in this process or in a worker of
    ``run_demo``'s pool): ``threads`` intra-op threads; every printed line starts with
    ``prefix``. Returns the evaluation result without the model, plus ``train_s`` and ``eval_s``."""
    import torch

    from ccs_fast.evaluate import describe_evaluation
    from ccs_fast.trainer import fit

    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    stdout = sys.stdout
    if prefix:
        sys.stdout = _LinePrefix(stdout, prefix)
    try:
        # one line per epoch, with the loss and the ETA of this variant's training
        cfg.train.log_interval = _steps_per_epoch(cfg)
        t0 = time.perf_counter()
        # a demo rerun retrains its variants from scratch; the training run's evaluation at the
        # end (the test split, the demo's test protocol) is the variant's result
        summary = fit(cfg, overwrite=True)
        if "eval" not in summary:  # a stop signal ended training (the trainer said how)
            raise CCSError(f"demo: {cfg.model.variant} stopped by {summary.get('stopped_by', 'a signal')}; "
                           "a demo run trains from scratch, run it again")
        out_dir = Path(cfg.train.out_dir)
        result = describe_evaluation(cfg, summary["eval"], out_dir / "last.pt", out_json=out_dir / "eval.json",
                                     out_md=out_dir / "eval.md")
        result["train_s"] = time.perf_counter() - t0 - result["eval_s"]
        print(f"[eval] {cfg.model.variant}: top-1 RGB {result['rgb']['top1']:.3f} Flow {result['flow']['top1']:.3f} "
              f"RGB+Flow {result['fused']['top1']:.3f} (train {format_duration(result['train_s'])}, "
              f"eval {format_duration(result['eval_s'])})", flush=True)
        return result
    finally:
        sys.stdout = stdout
        torch.set_num_threads(threads_before)


def _variant_configs(out: Path, data_dir: Path, variants, seed: int, workers, config_overrides) -> dict:
    cfgs = {}
    for variant in variants:
        cfg = demo_config(data_dir, out, variant, seed, workers)
        for dotted, value in (config_overrides or {}).items():
            section, key = dotted.split(".", 1)
            setattr(getattr(cfg, section), key, value)
        cfg.train.progress = False  # lines, not bars: variants may share the terminal
        cfgs[variant] = cfg.validate("demo config")
    return cfgs


def _train_variants(cfgs: dict, plan) -> dict:
    """Every variant trained and evaluated: ``plan.processes`` at a time in processes of their
    own with ``plan.threads`` intra-op threads each, or one after the other in this process."""
    if plan.processes == 1:
        return {variant: train_variant(cfg, plan.threads, prefix=f"[{variant}] ") for variant, cfg in cfgs.items()}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: a forked child of a process whose OpenMP pool already ran waits for ever in
    # libgomp; the workers import torch afresh (about 2 s).
    context = multiprocessing.get_context("spawn")
    # a demo that is killed takes its variants with it (SIGKILL at the parent's death: their
    # trainers would take a SIGTERM as a stop request and then wait for a parent that is gone)
    with ProcessPoolExecutor(plan.processes, mp_context=context, initializer=end_with_parent,
                             initargs=(os.getpid(),)) as pool:
        futures = {variant: pool.submit(train_variant, cfg, plan.threads, f"[{variant}] ")
                   for variant, cfg in cfgs.items()}
        return {variant: future.result() for variant, future in futures.items()}


def summary_line(report: dict, out: Path) -> str:
    rows = "; ".join(f"{variant} RGB {r['rgb']:.3f} Flow {r['flow']:.3f} RGB+Flow {r['fused']:.3f}"
                     for variant, r in report["variants"].items())
    return (f"[demo] done in {format_duration(report['wall_s'])} (chance {report['chance']:.3f}): {rows}; "
            f"report: {out / 'report.md'}")


def _plan(cfgs: dict, processes: int, device, threads: Optional[int]) -> tuple[CpuPlan, str]:
    """Where the variants train and the line saying so: on a CPU ``processes`` side by side per
    ``distributed.plan_cpu`` (whose loader workers fill an unset ``data.num_workers``), on a GPU
    one after the other."""
    from ccs_fast.base.distributed import available_cores, plan_cpu, threads_from_environment

    if device.type != "cpu":
        plan = CpuPlan(cores=available_cores(), processes=1, threads=threads, loader_workers=0)
        return plan, f"on {device}, one variant after the other"
    plan = plan_cpu(processes=processes, threads=threads or threads_from_environment())
    for cfg in cfgs.values():
        if cfg.data.num_workers is None:
            cfg.data.num_workers = plan.loader_workers
    return plan, plan.describe()


def _timed_pictures(out: Path, cfgs: dict, results: dict, data: dict, variants: list, device, timings: dict) -> dict:
    """``_pictures`` with its time in ``timings`` and a line saying where they went (or why not)."""
    t0 = time.perf_counter()
    paths = _pictures(out, cfgs, results, data, variants, device)
    timings["pictures_s"] = time.perf_counter() - t0
    if paths.get("skipped"):
        print(f"[demo] pictures skipped: {paths['skipped']}", flush=True)
    else:
        print(f"[demo] pictures -> {out} ({format_duration(timings['pictures_s'])})", flush=True)
    return paths


def run_demo(out: str | Path, seed: int = 0, workers: int | None = None, variants=DEMO_VARIANTS,
             pictures: bool = True, dataset=None, config_overrides: dict | None = None,
             threads: Optional[int] = None, data_dir: str | Path | None = None) -> dict:
    """Train and evaluate ``variants``, write report.json, report.md and the pictures.

    On a CPU the variants train side by side, one process per core with one intra-op thread
    each (``distributed.plan_cpu``; ``threads`` intra-op threads per variant instead, and then
    as many variants at once as the cores hold); on a GPU one after the other.
    ``dataset``: keyword arguments of ``make_synthetic_dataset`` (sizes; tests use tiny ones);
    ``config_overrides``: ``{"section.key": value}`` applied to the demo config (tests);
    ``data_dir``: where the data set is (default ``out/data``; one data set serves many runs)."""
    from ccs_fast.base.distributed import available_cores
    from ccs_fast.evaluate import select_device

    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(data_dir) if data_dir is not None else out / "data"
    cfgs = _variant_configs(out, data_dir, variants, seed, workers, config_overrides)
    first = cfgs[variants[0]]
    device = select_device(first.train.device)
    plan, where = _plan(cfgs, len(variants), device, threads)
    print(f"[demo] variants {', '.join(variants)}, seed {seed}; {where}", flush=True)
    print(f"[demo] data set -> {data_dir}", flush=True)
    data = ensure_dataset(data_dir, seed, workers or available_cores(), **(dataset or {}))
    timings = {"synth_s": time.perf_counter() - start}
    print(f"[demo] data set ready ({format_duration(timings['synth_s'])}); training "
          f"{', '.join(variants)}, {first.optim.epochs} epochs each", flush=True)

    t0 = time.perf_counter()
    results = _train_variants(cfgs, plan)
    timings["variants_s"] = time.perf_counter() - t0
    for variant, result in results.items():
        timings[f"{variant}_s"] = result["train_s"] + result["eval_s"]

    picture_paths = _timed_pictures(out, cfgs, results, data, list(variants), device, timings) if pictures else {}
    report = {
        "chance": data["chance"],
        "variants": {v: {stream: results[v][stream]["top1"] for stream in ("rgb", "flow", "fused")}
                     for v in variants},
        "variant_wall_s": {v: timings[f"{v}_s"] for v in variants},
        "classes": data["classes"],
        "test_videos": data["val_videos"],
        "seed": seed,
        "threads": plan.threads,
        "plan": where,
        "protocol": protocol(first)["text"],
        "wall_s": time.perf_counter() - start,
        "timings_s": timings,
        "pictures": picture_paths,
    }
    write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    text = format_report(report)
    write_text(out / "report.md", text)
    print(text, flush=True)
    print(summary_line(report, out), flush=True)
    return report
