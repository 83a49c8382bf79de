"""TV-L1 optical flow: ``tvl1-torch`` against OpenCV's DualTVL1OpticalFlow and against its own
CPU path, accuracy and speed.

    python -m bench.bench_flow                        # 340×256, CPU rows (+ CUDA rows on a GPU)
    python -m bench.bench_flow --height 48 --width 64 --pairs 4   # a quick look

The parts, in this order (the target first: a run stopped by a time limit keeps what it took;
each part's rows are appended as soon as they exist, and a part that fails does not stop the
next one, though the exit status is then 1):

1. Speed (rows ``"kind": "speed"``): pairs/s over ``--pairs`` pairs of synthetic frames of
   ``--height``×``--width``: ``tvl1-torch`` on a GPU with the Triton inner iteration, then
   the eager one, in batches of ``--batch``; on CPU (all cores to torch's threads) the eager one.
2. Device agreement (rows ``"kind": "device-agreement"``): the GPU's flow of each accuracy pair
   (below), with the Triton and with the eager iteration, against ``tvl1-torch`` eager on the
   CPU for the same pairs: whether bit-identical, the largest difference in pixels, and the
   share of pixels whose denseflow uint8 levels (``flow_to_uint8``, bound 20) are equal and
   within ±1; with the ground truth's EPE where the pair has one. Without CUDA, under
   ``TRITON_INTERPRET=1`` (the dry run of ``bench.gpu``), the Triton iteration in the
   interpreter stands in for the GPU; otherwise this part is skipped.
3. OpenCV agreement (rows ``"kind": "agreement"``), OpenCV's default parameters, on synthetic
   pairs with known motion (``synthetic_pairs``: integer and sub-pixel translations, a
   rotation (1°), a zoom (2 %) and an occlusion edge, each with its ground-truth flow) and
   frames of the videos ``ccs-fast synth`` writes (``synth_pairs``): mean end-point error
   (EPE) of ours and of OpenCV's against the truth, ours against OpenCV's (mean EPE, share
   within ±2 uint8 levels). Targets (issue 15): EPE ≤ 1.1 × OpenCV's on the ground-truth
   pairs; ≥ 95 % within ±2 levels.
4. OpenCV's speed: pairs/s with one process per core (``cv2.setNumThreads(1)`` in each).

Parts 3 and 4 need ``cv2.optflow`` (opencv-contrib-python-headless); where it is missing (the
bare GPU image) they are skipped with a ``skip <part>: …`` line naming the package, and the
rest runs. ``--params`` overrides OpenCV's TV-L1 parameters for every part (the dry run uses
few iterations); rows record the parameters that differ from the defaults. Rows go to
``bench/results/flow-<device>.json`` with device, versions, date and command.

torch is imported inside the functions that use it: the OpenCV worker processes (spawned)
import this module, and should not pay for torch.
"""
from __future__ import annotations

import multiprocessing
import os
import time
import traceback

import numpy as np

AGREEMENT_LEVELS = 2  # ±2 uint8 levels of the denseflow mapping
OPENCV_CONTRIB = "opencv-contrib-python-headless"


def opencv_tvl1_missing() -> str | None:
    """Why OpenCV's TV-L1 cannot run here (naming the package that brings it), or None."""
    try:
        import cv2
    except ImportError as e:
        return f"cv2 does not import ({e}); needs {OPENCV_CONTRIB}"
    if not hasattr(getattr(cv2, "optflow", None), "DualTVL1OpticalFlow_create"):
        return f"cv2 {cv2.__version__} has no cv2.optflow; needs {OPENCV_CONTRIB}"
    return None


def _texture(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth random texture, float32 0–255, of (h, w)."""
    import cv2

    rng = np.random.default_rng(seed)
    coarse = rng.random((h // 4 + 2, w // 4 + 2)).astype(np.float32)
    img = cv2.GaussianBlur(cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC), (0, 0), 1.0)
    return (img - img.min()) / max(float(img.max() - img.min()), 1e-6) * 235 + 10


def _affine_pair(h, w, seed, dx=0.0, dy=0.0, angle=0.0, zoom=1.0):
    """I0 = a texture, I1 = I0 moved by the affine map (angle in degrees, zoom about the
    centre, then (dx, dy)); the ground truth is that map's displacement of each I0 pixel."""
    import cv2

    pad = 8
    big = _texture(h + 2 * pad, w + 2 * pad, seed)
    M = cv2.getRotationMatrix2D(((w + 2 * pad) / 2, (h + 2 * pad) / 2), angle, zoom)
    M[:, 2] += (dx, dy)
    moved = cv2.warpAffine(big, M, (w + 2 * pad, h + 2 * pad), flags=cv2.INTER_CUBIC,
                           borderMode=cv2.BORDER_REFLECT)
    ys, xs = np.mgrid[0:h + 2 * pad, 0:w + 2 * pad].astype(np.float64)
    gt = np.stack([M[0, 0] * xs + M[0, 1] * ys + M[0, 2] - xs,
                   M[1, 0] * xs + M[1, 1] * ys + M[1, 2] - ys], axis=-1)
    crop = (slice(pad, pad + h), slice(pad, pad + w))
    as_u8 = lambda a: np.clip(np.rint(a), 0, 255).astype(np.uint8)  # noqa: E731
    return as_u8(big[crop]), as_u8(moved[crop]), gt[crop].astype(np.float32)


def _occlusion_pair(h, w, seed, dx=2.0, dy=1.0):
    """A textured square (half the short side) moving by (dx, dy) over a still textured
    background: the ground truth is (dx, dy) on the square in I0 and 0 elsewhere."""
    import cv2

    bg = _texture(h, w, seed)
    fg = _texture(h, w, seed + 1000)
    side = min(h, w) // 2
    y0, x0 = (h - side) // 2, (w - side) // 2
    mask = np.zeros((h, w), np.float32)
    mask[y0:y0 + side, x0:x0 + side] = 1
    M = np.float32([[1, 0, dx], [0, 1, dy]])
    fg1 = cv2.warpAffine(fg, M, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    mask1 = cv2.warpAffine(mask, M, (w, h), flags=cv2.INTER_LINEAR)
    I0 = bg * (1 - mask) + fg * mask
    I1 = bg * (1 - mask1) + fg1 * mask1
    gt = np.zeros((h, w, 2), np.float32)
    gt[mask > 0] = (dx, dy)
    as_u8 = lambda a: np.clip(np.rint(a), 0, 255).astype(np.uint8)  # noqa: E731
    return as_u8(I0), as_u8(I1), gt


def synthetic_pairs(h: int, w: int, seed: int = 0):
    """[(name, I0, I1, ground truth (h, w, 2))]: uint8 grey pairs with known motion."""
    # the same motions at every size: a few pixels per frame, as in action videos at 340×256
    # (the texture's detail is ~4 px at any size; rotation and zoom grow with the frame)
    return [
        ("translate-int", *_affine_pair(h, w, seed, dx=3, dy=-2)),
        ("translate-subpixel", *_affine_pair(h, w, seed + 1, dx=0.25, dy=0.5)),
        ("translate-3.3,2.2", *_affine_pair(h, w, seed + 2, dx=3.3, dy=2.2)),
        ("rotate-1deg", *_affine_pair(h, w, seed + 3, angle=1.0)),
        ("zoom-1.02", *_affine_pair(h, w, seed + 4, zoom=1.02)),
        ("occlusion-edge", *_occlusion_pair(h, w, seed + 5, dx=2.0, dy=1.0)),
    ]


def synth_pairs(size: int, videos: int = 2, seed: int = 0):
    """[(name, I0, I1)]: consecutive grey frames of videos as ``ccs-fast synth`` renders them."""
    import cv2

    from ccs_fast.dataloader.synth import render_video, video_specs

    specs = video_specs(seed=seed, classes=4, videos_per_cell=1, val_videos_per_cell=0,
                        frames=3, size=size)
    out = []
    for spec in specs[:videos]:
        frames = render_video(spec)
        grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
        out.append((f"synth-{spec.name}", grey[0], grey[1]))
    return out


def within_levels(ours: np.ndarray, theirs: np.ndarray, levels: int = AGREEMENT_LEVELS) -> float:
    """Share of pixels whose denseflow uint8 levels (bound 20) differ by ≤ ``levels`` in x and y."""
    from ccs_fast.dataloader.flow import flow_to_uint8

    a, b = flow_to_uint8(ours), flow_to_uint8(theirs)
    diff = np.maximum(np.abs(a[0].astype(int) - b[0]), np.abs(a[1].astype(int) - b[1]))
    return float(np.mean(diff <= levels))


def epe(a: np.ndarray, b: np.ndarray) -> float:
    """Mean end-point error (pixels)."""
    return float(np.linalg.norm(a.astype(np.float64) - b, axis=-1).mean())


def _opencv_one(job):
    import cv2

    cv2.setNumThreads(1)
    (a, b), params = job
    return cv2.optflow.DualTVL1OpticalFlow_create(**params).calc(a, b, None)


def opencv_flow(pairs, params=None, processes: int = 1):
    """OpenCV's TV-L1 of each (I0, I1) (``params`` over ``flow._TVL1_DEFAULTS``), one thread
    per pair; ``processes`` > 1 spreads the pairs over that many processes."""
    from ccs_fast.dataloader.flow import _TVL1_DEFAULTS

    jobs = [(pair, {**_TVL1_DEFAULTS, **(params or {})}) for pair in pairs]
    if processes <= 1 or len(pairs) <= 1:
        return [_opencv_one(job) for job in jobs]
    with multiprocessing.get_context("spawn").Pool(min(processes, len(pairs))) as pool:
        return pool.map(_opencv_one, jobs, chunksize=1)


def torch_flow(pairs, device: str = "cpu", params=None) -> list[np.ndarray]:
    """tvl1-torch flow of each (I0, I1): one batch per frame size."""
    from ccs_fast.dataloader.flow import make_flow_estimator

    estimator = make_flow_estimator("tvl1-torch", device=device, **(params or {}))
    by_size: dict = {}
    for i, (a, _) in enumerate(pairs):
        by_size.setdefault(a.shape, []).append(i)
    out = [None] * len(pairs)
    for idx in by_size.values():
        flows = estimator.batch(np.stack([pairs[i][0] for i in idx]),
                                np.stack([pairs[i][1] for i in idx])).cpu().numpy()
        for i, f in zip(idx, flows):
            out[i] = f
    return out


def agreement_rows(h: int, w: int, device: str = "cpu", synth_size: int | None = None,
                   params=None, processes: int = 1) -> list[dict]:
    """One row per pair: EPE against ground truth (ours, OpenCV) and ours against OpenCV."""
    cases = accuracy_cases(h, w, synth_size)
    theirs = opencv_flow([(a, b) for _, a, b, _ in cases], params, processes)
    ours = torch_flow([(a, b) for _, a, b, _ in cases], device, params)
    rows = []
    for (name, a, _, gt), mine, cv in zip(cases, ours, theirs):
        row = {"kind": "agreement", "pair": name, "height": a.shape[0], "width": a.shape[1],
               "flow_device": device, "epe_vs_opencv": epe(mine, cv),
               "within_2_levels": within_levels(mine, cv)}
        if gt is not None:
            row.update(epe_ours=epe(mine, gt), epe_opencv=epe(cv, gt))
            row["epe_ratio"] = row["epe_ours"] / max(row["epe_opencv"], 1e-9)
        rows.append(row)
    return rows


def accuracy_cases(h: int, w: int, synth_size: int | None = None):
    """[(name, I0, I1, ground truth or None)]: the synthetic pairs, then ``synth`` frames."""
    cases = [(n, a, b, g) for n, a, b, g in synthetic_pairs(h, w)]
    return cases + [(n, a, b, None) for n, a, b in synth_pairs(synth_size or min(h, w))]


def level_shares(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Shares of pixels whose denseflow uint8 levels equal those of ``ref`` in x and y, and
    whose levels are within ±1."""
    from ccs_fast.dataloader.flow import flow_to_uint8

    a, b = flow_to_uint8(ours), flow_to_uint8(ref)
    diff = np.maximum(np.abs(a[0].astype(int) - b[0]), np.abs(a[1].astype(int) - b[1]))
    return float(np.mean(diff == 0)), float(np.mean(diff <= 1))


def device_agreement_rows(h: int, w: int, device: str, impls=("triton", "eager"), params=None,
                          synth_size: int | None = None) -> list[dict]:
    """One row per pair and ``impl``: tvl1-torch on ``device`` with that inner iteration against
    tvl1-torch eager on the CPU, the same pairs in one batch each."""
    import torch

    from ccs_fast.dataloader.flow import _TVL1_DEFAULTS
    from ccs_fast.dataloader.tvl1 import tvl1_flow

    prm = {**_TVL1_DEFAULTS, **(params or {})}
    cases = accuracy_cases(h, w, synth_size)
    by_size: dict = {}
    for i, (_, a, _, _) in enumerate(cases):
        by_size.setdefault(a.shape, []).append(i)

    def flows(dev, impl):
        out = [None] * len(cases)
        for idx in by_size.values():
            a = torch.from_numpy(np.stack([cases[i][1] for i in idx])).to(dev)
            b = torch.from_numpy(np.stack([cases[i][2] for i in idx])).to(dev)
            for i, f in zip(idx, tvl1_flow(a, b, impl=impl, **prm).cpu().numpy()):
                out[i] = f
        return out

    rows = []
    results = {impl: flows(device, impl) for impl in impls}  # the device first, then the CPU's reference
    reference = flows("cpu", "eager")
    for impl, ours in results.items():
        for (name, a, _, gt), mine, ref in zip(cases, ours, reference):
            same, within_1 = level_shares(mine, ref)
            row = {"kind": "device-agreement", "pair": name, "height": a.shape[0], "width": a.shape[1],
                   "flow_device": device, "impl": impl, "reference": "tvl1-torch eager cpu",
                   "identical": bool(np.array_equal(mine, ref)),
                   "max_abs_diff_px": float(np.abs(mine - ref).max()), "epe_vs_cpu": epe(mine, ref),
                   "same_levels": same, "within_1_level": within_1}
            if gt is not None:
                row.update(epe_ours=epe(mine, gt))
            rows.append(row)
    return rows


def _opencv_worker(args):
    import cv2

    cv2.setNumThreads(1)
    a, b = args
    return cv2.optflow.DualTVL1OpticalFlow_create().calc(a, b, None).shape


def speed_pairs(h: int, w: int, pairs: int):
    """Timed pairs: textures moved by (2, 1) px (np.roll), uint8."""
    frames = [_texture(h, w, 100 + i) for i in range(pairs)]
    return [(np.rint(f).astype(np.uint8), np.rint(np.roll(f, (1, 2), (0, 1))).astype(np.uint8))
            for f in frames]


def opencv_speed_row(h: int, w: int, pairs: int, processes: int | None = None) -> dict:
    """pairs/s of OpenCV's TV-L1 with one single-threaded process per core."""
    data = speed_pairs(h, w, pairs)
    cores = processes or os.cpu_count() or 1
    with multiprocessing.get_context("spawn").Pool(cores) as pool:
        pool.map(_opencv_worker, data[:cores])  # start-up and first-call costs out
        t0 = time.perf_counter()
        pool.map(_opencv_worker, data, chunksize=1)
        dt = time.perf_counter() - t0
    return {"kind": "speed", "provider": f"opencv x{cores} processes", "flow_device": "cpu",
            "height": h, "width": w, "pairs": pairs, "seconds": dt, "pairs_per_s": pairs / dt}


def torch_speed_rows(h: int, w: int, pairs: int, batch: int, device: str, params=None,
                     save=None) -> list[dict]:
    """pairs/s of tvl1-torch on ``device``: on CUDA the Triton iteration, then the eager one;
    ``save(rows)`` is called with each row as soon as it is measured."""
    import torch

    from ccs_fast.dataloader.flow import _TVL1_DEFAULTS
    from ccs_fast.dataloader.tvl1 import tvl1_flow

    prm = {**_TVL1_DEFAULTS, **(params or {})}

    data = speed_pairs(h, w, pairs)
    a = torch.from_numpy(np.stack([d[0] for d in data]))
    b = torch.from_numpy(np.stack([d[1] for d in data]))
    rows = []
    for impl in ("triton", "eager") if device.startswith("cuda") else ("eager",):  # the target first
        a_d, b_d = a.to(device), b.to(device)
        tvl1_flow(a_d[:1], b_d[:1], impl=impl, **prm)  # Triton's compile, allocator warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for s in range(0, pairs, batch):
            tvl1_flow(a_d[s:s + batch], b_d[s:s + batch], impl=impl, **prm).cpu()
        dt = time.perf_counter() - t0
        threads = torch.get_num_threads() if device == "cpu" else None
        rows.append({"kind": "speed", "provider": f"tvl1-torch {impl}", "flow_device": device,
                     "torch_threads": threads, "batch": batch, "height": h, "width": w,
                     "pairs": pairs, "seconds": dt, "pairs_per_s": pairs / dt})
        if save:
            save(rows[-1:])
    return rows


def parse_params(text: str) -> dict:
    """``"nscales=1,warps=2"`` → TV-L1 parameters over OpenCV's defaults (ValueError on an unknown name)."""
    from ccs_fast.dataloader.flow import _TVL1_DEFAULTS

    params = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in _TVL1_DEFAULTS:
            raise ValueError(f"--params: unknown TV-L1 parameter {key!r}; known: {', '.join(_TVL1_DEFAULTS)}")
        params[key] = type(_TVL1_DEFAULTS[key])(value)
    return params


def parse_args(argv=None):
    from bench.common import bench_parser

    p = bench_parser(__doc__, prog="python -m bench.bench_flow")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=340)
    p.add_argument("--pairs", type=int, default=16, help="pairs timed per provider")
    p.add_argument("--opencv-pairs", type=int, default=None, help="pairs timed for OpenCV (default --pairs)")
    p.add_argument("--batch", type=int, default=None, help="tvl1-torch pairs per call (default: 8 CPU, 64 CUDA)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present, with CPU rows too)")
    p.add_argument("--skip", default="",
                   help="comma list of parts to leave out: speed, device (device agreement), agreement "
                        "(OpenCV's), opencv (OpenCV's speed), cpu (tvl1-torch's CPU speed)")
    p.add_argument("--params", default="", help="TV-L1 parameters over OpenCV's defaults, e.g. nscales=1,warps=1")
    args = p.parse_args(argv)
    try:
        args.params = parse_params(args.params)
    except ValueError as e:
        p.error(str(e))
    args.skip = set(filter(None, args.skip.split(",")))
    return args


def main(argv=None):
    """The parts in order (module docstring); exit status 1 when one of them failed."""
    args = parse_args(argv)
    import torch

    from bench.common import result_path

    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = "cuda" if cuda else "cpu"
    no_opencv = opencv_tvl1_missing()
    parts = Parts(result_path("flow", device, args.out), row_info(device, no_opencv, args.params))
    if "speed" not in args.skip:
        speed_parts(parts, args, cuda)
    device_part(parts, args, device, cuda)
    opencv_parts(parts, args, device, no_opencv)
    if parts.failed:
        print(f"bench_flow: failed parts: {', '.join(parts.failed)}", flush=True)
        return 1
    return 0


def row_info(device: str, no_opencv: str | None, params: dict) -> dict:
    """What every row carries: device, versions, date and command, OpenCV's presence, the cores
    and the load average at the start (other jobs on the machine), the TV-L1 parameters changed."""
    from bench.common import env_info

    info = env_info(device)
    if no_opencv is None:
        import cv2

        info["opencv"] = cv2.__version__
    info["opencv_tvl1"] = no_opencv is None
    info["cpu_cores"] = os.cpu_count()
    info["load_avg_1min_at_start"] = round(os.getloadavg()[0], 2)  # other jobs on the machine
    if params:
        info["tvl1_params"] = params
    return info


class Parts:
    """The parts of one run: each part's rows appended as soon as they exist (a stage may be
    stopped), and a part that fails reported while the next one still runs."""

    def __init__(self, path, info: dict):
        self.path, self.info, self.failed = path, info, []

    def save(self, rows, columns=None):
        from bench.common import append_rows, print_table

        if columns:
            print_table(rows, columns)
        append_rows(self.path, [{**r, **self.info} for r in rows])
        print(f"appended {len(rows)} rows to {self.path}", flush=True)

    def run(self, name, part):
        try:
            part()
        except Exception:  # noqa: BLE001 - any failure of one part: the others still run
            traceback.print_exc()
            print(f"failed {name}", flush=True)
            self.failed.append(name)


SPEED_COLUMNS = ["provider", "flow_device", "batch", "pairs", "seconds", "pairs_per_s"]


def speed_parts(parts: Parts, args, cuda: bool) -> None:
    """tvl1-torch's pairs/s: on CUDA (when present), then on CPU (unless ``--skip cpu``)."""
    from bench.common import print_table

    for d in (["cuda"] if cuda else []) + ([] if "cpu" in args.skip else ["cpu"]):
        batch = args.batch or (64 if d == "cuda" else 8)
        parts.run(f"speed {d}", lambda d=d, batch=batch: print_table(
            torch_speed_rows(args.height, args.width, args.pairs, batch, d, args.params, parts.save), SPEED_COLUMNS))


def device_part(parts: Parts, args, device: str, cuda: bool) -> None:
    """The GPU's flow against the CPU path; without CUDA the Triton iteration in the interpreter
    stands in, under TRITON_INTERPRET=1 only."""
    if "device" in args.skip:
        return
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("skip device: no CUDA device (the Triton iteration on CPU needs TRITON_INTERPRET=1)", flush=True)
        return
    impls = ("triton", "eager") if cuda else ("triton",)
    parts.run("device", lambda: parts.save(device_agreement_rows(args.height, args.width, device, impls, args.params),
                                           ["pair", "impl", "identical", "max_abs_diff_px", "epe_vs_cpu",
                                            "same_levels", "within_1_level", "epe_ours"]))


def opencv_parts(parts: Parts, args, device: str, no_opencv: str | None) -> None:
    """Agreement with OpenCV's TV-L1 and OpenCV's pairs/s; a ``skip`` line each, naming the
    package, where cv2.optflow is missing."""
    for name in ("agreement", "opencv"):
        if name not in args.skip and no_opencv:
            print(f"skip {name}: OpenCV's TV-L1 ({no_opencv})", flush=True)
    if no_opencv:
        return
    if "agreement" not in args.skip:
        parts.run("agreement", lambda: parts.save(
            agreement_rows(args.height, args.width, device=device, params=args.params, processes=os.cpu_count() or 1),
            ["pair", "epe_ours", "epe_opencv", "epe_ratio", "epe_vs_opencv", "within_2_levels"]))
    if "speed" not in args.skip and "opencv" not in args.skip:
        parts.run("opencv", lambda: parts.save(
            [opencv_speed_row(args.height, args.width, args.opencv_pairs or args.pairs)], SPEED_COLUMNS))

if __name__ == "__main__":
    raise SystemExit(main())
