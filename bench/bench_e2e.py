"""End-to-end training throughput (SPEC §7, §8): clips/s of the real trainer, ``train()``,
in four set-ups on the same model size:

(a) ``ccs-dali``           CCS (`all`), DALI loader on rawframes, bf16, fused kernels
(b) ``ccs-synthetic``      the same on synthetic device tensors (no I/O)
(c) ``backbones-synthetic`` the two backbones alone (`baseline`: backbones + linear heads,
                           cross-entropy) on synthetic tensors: the speed of light
(d) ``eager-fp32-torch``   the baseline a user would write: CCS with eager ops, fp32, NCHW,
                           torch's non-fused SGD, a PyTorch DataLoader with every core

Targets (SPEC §8, one H100/H200, ResNet-50): (a)/(b) ≥ 0.95, (b)/(c) ≥ 0.90, (a)/(d) ≥ 3.
Throughput is the median of the trainer's own clips/s log records after the first
``--warmup-logs`` (compilation, cuDNN autotuning, worker start-up). Rows go to
``bench/results/e2e-<device>.json``.

    python -m bench.bench_e2e                          # GPU, ResNet-50, 224 px
    python -m bench.bench_e2e --device cpu --backbone resnet18 --input-size 64 --batch-size 8 --steps 12
"""
from __future__ import annotations

import math
import statistics
import tempfile
from pathlib import Path

import torch

from bench.bench_loader import make_rawframes
from bench.common import append_rows, bench_parser, env_info, print_table, result_path
from ccs_fast.config import Config
from ccs_fast.metrics import METRICS_FILE, read_metrics

CASES = {
    "ccs-dali": dict(variant="all", backend="dali", precision="bf16", impl="auto", channels_last=True, fused=True),
    "ccs-synthetic": dict(variant="all", backend="synthetic", precision="bf16", impl="auto", channels_last=True, fused=True),
    "backbones-synthetic": dict(variant="baseline", backend="synthetic", precision="bf16", impl="auto", channels_last=True, fused=True),
    "eager-fp32-torch": dict(variant="all", backend="torch", precision="fp32", impl="eager", channels_last=False, fused=False),
}
RATIOS = {
    "dali_over_synthetic": ("ccs-dali", "ccs-synthetic", 0.95),
    "ccs_over_backbones": ("ccs-synthetic", "backbones-synthetic", 0.90),
    "dali_over_eager_baseline": ("ccs-dali", "eager-fp32-torch", 3.0),
}
COLUMNS = ("case", "clips_per_s", "backbone", "batch_size", "input_size", "precision", "backend", "device")


def case_config(case: str, args, annotation: Path | None, data_root: Path | None, out_dir: Path) -> Config:
    spec = CASES[case]
    cfg = Config()
    cfg.model.variant = spec["variant"]
    cfg.model.backbone = args.backbone
    cfg.model.num_classes = args.classes
    cfg.model.impl = spec["impl"]
    cfg.model.partial_bn = False
    cfg.data.backend = spec["backend"]
    cfg.data.batch_size = args.batch_size
    cfg.data.classes_per_batch = None
    cfg.data.input_size = args.input_size
    cfg.data.num_workers = args.workers
    cfg.data.test_segments = args.test_segments
    cfg.data.synthetic_batches = args.steps
    cfg.data.val_list = ""
    if spec["backend"] != "synthetic":
        cfg.data.root, cfg.data.train_list = str(data_root), str(annotation)
    cfg.optim.fused = spec["fused"]
    cfg.optim.lr_steps = []
    cfg.train.precision = spec["precision"] if args.device == "cuda" else "fp32"
    cfg.train.channels_last = spec["channels_last"]
    cfg.train.device = args.device
    cfg.train.out_dir = str(out_dir / case)
    cfg.train.log_interval = args.log_interval
    cfg.train.progress = False
    cfg.train.tensorboard = False
    cfg.train.save_interval = 10**6
    videos = args.videos if spec["backend"] != "synthetic" else args.steps * args.batch_size
    cfg.optim.epochs = max(1, math.ceil(args.steps * args.batch_size / videos))
    return cfg.validate("bench_e2e")


def measure(case: str, args, annotation, data_root, out_dir: Path) -> float:
    from ccs_fast.trainer import train

    cfg = case_config(case, args, annotation, data_root, out_dir)
    train(cfg)
    rates = [r["clips_per_s"] for r in read_metrics(Path(cfg.train.out_dir) / METRICS_FILE) if r["split"] == "train"]
    timed = rates[args.warmup_logs:] or rates[-1:]
    return float(statistics.median(timed))


def parse_args(argv=None):
    """The options; ``cases`` as a list (the cases asked for, checked against ``CASES``)."""
    parser = bench_parser(__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--classes", type=int, default=101)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=60, help="training steps per case")
    parser.add_argument("--log-interval", type=int, default=5, help="steps per clips/s record")
    parser.add_argument("--warmup-logs", type=int, default=2, help="clips/s records left out (warm-up)")
    parser.add_argument("--videos", type=int, default=256, help="rawframe videos to generate (340x256)")
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--data", type=Path, help="existing rawframes root with --annotation (instead of generating)")
    parser.add_argument("--annotation", type=Path)
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: every core)")
    parser.add_argument("--test-segments", type=int, default=25,
                        help="segments per video of the evaluation after training on synthetic tensors (not timed)")
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = set(args.cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {list(CASES)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    cases = args.cases
    if args.device != "cuda":
        cases = [c for c in cases if c != "ccs-dali" or _dali_importable()]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        annotation, data_root = args.annotation, args.data
        if data_root is None and any(CASES[c]["backend"] != "synthetic" for c in cases):
            data_root = tmp / "rawframes"
            data_root.mkdir()
            annotation = make_rawframes(data_root, args.videos, args.frames)
        if args.data is not None:
            args.videos = sum(1 for line in Path(annotation).read_text().splitlines() if line.strip())
        info = env_info(args.device)
        path = result_path("e2e", args.device, args.out)
        rows = []
        for case in cases:
            rate = measure(case, args, annotation, data_root, tmp / "runs")
            spec = CASES[case]
            row = {"case": case, "clips_per_s": rate, "backbone": args.backbone, "batch_size": args.batch_size,
                   "input_size": args.input_size, "precision": spec["precision"] if args.device == "cuda" else "fp32",
                   "backend": spec["backend"], "impl": spec["impl"], "steps": args.steps, **info}
            append_rows(path, [row])  # case by case: a run stopped by a time limit keeps what it measured
            rows.append(row)
            print(f"{case}: {rate:.1f} clips/s", flush=True)

    by_case = {r["case"]: r["clips_per_s"] for r in rows}
    ratios = []
    for name, (num, den, target) in RATIOS.items():
        if num in by_case and den in by_case:
            ratio = by_case[num] / by_case[den]
            ratios.append({"case": name, "ratio": ratio, "target": target, "meets_target": ratio >= target, **info})
    append_rows(path, ratios)
    rows += ratios
    print_table([r for r in rows if "clips_per_s" in r], COLUMNS)
    print_table([r for r in rows if "ratio" in r], ("case", "ratio", "target", "meets_target"))
    print(f"rows appended to {path}")


def _dali_importable() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
