"""``ccs-fast demo``: the main job on the embedded default data set (SPEC §6, §8).

Writes the data set (or reuses one already written for the same seed), trains the variants
(``--variants``, default ``baseline`` and ``all``; ``baseline,cb,cs,all`` for the paper's
Table 3) with the packaged ``demo`` config, evaluates each on the test split (25 segments,
centre crop) and writes ``report.json`` and ``report.md`` with the Table 3 layout (RGB, Flow,
RGB+Flow top-1, seed, wall time per variant): ``all`` should reach high RGB+Flow accuracy while
``baseline`` stays near chance, because the class is a Latin square of appearance and motion.

Pictures beside report.md (with matplotlib, the ``[viz]`` extra; without it the demo runs and
says they were skipped): ``training_curves.png`` (loss and the training batches' top-1 per
epoch of every variant, and the test top-1; the demo config evaluates once, at the end, since
an evaluation of the 108 test videos × 25 segments costs about as much as a training epoch),
``<variant>/confusion.png``, and for the last variant trained with a connection block (``all``
by default) ``cams/`` (class activation maps per stream, paper Fig. 6) and ``attention/``
(the block's attention) for ``PICTURE_VIDEOS`` test videos.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ccs_fast.atomic import write_text
from ccs_fast.config import Config, load_config

from ccs_fast.config import VARIANTS
from ccs_fast.errors import CCSError

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
    packaged = Path(__file__).parent / "configs" / "demo.yaml"
    cfg = load_config(packaged)
    cfg.model.variant = variant
    cfg.train.seed = seed
    cfg.train.out_dir = str(out_dir / variant)
    cfg.data.root = str(data_dir / "rawframes")
    cfg.data.train_list = str(data_dir / "annotations" / "train_rawframes.txt")
    cfg.data.val_list = str(data_dir / "annotations" / "val_rawframes.txt")
    if workers is not None:
        cfg.data.num_workers = workers
    return cfg.validate("demo config")


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


def _pictures(out: Path, runs: dict, data: dict, variants) -> dict:
    """Write the demo's pictures; paths relative to ``out`` (report.md's folder)."""
    from ccs_fast.pictures import picture_loader, write_attention, write_cams, write_confusion
    from ccs_fast.viz import matplotlib_available, plot_training_curves

    if not matplotlib_available():
        return {"skipped": "matplotlib is not installed (pip install 'ccs_fast[viz]'; make demo installs it)"}
    pictures = {}
    curves = {v: Path(runs[v]["cfg"].train.out_dir) / "metrics.jsonl" for v in variants}
    pictures["training_curves"] = str(plot_training_curves(curves, out / "training_curves.png").relative_to(out))
    names = data.get("class_names")
    pictures["confusion"] = {
        v: str(write_confusion(runs[v]["result"], Path(runs[v]["cfg"].train.out_dir) / "confusion.png", names,
                               title=f"{v}: RGB+Flow on the test split").relative_to(out))
        for v in variants}
    with_block = [v for v in variants if v in ("cb", "all")]
    chosen = "all" if "all" in with_block else (with_block[-1] if with_block else variants[-1])
    run = runs[chosen]
    cfg, model, device = run["cfg"], run["result"]["model"], run["result"]["device"]
    pictures["picture_variant"] = chosen
    kwargs = dict(device=device, precision=cfg.train.precision, class_names=names)
    pictures["cams"] = [str(p.relative_to(out)) for p in
                        write_cams(model, picture_loader(cfg, device), PICTURE_VIDEOS, out / "cams",
                                   fusion_weights=cfg.model.fusion_weights, **kwargs)]
    if with_block:
        pictures["attention"] = [str(p.relative_to(out)) for p in write_attention(
            model, picture_loader(cfg, device), PICTURE_VIDEOS, out / "attention", **kwargs)]
    return pictures


def run_demo(out: str | Path, seed: int = 0, workers: int | None = None, variants=DEMO_VARIANTS,
             pictures: bool = True, dataset=None, config_overrides: dict | None = None) -> dict:
    """Train and evaluate ``variants``, write report.json, report.md and the pictures.

    ``dataset``: keyword arguments of ``make_synthetic_dataset`` (sizes; tests use tiny ones);
    ``config_overrides``: ``{"section.key": value}`` applied to the demo config (tests)."""
    from ccs_fast.evaluate import evaluate_checkpoint, protocol
    from ccs_fast.trainer import train

    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    print(f"[demo] data set -> {data_dir}", flush=True)
    data = ensure_dataset(data_dir, seed, workers, **(dataset or {}))
    timings = {"synth_s": time.perf_counter() - start}

    results, runs = {}, {}
    for variant in variants:
        t0 = time.perf_counter()
        cfg = demo_config(data_dir, out, variant, seed, workers)
        for dotted, value in (config_overrides or {}).items():
            section, key = dotted.split(".", 1)
            setattr(getattr(cfg, section), key, value)
        cfg.validate("demo config")
        print(f"[demo] training {variant} -> {cfg.train.out_dir}", flush=True)
        train(cfg, overwrite=True)  # a demo rerun retrains its variants from scratch
        result = evaluate_checkpoint(cfg, Path(cfg.train.out_dir) / "last.pt",
                                     out_json=Path(cfg.train.out_dir) / "eval.json",
                                     out_md=Path(cfg.train.out_dir) / "eval.md", return_model=pictures)
        print(result["table"], end="", flush=True)
        results[variant] = {stream: result[stream]["top1"] for stream in ("rgb", "flow", "fused")}
        timings[f"{variant}_s"] = time.perf_counter() - t0
        runs[variant] = {"cfg": cfg, "result": result}

    picture_paths = {}
    if pictures:
        t0 = time.perf_counter()
        picture_paths = _pictures(out, runs, data, list(variants))
        timings["pictures_s"] = time.perf_counter() - t0
        if picture_paths.get("skipped"):
            print(f"[demo] pictures skipped: {picture_paths['skipped']}", flush=True)

    report = {
        "chance": data["chance"],
        "variants": results,
        "variant_wall_s": {v: timings[f"{v}_s"] for v in variants},
        "classes": data["classes"],
        "test_videos": data["val_videos"],
        "seed": seed,
        "protocol": protocol(runs[variants[0]]["cfg"])["text"],
        "wall_s": time.perf_counter() - start,
        "timings_s": timings,
        "pictures": picture_paths,
    }
    write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    text = format_report(report)
    write_text(out / "report.md", text)
    print(text, flush=True)
    return report
