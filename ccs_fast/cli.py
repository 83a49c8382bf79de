"""``ccs-fast``: the command-line entry point.

Subcommands: synth, prepare, train, eval, predict, config, export, bench, demo. Bad input ends with one
line on stderr (``ccs-fast: error: ...``) and exit status 2, never a traceback (SPEC §9).
"""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from ccs_fast.base.errors import CCSError

BENCHMARKS = ("cross_attention", "losses", "loader", "e2e")
DESCRIPTION = ("Two-stream (RGB + optical flow) action recognition with the Cooperative Cross-Stream "
               "network: prepare data, train, evaluate, predict. 'ccs-fast COMMAND --help' describes "
               "each command.")


def _config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="config file (a path, or the name of a packaged config: "
                   + ", ".join(packaged_configs()) + ")")
    p.add_argument("--set", dest="overrides", metavar="SECTION.KEY=VALUE", action="append", default=[],
                   help="override one config value, e.g. --set optim.lr=0.01 (repeatable)")


def packaged_configs() -> list[str]:
    return sorted(p.stem for p in (Path(__file__).parent / "configs").glob("*.yaml"))


def resolve_config_path(name: str | None) -> str | None:
    if name is None or Path(name).exists():
        return name
    packaged = Path(__file__).parent / "configs" / f"{name}.yaml"
    return str(packaged) if packaged.exists() else name


def cmd_synth(args) -> int:
    from ccs_fast.dataloader.rawframes import naming_from_arguments
    from ccs_fast.dataloader.synth import make_synthetic_dataset

    summary = make_synthetic_dataset(
        args.out, seed=args.seed, classes=args.classes, videos_per_cell=args.videos_per_cell,
        val_videos_per_cell=args.val_videos_per_cell, frames=args.frames, size=args.size,
        flow=args.flow, workers=args.workers, progress=True,
        naming=naming_from_arguments(args),
    )
    print(f"wrote {args.out}: {summary}")
    return 0


def cmd_prepare(args) -> int:
    from ccs_fast.dataloader.prepare import run_prepare

    return run_prepare(args)


def cmd_train(args) -> int:
    """``--resume`` without ``--config``: the checkpoint's own config is the base, and
    ``--set`` changes only what a resumed run may change (the trainer refuses the rest).
    A resumed run writes into the folder of the checkpoint it resumes from (the out_dir
    recorded in the checkpoint is where the run was, not an order): another target needs
    ``--out`` (or ``--set train.out_dir=``). Returns the trainer's exit code: 0, or 128 + the
    signal's number after a stop signal (a resumable checkpoint is written). The config is
    validated once, by ``load_config``; what this changes afterwards keeps it valid."""
    from ccs_fast.checkpoint import read_checkpoint, resolve_checkpoint_path
    from ccs_fast.config import check_out_dir, load_config
    from ccs_fast.trainer import fit

    if args.resume and args.overwrite:
        raise CCSError("--resume continues a run and --overwrite replaces it; pass one of them")
    saved = None
    if args.resume:
        checkpoint = resolve_checkpoint_path(args.resume)
        saved = read_checkpoint(checkpoint, mmap=True).get("config")
        if not saved and not args.config:
            raise CCSError(f"{checkpoint}: checkpoint holds no config; pass the run's --config")
    config_path = resolve_config_path(args.config)
    cfg = load_config(config_path, args.overrides, base=None if args.config else saved,
                      base_source=str(args.resume))
    if not args.resume:
        from ccs_fast.config import settle_num_classes

        taken = settle_num_classes(cfg)
        if taken:
            print(f"[train] {taken}", flush=True)
    if args.out:
        check_out_dir(args.out)
        cfg.train.out_dir = args.out
    elif args.resume and not any(item.split("=", 1)[0].strip() == "train.out_dir" for item in args.overrides):
        cfg.train.out_dir = str(checkpoint.parent)
    from ccs_fast.evaluate import select_device

    if select_device(cfg.train.device).type == "cpu":
        from ccs_fast.base.distributed import apply_cpu_plan

        print(f"[train] {apply_cpu_plan().describe()}", flush=True)
    return fit(cfg, resume=args.resume, overwrite=args.overwrite).get("exit_code", 0)


def _config_of_checkpoint(args):
    """The config of ``eval`` / ``predict``: None (the checkpoint's own, unchanged) without
    ``--config`` and ``--set``; with ``--set`` alone, the checkpoint's config with the
    overrides applied on top; with ``--config``, that file and the overrides."""
    from ccs_fast.checkpoint import read_checkpoint, resolve_checkpoint_path
    from ccs_fast.config import load_config

    if not (args.config or args.overrides):
        return None
    saved = None
    if not args.config:
        checkpoint = resolve_checkpoint_path(args.checkpoint)
        saved = read_checkpoint(checkpoint, mmap=True).get("config")
        if not saved:
            raise CCSError(f"{checkpoint}: checkpoint holds no config; pass one with --config")
    return load_config(resolve_config_path(args.config), args.overrides, base=saved,
                       base_source=str(args.checkpoint))


def cmd_eval(args) -> int:
    """One checkpoint: accuracies, protocol, confusion matrix (eval.json, confusion.png) and
    the optional pictures. Several (one per split, each with its --list): the paper's
    Table 1 layout with the mean over splits."""
    from ccs_fast.evaluate import evaluate_checkpoint, evaluate_checkpoints

    checkpoints, lists = args.checkpoint, args.list or []
    if lists and len(lists) != len(checkpoints):
        raise CCSError(f"eval: {len(checkpoints)} --checkpoint but {len(lists)} --list; "
                       "give one --list per --checkpoint (or none: each checkpoint's data.val_list)")
    if (args.cam or args.attention) and not args.out:
        raise CCSError("eval --cam/--attention: --out FOLDER is needed for the pictures")
    cfgs = [_config_of_checkpoint(argparse.Namespace(**{**vars(args), "checkpoint": c})) for c in checkpoints]
    out = Path(args.out) if args.out else None
    out_json, out_md = (out / "eval.json", out / "eval.md") if out else (None, None)
    if len(checkpoints) > 1:
        if args.no_labels or args.cam or args.attention:
            raise CCSError("eval: --no-labels, --cam and --attention take one --checkpoint")
        report = evaluate_checkpoints(cfgs, checkpoints, lists, out_json=out_json, out_md=out_md,
                                      crops=args.crops, progress=True)
        for result in report["splits"].values():
            _print_skipped(result, "[eval]")
        print(f"[eval] protocol: {report['protocol']['text']}", flush=True)
        print(report["table"], end="", flush=True)
        return 0
    cfg, checkpoint, annotation = cfgs[0], checkpoints[0], lists[0] if lists else None
    if args.no_labels:
        from ccs_fast.predict import predict_list

        where = out / "predictions.jsonl" if out else Path("predictions.jsonl")
        summary = predict_list(cfg, checkpoint, annotation, where, progress=True)
        _print_skipped(summary, "[predict]")
        print(f"predicted {summary['num_videos']} videos (no labels, no accuracy) -> {where}")
        return 0
    result = evaluate_checkpoint(cfg, checkpoint, annotation=annotation, out_json=out_json, out_md=out_md,
                                 crops=args.crops, return_model=bool(args.cam or args.attention),
                                 progress=True)
    _print_skipped(result, "[eval]")
    print(f"[eval] protocol: {result['protocol']['text']}", flush=True)
    print(result["table"], end="", flush=True)
    if out:
        _eval_pictures(args, result, out, annotation)
    return 0


def _eval_pictures(args, result: dict, out: Path, annotation) -> None:
    from ccs_fast.pictures import picture_loader, video_names, write_attention, write_cams, write_confusion
    from ccs_fast.viz import matplotlib_available

    if not matplotlib_available():
        print("[eval] pictures skipped: matplotlib is not installed (pip install 'ccs_fast[viz]')", flush=True)
        return
    names = result["class_names"]
    print(f"[eval] confusion matrix -> {write_confusion(result, out / 'confusion.png', names)}", flush=True)
    for count, write, folder in ((args.cam, write_cams, "cams"), (args.attention, write_attention, "attention")):
        if count:
            cfg, device = result["cfg"], result["device"]
            extra = {"fusion_weights": cfg.model.fusion_weights} if write is write_cams else {}
            paths = write(result["model"], picture_loader(cfg, device, annotation), count, out / folder,
                          device=device, precision=cfg.train.precision, class_names=names,
                          videos=video_names(cfg, annotation), **extra)
            print(f"[eval] {len(paths)} {folder} pictures -> {out / folder}", flush=True)


def _print_skipped(result: dict, what: str) -> None:
    from ccs_fast.loaders import skipped_line

    if result.get("skipped_videos"):
        print(skipped_line(result, f"{what} {result['annotation']}"), flush=True)


def cmd_predict(args) -> int:
    from ccs_fast.evaluate import config_for
    from ccs_fast.predict import format_predictions, predict_list, predict_videos, write_json_lines

    if bool(args.videos) == (args.list is not None):
        raise CCSError("predict: give video files or --list ANNOTATION (one of them)")
    cfg = config_for(_config_of_checkpoint(args), args.checkpoint)
    if args.list is not None:
        if not args.out:
            raise CCSError("predict --list: --out FILE.jsonl is needed for the predictions")
        summary = predict_list(cfg, args.checkpoint, args.list, args.out, class_ind=args.class_ind,
                               topk=args.topk, progress=True)
        _print_skipped(summary, "[predict]")
        print(f"predicted {summary['num_videos']} videos -> {args.out}")
        return 0
    report = predict_videos(cfg, args.checkpoint, args.videos, flow=args.flow, topk=args.topk,
                            class_ind=args.class_ind, short_side=args.short_side,
                            skip_bad=cfg.data.skip_bad, progress=True)
    _print_skipped({**report, "annotation": f"{len(args.videos)} video(s)"}, "[predict]")
    for line in report.get("short", []):
        print(f"[predict] {line}; predicted from the frames decoded", flush=True)
    print(format_predictions(report["rows"]), end="", flush=True)
    if args.out:
        write_json_lines(report["rows"], args.out)
        print(f"predictions of {len(report['rows'])} video(s) -> {args.out}")
    return 0


def cmd_config(args) -> int:
    """The effective config: the defaults, the YAML file (or a checkpoint's config) and the
    ``--set`` overrides, validated, as YAML on stdout."""
    import yaml

    from ccs_fast.checkpoint import read_checkpoint, resolve_checkpoint_path
    from ccs_fast.config import load_config

    saved = None
    if args.checkpoint:
        checkpoint = resolve_checkpoint_path(args.checkpoint)
        saved = read_checkpoint(checkpoint, mmap=True).get("config")
        if not saved:
            raise CCSError(f"{checkpoint}: checkpoint holds no config")
    cfg = load_config(resolve_config_path(args.config), args.overrides, base=None if args.config else saved,
                      base_source=str(args.checkpoint))
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="", flush=True)
    return 0


def cmd_export(args) -> int:
    from ccs_fast.checkpoint import export_checkpoint

    out, size = export_checkpoint(args.checkpoint, args.out)
    print(f"exported the weights and config of {args.checkpoint} -> {out} ({size / 2**20:.1f} MiB)")
    return 0


def cmd_bench(args) -> int:
    repo = Path(__file__).resolve().parent.parent
    if not (repo / "bench" / "__init__.py").exists():
        raise CCSError(f"{repo / 'bench'}: the benchmarks live in the source checkout; run ccs-fast bench from a clone")
    sys.path.insert(0, str(repo))
    sys.argv = [f"bench.bench_{args.name}", *args.bench_args]
    runpy.run_module(f"bench.bench_{args.name}", run_name="__main__")
    return 0


def cmd_demo(args) -> int:
    from ccs_fast.demo import parse_variants, run_demo

    if args.threads is not None and args.threads < 1:
        raise CCSError(f"--threads must be at least 1, got {args.threads}")
    run_demo(args.out, seed=args.seed, workers=args.workers, variants=parse_variants(args.variants),
             threads=args.threads, data_dir=args.data)
    return 0


def _synth_defaults() -> dict:
    import inspect

    from ccs_fast.dataloader.synth import make_synthetic_dataset

    params = inspect.signature(make_synthetic_dataset).parameters
    return {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}


def flow_methods() -> tuple[str, ...]:
    from ccs_fast.dataloader.flow import FLOW_METHODS

    return FLOW_METHODS


def _synth_arguments(p: argparse.ArgumentParser) -> None:
    from ccs_fast.dataloader.rawframes import add_naming_arguments

    synth_defaults = _synth_defaults()
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--classes", type=int, default=synth_defaults["classes"], help="number of classes C, 2-4 (appearances = motions = C; default %(default)s)")
    p.add_argument("--videos-per-cell", type=int, default=synth_defaults["videos_per_cell"], help="training videos per (appearance, motion) pair (default %(default)s)")
    p.add_argument("--val-videos-per-cell", type=int, default=synth_defaults["val_videos_per_cell"], help="test videos per pair (default %(default)s)")
    p.add_argument("--frames", type=int, default=synth_defaults["frames"], help="frames per video (default %(default)s)")
    p.add_argument("--size", type=int, default=synth_defaults["size"], help="frame width and height in pixels, even (default %(default)s)")
    p.add_argument("--flow", choices=("tvl1", "farneback"), default="tvl1", help="optical flow (default TV-L1)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    add_naming_arguments(p)


def _prepare_arguments(p: argparse.ArgumentParser) -> None:
    try:
        from ccs_fast.dataloader.prepare import add_prepare_arguments
    except ImportError:  # pragma: no cover - prepare's own dependencies missing
        return
    add_prepare_arguments(p)


def _train_arguments(p: argparse.ArgumentParser) -> None:
    _config_arguments(p)
    p.add_argument("--out", help="output folder (train.out_dir)")
    p.add_argument("--resume", metavar="CKPT", help="continue from this checkpoint or run folder (OUT/last.pt or OUT); "
                   "its config is used, and --set may change only optim.lr, optim.epochs, the eval/save/log intervals, "
                   "data.num_workers and paths (config.RESUME_CHANGEABLE)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it or --resume a non-empty folder is refused)")


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    _config_arguments(p)
    p.add_argument("--checkpoint", required=True, action="append",
                   help="checkpoint or run folder; repeat it (one per split, with one --list each) "
                        "for the paper's Table 1 with the mean over splits")
    p.add_argument("--list", action="append",
                   help="annotation list to evaluate (default: the config's data.val_list); one per --checkpoint")
    p.add_argument("--out", help="folder for eval.json, eval.md and the pictures")
    p.add_argument("--crops", type=int, choices=(1, 3, 10), default=None,
                   help="test views per clip: 1 centre, 3 along the long side, 10 (corners + centre, mirrored); "
                        "view scores averaged (TSN). Default: data.test_crops (1)")
    p.add_argument("--cam", type=int, default=0, metavar="N",
                   help="class activation maps per stream for N test videos (OUT/cams/*.png; needs the [viz] extra)")
    p.add_argument("--attention", type=int, default=0, metavar="N",
                   help="connection-block attention for N test videos (OUT/attention/*.png; variants cb and all)")
    p.add_argument("--no-labels", action="store_true",
                   help="the list has no labels (none, or -1): write OUT/predictions.jsonl "
                        "(as predict does) instead of accuracies")


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    _config_arguments(p)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint (last.pt, best.pt, an exported file) or run folder to predict with")
    p.add_argument("videos", nargs="*", metavar="VIDEO",
                   help="video files: decoded with PyAV, flow computed on the fly, TSN test sampling")
    p.add_argument("--list", help="annotation list of rawframes (or of videos with data.modality=video) "
                   "instead; '' takes the config's data.val_list")
    p.add_argument("--out", help="JSON lines, one per video (needed with --list)")
    p.add_argument("--topk", type=int, default=5, help="classes per stream (default 5)")
    p.add_argument("--class-ind", metavar="TXT",
                   help="classInd.txt naming the classes (default: model.class_names of the checkpoint)")
    p.add_argument("--flow", choices=flow_methods(), default="tvl1",
                   help="flow estimator for video files (tvl1: what prepare computes; farneback: fast)")
    p.add_argument("--short-side", type=int, default=256,
                   help="frames are resized to this short side before the flow, as prepare does (default 256)")


def _config_command_arguments(p: argparse.ArgumentParser) -> None:
    _config_arguments(p)
    p.add_argument("--checkpoint", help="start from this checkpoint's config instead of the defaults "
                                        "(when no --config is given)")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint (last.pt, best.pt) or a run folder")
    p.add_argument("--out", required=True, help="the file to write")


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=BENCHMARKS, help="the benchmark to run")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark (see its --help)")


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="data and training seed (default 0)")
    p.add_argument("--workers", type=int, default=None,
                   help="synth processes and loader workers per variant (default: the CPU plan, from the cores "
                        "available to the process)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads per variant (default: the CPU plan, one per variant trained side by side; "
                        "with N, as many variants train at once as the cores hold N threads each)")
    p.add_argument("--data", default=None, help="the data set's folder (default OUT/data); one data set serves many runs")
    p.add_argument("--variants", default="baseline,all",
                   help="comma-separated variants to train (baseline, cb, cs, all; default baseline,all); "
                        "baseline,cb,cs,all gives the paper's Table 3")


# Each sub-command: its help line, the function adding its arguments, the function it runs.
COMMANDS = (
    ("synth", "write the embedded default data set (videos, rawframes, TV-L1 flow, lists, splits)",
     _synth_arguments, cmd_synth),
    ("prepare", "videos + split files -> rawframes, TV-L1 flow and annotation lists", _prepare_arguments, cmd_prepare),
    ("train", "train a model", _train_arguments, cmd_train),
    ("eval", "RGB, Flow and RGB+Flow top-1/top-5 of a checkpoint on a split", _eval_arguments, cmd_eval),
    ("predict", "top-k classes of video files (or of an annotation list's videos)", _predict_arguments, cmd_predict),
    ("config", "print the effective config (defaults, --config or a checkpoint's, --set) as YAML",
     _config_command_arguments, cmd_config),
    ("export", "a weights-only file of a checkpoint (model and config; for sharing)", _export_arguments, cmd_export),
    ("bench", "run a benchmark from the source checkout: " + ", ".join(BENCHMARKS), _bench_arguments, cmd_bench),
    ("demo", "synth the embedded data set, train baseline and CCS, evaluate, write a report", _demo_arguments, cmd_demo),
)


def build_parser() -> argparse.ArgumentParser:
    from ccs_fast import __version__

    parser = argparse.ArgumentParser(prog="ccs-fast", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"ccs-fast {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_line, add_arguments, command in COMMANDS:
        p = sub.add_parser(name, help=help_line)
        add_arguments(p)
        p.set_defaults(func=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except CCSError as exc:
        print(f"ccs-fast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # signals.SignalExit carries its own line and code
        print(f"ccs-fast: {exc or 'interrupted'}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
