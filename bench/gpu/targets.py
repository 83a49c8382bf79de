"""The SPEC §8 targets read from the rows a run appended: (target, measured, verdict) each, and the
datasheet peaks and minimal bytes the fractions refer to."""
from __future__ import annotations

from bench.gpu.plan import Points

Target = tuple[str, str, str]  # (target, measured, verdict)
NOT_MEASURED = "—"  # the verdict of a target its rows do not measure

# (fragment of torch.cuda.get_device_name, dense bf16 tensor-core TFLOP/s, HBM TB/s); first
# match wins. NVIDIA datasheets; "dense" is half the figure quoted with 2:4 sparsity.
PEAKS = (
    ("H200 NVL", 835, 4.8),
    ("H200", 989, 4.8),
    ("H100 NVL", 835, 3.9),
    ("H100 PCIe", 756, 2.0),
    ("H100", 989, 3.35),  # SXM; torch names it "NVIDIA H100 80GB HBM3"
)


def device_peak(name: str) -> tuple[float, float] | None:
    """(dense bf16 TFLOP/s, HBM GB/s) of a device by name, or None when it is not in PEAKS."""
    for fragment, tflops, tbps in PEAKS:
        if fragment.lower() in name.lower():
            return float(tflops), tbps * 1e3
    return None


DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def loss_min_bytes(op: str, mode: str, B: int, D: int, dtype: str) -> int:
    """HBM bytes a loss must move at least: embeddings and int64 labels read once, the fp32 loss
    written once; with ``full`` also the scalar grad_output read and every embedding's gradient
    written once."""
    embeddings = (2 if op == "cross_modal_triplet_loss" else 1) * B * D * DTYPE_BYTES[dtype]
    nbytes = embeddings + 8 * B + 4
    if mode == "full":
        nbytes += embeddings + 4
    return nbytes


def _pick(rows, **want):
    """The last row matching every key of ``want`` (the latest measurement), or None."""
    found = [r for r in rows if all(r.get(k) == v for k, v in want.items())]
    return found[-1] if found else None


def _verdict(ok) -> str:
    return "pass" if ok else "**fail**"


def evaluate_targets(points: Points, attention, losses, loader, e2e, peak) -> list[Target]:
    """(target, measured, pass/fail/not measured) for each §8 target ``make gpu`` takes."""
    return [*attention_targets(points, attention, peak), *loss_targets(points, losses),
            loader_target(loader), *e2e_targets(e2e)]


def attention_targets(points: Points, attention, peak) -> list[Target]:
    """cross_stream_attention at the plan's points: the fraction of the datasheet peak at the
    largest N, the speed-ups over eager, torch.compile and SDPA at each N, and peak memory
    linear in N."""
    F, B, dtype = points.attention_features, points.attention_B, points.dtype
    shape = dict(mode="full", dtype=dtype, B=B, d=F, e=F)
    out = [_attention_peak(points, _pick(attention, provider="triton", N_f=points.attention_N[-1], **shape), peak)]
    for n in points.attention_N:
        tri = _pick(attention, provider="triton", N_f=n, **shape)
        for provider, factor in (("eager", 3.0), ("compile", 1.5), ("sdpa", 1.0)):
            other = _pick(attention, provider=provider, N_f=n, **shape)
            label = {"eager": "≥ 3× eager", "compile": "≥ 1.5× torch.compile", "sdpa": "faster than two SDPA calls"}
            name = f"cross_stream_attention fwd+bwd at N = {n}, e = {F}: {label[provider]}"
            if tri is None or other is None:
                out.append((name, "not measured", NOT_MEASURED))
                continue
            speedup = other["ms_p50"] / tri["ms_p50"]
            ok = speedup > factor if provider == "sdpa" else speedup >= factor
            out.append((name, f"{speedup:.2f}× ({tri['ms_p50']:.3g} ms vs {other['ms_p50']:.3g} ms)", _verdict(ok)))
    out.append(_attention_memory(points, [_pick(attention, provider="triton", N_f=n, **shape)
                                          for n in points.attention_N]))
    return out


def _attention_peak(points: Points, row, peak) -> Target:
    F, n_last = points.attention_features, points.attention_N[-1]
    name = (f"cross_stream_attention fwd+bwd at N = {n_last}, d = e = {F}, {points.dtype}: "
            "≥ 50 % of the dense bf16 peak")
    if row is None:
        return name, "not measured", NOT_MEASURED
    if peak:
        pct = 100 * row["tflops"] / peak[0]
        return name, f"{row['tflops']:.1f} TFLOP/s = {pct:.1f} % of {peak[0]:.0f}", _verdict(pct >= 50)
    return name, f"{row['tflops']:.3g} TFLOP/s (no datasheet peak for this device)", NOT_MEASURED


def _attention_memory(points: Points, triton_rows) -> Target:
    """Peak extra bytes over B·N·e·itemsize at each N (the Triton rows, one per N): constant
    within 10 % means O(B·N·e)."""
    B, F, dtype = points.attention_B, points.attention_features, points.dtype
    name = ("cross_stream_attention peak extra memory O(B·N·e): bytes / (B·N·e·itemsize) constant over "
            f"N ∈ {list(points.attention_N)}")
    factors = [tri["peak_mem_bytes"] / (B * n * F * DTYPE_BYTES[dtype])
               for n, tri in zip(points.attention_N, triton_rows)
               if tri is not None and tri.get("peak_mem_bytes") is not None]
    if len(factors) == len(points.attention_N) and len(factors) > 1:
        return name, " → ".join(f"{f:.2f}" for f in factors), _verdict(factors[-1] <= 1.1 * factors[0])
    return name, "not measured (needs CUDA memory statistics)", NOT_MEASURED


def loss_targets(points: Points, losses) -> list[Target]:
    """The losses at the plan's (B, D): speed-ups over eager, the triplet loss's peak memory
    against eager's, and its speed-up over every measured (B, D)."""
    LB, LD, dtype = points.loss_B, points.loss_D, points.dtype
    out = []
    for op, factor in (("cross_modal_triplet_loss", 5.0), ("discriminative_embedding_loss", 3.0)):
        tri = _pick(losses, op=op, provider="triton", mode="full", dtype=dtype, B=LB, D=LD)
        eager = _pick(losses, op=op, provider="eager", mode="full", dtype=dtype, B=LB, D=LD)
        name = f"{op} fwd+bwd at B = {LB}, D = {LD}: ≥ {factor:g}× eager"
        if tri is None or eager is None:
            out.append((name, "not measured", NOT_MEASURED))
            continue
        speedup = eager["ms_p50"] / tri["ms_p50"]
        out.append((name, f"{speedup:.2f}× ({tri['ms_p50']:.3g} ms vs {eager['ms_p50']:.3g} ms)",
                    _verdict(speedup >= factor)))
        if op == "cross_modal_triplet_loss":
            name = f"{op} at B = {LB}, D = {LD}: peak memory ≤ 1/10 of eager"
            if tri.get("peak_mem_bytes") and eager.get("peak_mem_bytes"):
                ratio = tri["peak_mem_bytes"] / eager["peak_mem_bytes"]
                out.append((name, f"{ratio:.3f} of eager", _verdict(ratio <= 0.1)))
            else:
                out.append((name, "not measured (needs CUDA memory statistics)", NOT_MEASURED))
    out.append(_triplet_over_every_shape(losses, dtype))
    return out


def _triplet_over_every_shape(losses, dtype: str) -> Target:
    pairs = []
    for tri in (r for r in losses if r["op"] == "cross_modal_triplet_loss" and r["provider"] == "triton"
                and r["mode"] == "full" and r["dtype"] == dtype):
        eager = _pick(losses, op=tri["op"], provider="eager", mode="full", dtype=dtype, B=tri["B"], D=tri["D"])
        if eager is not None:
            pairs.append((eager["ms_p50"] / tri["ms_p50"], tri["B"], tri["D"]))
    name = "cross_modal_triplet_loss fwd+bwd ≥ 5× eager over every measured (B, D)"
    if not pairs:
        return name, "not measured", NOT_MEASURED
    worst = min(pairs)
    return (name, f"min {worst[0]:.2f}× at B = {worst[1]}, D = {worst[2]} ({len(pairs)} points)",
            _verdict(worst[0] >= 5))


def loader_target(loader) -> Target:
    dali = _pick(loader, backend="dali-gpu")
    torch_loader = _pick(loader, backend="torch")
    name = "DALI GPU loader ≥ 3× the torch DataLoader on every core"
    if dali and torch_loader:
        ratio = dali["clips_per_s"] / torch_loader["clips_per_s"]
        return (name, f"{ratio:.2f}× ({dali['clips_per_s']:.0f} vs {torch_loader['clips_per_s']:.0f} clips/s)",
                _verdict(ratio >= 3))
    measured = f"torch DataLoader {torch_loader['clips_per_s']:.1f} clips/s; " if torch_loader else ""
    return name, measured + "dali-gpu not measured", NOT_MEASURED


E2E_RATIOS = (("ccs-dali", "ccs-synthetic", 0.95, "(a)/(b) ≥ 0.95: the loader never the bottleneck"),
              ("ccs-synthetic", "backbones-synthetic", 0.90, "(b)/(c) ≥ 0.90: CCS cost over the backbones"),
              ("ccs-dali", "eager-fp32-torch", 3.0, "(a)/(d) ≥ 3: end to end vs the eager baseline"))


def e2e_targets(e2e) -> list[Target]:
    rates = {r["case"]: r["clips_per_s"] for r in e2e if "clips_per_s" in r}
    out = []
    for num, den, target, label in E2E_RATIOS:
        if num in rates and den in rates:
            ratio = rates[num] / rates[den]
            out.append((label, f"{ratio:.3f} ({rates[num]:.1f} / {rates[den]:.1f} clips/s)", _verdict(ratio >= target)))
        else:
            out.append((label, "not measured", NOT_MEASURED))
    return out


DEVICE_AGREEMENT = 0.99  # share of pixels within ±1 uint8 level of the CPU path, on every pair


def flow_targets(flow: list[dict]) -> list[Target]:
    """(target, measured, verdict) of issue 15 from ``bench_flow`` rows: pairs/s of the Triton
    path on CUDA, EPE against the ground truth within 1.1× OpenCV's on every pair, ≥ 95 % of
    pixels within ±2 uint8 levels of OpenCV on every pair (these two need cv2.optflow); and,
    with or without OpenCV, the GPU's flow (Triton and eager iteration) against the CPU path on
    the same pairs: ≥ ``DEVICE_AGREEMENT`` of pixels within ±1 uint8 level on every pair."""
    out = []
    name = "tvl1-torch (Triton iteration) ≥ 300 pairs/s at 340×256 on one GPU"
    fast = _pick(flow, kind="speed", provider="tvl1-torch triton", height=256, width=340)
    cv = _pick(flow, kind="speed", flow_device="cpu", height=256, width=340)
    if fast and fast.get("flow_device", "").startswith("cuda"):
        extra = f"; OpenCV on every core {cv['pairs_per_s']:.1f}" if cv and cv["provider"].startswith("opencv") else ""
        out.append((name, f"{fast['pairs_per_s']:.1f} pairs/s (batch {fast['batch']}){extra}",
                    _verdict(fast["pairs_per_s"] >= 300)))
    else:
        out.append((name, "not measured", NOT_MEASURED))
    agree = [r for r in flow if r.get("kind") == "agreement"]
    truth = [r for r in agree if "epe_ratio" in r]
    name = "tvl1-torch EPE against the ground truth ≤ 1.1× OpenCV's on every synthetic pair"
    if truth:
        worst = max(truth, key=lambda r: r["epe_ratio"])
        out.append((name, f"max {worst['epe_ratio']:.3f}× ({worst['pair']}, {len(truth)} pairs)",
                    _verdict(worst["epe_ratio"] <= 1.1)))
    else:
        out.append((name, "not measured", NOT_MEASURED))
    name = "tvl1-torch ≥ 95 % of pixels within ±2 uint8 levels of OpenCV (bound 20) on every pair"
    if agree:
        worst = min(agree, key=lambda r: r["within_2_levels"])
        out.append((name, f"min {100 * worst['within_2_levels']:.1f} % ({worst['pair']}, {len(agree)} pairs)",
                    _verdict(worst["within_2_levels"] >= 0.95)))
    else:
        out.append((name, "not measured", NOT_MEASURED))
    device = [r for r in flow if r.get("kind") == "device-agreement"]
    for impl in ("triton", "eager"):
        rows = [r for r in device if r.get("impl") == impl]
        name = (f"tvl1-torch on the GPU ({impl} iteration) against its CPU path on the same pairs: "
                f"≥ {100 * DEVICE_AGREEMENT:g} % of pixels within ±1 uint8 level on every pair")
        if not rows:
            out.append((name, "not measured", NOT_MEASURED))
            continue
        worst = min(rows, key=lambda r: r["within_1_level"])
        same = min(r["same_levels"] for r in rows)
        identical = sum(bool(r["identical"]) for r in rows)
        truth = [r["epe_ours"] for r in rows if r.get("epe_ours") is not None]
        out.append((name, f"min {100 * worst['within_1_level']:.2f} % ({worst['pair']}, {len(rows)} pairs, "
                          f"{rows[0]['flow_device']}); equal levels ≥ {100 * same:.2f} %; {identical} pairs "
                          f"bit-identical; largest difference {max(r['max_abs_diff_px'] for r in rows):.2g} px"
                          + (f"; EPE against the truth ≤ {max(truth):.3g} px" if truth else ""),
                    _verdict(worst["within_1_level"] >= DEVICE_AGREEMENT)))
    return out


NOT_TAKEN = (
    ("accuracy on the embedded data set (§6)", "`make demo`"),
    ("static targets (executed/useful FLOPs, atomics, glue bytes, spills)", "CPU report, not a GPU figure"),
)
