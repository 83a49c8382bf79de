"""Results in the layout of the paper's tables, as Markdown.

- ``table1_markdown(splits)`` (paper Table 1): one row per split (e.g. one checkpoint per
  UCF-101 split) with RGB, Flow and RGB+Flow top-1, mean class accuracy and top-5 (only with
  more than 5 classes) in percent, and, with more than one
  split, their unweighted mean over splits, the figure UCF-101 and HMDB-51 papers report.
- ``table3_markdown(variants)`` (paper Table 3): one row per variant (``baseline``, ``cb``,
  ``cs``, ``all`` first, in that order, then any others as given) with RGB, Flow and RGB+Flow
  top-1 in percent, the seed and the wall time.

A result is what ``ccs-fast eval`` returns and eval.json holds, ``{"rgb": {"top1": a, "top5": b},
"flow": {...}, "fused": {...}, "num_videos": n}`` with fractions in [0, 1]; the demo's shorter
form ``{"rgb": a, "flow": b, "fused": c}`` (top-1 only) is accepted too. A missing value prints
as "–". ``mean_over_splits`` gives the mean row as a result dict (for eval.json).
"""
from __future__ import annotations

from typing import Mapping, Optional

STREAMS = (("rgb", "RGB"), ("flow", "Flow"), ("fused", "RGB+Flow"))
VARIANT_ORDER = ("baseline", "cb", "cs", "all")
VARIANT_SETTINGS = {  # paper Table 3: what each variant adds
    "baseline": "two streams trained apart, CE, late fusion",
    "cb": "+ connection block (CE)",
    "cs": "+ shared block, L1 + L2 (no connection block)",
    "all": "CCS: connection block + shared block, L1 + L2 + L3",
}
MISSING = "–"


def _accuracy(result: Mapping, stream: str, k: str) -> Optional[float]:
    value = result.get(stream)
    if isinstance(value, Mapping):
        value = value.get(k)
    elif k != "top1":
        value = None  # the short form carries top-1 only
    return None if value is None else float(value)


def _percent(value: Optional[float], digits: int) -> str:
    return MISSING if value is None else f"{100.0 * value:.{digits}f}"


ACCURACIES = (("top1", "top-1"), ("mean_class", "mean class"), ("top5", "top-5"))


def _shown_accuracies(results) -> list[tuple[str, str]]:
    """The accuracy columns: top-1; mean class accuracy when a result has it; top-5 unless
    every result that states its class count has at most 5 classes (top-5 is then 100 %)."""
    results = list(results)
    counts = [r["num_classes"] for r in results if r.get("num_classes") is not None]
    has_mean = any(_accuracy(r, s, "mean_class") is not None for r in results for s, _ in STREAMS)
    return [(k, name) for k, name in ACCURACIES
            if k == "top1" or (k == "mean_class" and has_mean) or (k == "top5" and (not counts or max(counts) > 5))]


def mean_over_splits(splits: Mapping[str, Mapping]) -> dict:
    """{stream: {"top1", "mean_class", "top5"}} averaged over the splits that have the value
    (unweighted)."""
    mean = {}
    for stream, _ in STREAMS:
        entry = {}
        for k, _ in ACCURACIES:
            values = [v for v in (_accuracy(r, stream, k) for r in splits.values()) if v is not None]
            if values:
                entry[k] = sum(values) / len(values)
        mean[stream] = entry
    mean["num_splits"] = len(splits)
    counts = [r["num_classes"] for r in splits.values() if r.get("num_classes") is not None]
    if counts:
        mean["num_classes"] = max(counts)
    return mean


def table1_markdown(splits: Mapping[str, Mapping], *, title: Optional[str] = None,
                    protocol: Optional[str] = None, digits: int = 1) -> str:
    """Paper Table 1 layout: split rows × (RGB, Flow, RGB+Flow) × (top-1, mean class accuracy
    where the results have it, top-5 with more than 5 classes) in percent, and the mean over
    splits when there are several. ``protocol`` (e.g. "25 segments × 10 crops") is written
    under the title."""
    if not splits:
        raise ValueError("no split results to tabulate")
    shown = _shown_accuracies(splits.values())
    header = ["Split"] + [f"{name} {title}" for _, name in STREAMS for _, title in shown] + ["Videos"]
    lines = []
    if title:
        lines += [f"### {title}", ""]
    if protocol:
        lines += [f"Protocol: {protocol}", ""]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]

    def row(label: str, result: Mapping) -> str:
        cells = [_percent(_accuracy(result, s, k), digits) for s, _ in STREAMS for k, _ in shown]
        videos = result.get("num_videos")
        return "| " + " | ".join([label] + cells + [MISSING if videos is None else str(videos)]) + " |"

    lines += [row(label, result) for label, result in splits.items()]
    if len(splits) > 1:
        lines.append(row(f"**Mean ({len(splits)} splits)**", mean_over_splits(splits)))
    return "\n".join(lines) + "\n"


def _ordered(variants: Mapping[str, Mapping]) -> list[str]:
    known = [v for v in VARIANT_ORDER if v in variants]
    return known + [v for v in variants if v not in VARIANT_ORDER]


def _wall(seconds) -> str:
    if seconds is None:
        return MISSING
    seconds = float(seconds)
    return f"{seconds:.0f} s" if seconds < 600 else f"{seconds / 60:.1f} min"


def table3_markdown(variants: Mapping[str, Mapping], *, seed: Optional[int] = None,
                    wall_times: Optional[Mapping[str, float]] = None, title: Optional[str] = None,
                    digits: int = 1) -> str:
    """Paper Table 3 layout: variant rows with what each adds, RGB / Flow / RGB+Flow top-1 in
    percent, the seed and the wall time. A variant's own ``"seed"`` and ``"wall_s"`` keys take
    precedence over ``seed`` and ``wall_times[variant]``."""
    if not variants:
        raise ValueError("no variant results to tabulate")
    wall_times = wall_times or {}
    lines = [f"### {title}", ""] if title else []
    lines += ["| Variant | Setting | RGB | Flow | RGB+Flow | Seed | Wall time |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for name in _ordered(variants):
        result = variants[name]
        run_seed = result.get("seed", seed)
        cells = [_percent(_accuracy(result, s, "top1"), digits) for s, _ in STREAMS]
        lines.append("| " + " | ".join([f"`{name}`", VARIANT_SETTINGS.get(name, ""), *cells,
                                        MISSING if run_seed is None else str(run_seed),
                                        _wall(result.get("wall_s", wall_times.get(name)))]) + " |")
    return "\n".join(lines) + "\n"
