"""The embedded default data set (SPEC §6): a Latin square of appearance and motion.

Every video shows one disk on a darker, faintly textured background. The disk has an
*appearance* ``a`` (a hue) and a *motion* ``m`` (how the luminance texture inside it moves);
its class is ``(a + m) mod C``. Each stream alone sees one factor only, and the class is
independent of each factor alone, so RGB alone, flow alone and any late fusion of the two
score chance; a network in which the streams exchange features can reach ~100 %.

How each factor is hidden from the other stream:

* Appearance is invisible to flow. The C hues are isoluminant: the disk's RGB is its grey
  value plus a chroma vector orthogonal to the luminance weights, and each pixel is then
  nudged so that ``cv2.cvtColor(RGB2GRAY)`` (what flow is computed on) returns *exactly* the
  grey frame the scene defines. The grey video, hence its flow, does not depend on ``a``.
* Motion is invisible to any single frame and, in practice, to averages over frames. The
  disk does not move: its isotropic random texture drifts (up, down, sideways) or spins
  inside it, at a random speed, from a random phase, so every frame on its own has the same
  distribution under every motion. No trajectory footprint exists (a moving object would
  show its axis in the spread of its positions); up and down are each other's time reverse,
  sideways and spin their own. Only frame-to-frame correspondence (flow) tells motions apart:
  a probe CNN on averaged features of 3 frames scores chance on ``m``.
* Motions are unchanged by a horizontal flip (sideways and spin take a random sign), so the
  standard flip augmentation (SPEC §4) never changes a label. The disk stays near the centre
  so every multi-scale corner crop still shows most of it.

Files (``make_synthetic_dataset``): ``videos/<Class>/<name>.webm`` (VP9, VP8 where PyAV lacks
it), ``rawframes/<Class>/<name>/`` (``flow.write_rawframes``), MMAction2 annotation lists,
UCF-101-style split files and ``meta.json``. Everything follows from ``seed``: each video draws
from its own ``numpy`` generator seeded by ``(seed, index)``, so worker scheduling does not
matter.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from ccs_fast.base.atomic import atomic_path, is_temporary, write_text
from ccs_fast.base.errors import CCSError, bad_file

from .flow import FLOW_BOUND, write_rawframes
from .rawframes import RAWFRAMES_FOLDER, FrameNaming, frames_dir_name

MOTIONS = ("up", "down", "sideways", "spin")  # motion m -> name; all invariant to h-flip
MAX_CLASSES = len(MOTIONS)

# Luminance weights of cv2.COLOR_RGB2GRAY (BT.601), which the flow is computed on.
_LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class VideoSpec:
    """Everything that defines one video; ``render_video`` turns it into frames."""

    index: int          # position in the data set; with the seed it seeds the video's RNG
    name: str           # file stem, e.g. "v_Action02_0007"
    class_name: str
    label: int          # (appearance + motion) % classes, 0-based
    appearance: int
    motion: int
    split: str          # "train" or "val"
    seed: int
    classes: int
    frames: int
    size: int


def class_names(classes: int) -> list[str]:
    """``Action00``, ``Action01``, …: names that say nothing about appearance or motion."""
    return [f"Action{k:02d}" for k in range(classes)]


def _hue_chroma(appearance: int, classes: int, amplitude: float) -> np.ndarray:
    """An RGB offset of zero luminance; the ``classes`` hues are evenly spaced in angle."""
    luma = _LUMA / np.linalg.norm(_LUMA)
    u = np.array([1.0, -1.0, 0.0])
    u -= u.dot(luma) * luma
    u /= np.linalg.norm(u)
    w = np.cross(luma, u)
    angle = 2.0 * math.pi * appearance / classes + math.pi / 12.0
    chroma = math.cos(angle) * u + math.sin(angle) * w
    chroma -= chroma.dot(_LUMA) / _LUMA.dot(_LUMA) * _LUMA  # exact zero for the BT.601 weights
    return amplitude * chroma / np.abs(chroma).max()


def _match_grey(rgb: np.ndarray, grey: np.ndarray) -> np.ndarray:
    """Nudge blue (then green) until ``cv2.cvtColor(rgb, RGB2GRAY) == grey`` exactly.

    Rounding the coloured pixels to uint8 moves their grey value by at most one level; blue has
    the smallest luminance weight, so single steps of it walk back to the target.
    """
    rgb = rgb.astype(np.int16)
    for _ in range(64):
        error = grey.astype(np.int16) - cv2.cvtColor(rgb.astype(np.uint8), cv2.COLOR_RGB2GRAY)
        if not error.any():
            return rgb.astype(np.uint8)
        step = np.sign(error)
        blue_free = (rgb[..., 2] + step >= 0) & (rgb[..., 2] + step <= 255)
        rgb[..., 2] += np.where(blue_free, step, 0).astype(np.int16)
        rgb[..., 1] += np.where(blue_free, 0, step).astype(np.int16)
        np.clip(rgb, 0, 255, out=rgb)
    raise RuntimeError("could not match the grey frame exactly")


def _texture(rng: np.random.Generator, size: int, components: int = 12):
    """An isotropic random luminance texture as a sum of plane waves: (k, phase, amplitude)."""
    wavelength = rng.uniform(0.08, 0.22, components) * size
    orientation = rng.uniform(0.0, 2.0 * math.pi, components)
    k = (2.0 * math.pi / wavelength)[:, None] * np.stack(
        [np.cos(orientation), np.sin(orientation)], axis=1)
    return k, rng.uniform(0.0, 2.0 * math.pi, components), rng.uniform(0.5, 1.0, components)


def _eval_texture(texture, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    k, phase, amplitude = texture
    arg = k[:, 0, None, None] * x + k[:, 1, None, None] * y + phase[:, None, None]
    value = np.tensordot(amplitude, np.cos(arg), axes=1)
    return value / math.sqrt(0.5 * np.sum(amplitude ** 2))  # unit standard deviation


def render_video(spec: VideoSpec, appearance: int | None = None) -> np.ndarray:
    """The video of ``spec`` as (frames, size, size, 3) uint8 RGB.

    Everything but the hue is drawn from the video's own generator before ``appearance`` is
    used, so ``render_video(spec, a)`` for two values of ``a`` gives the same grey frames.
    """
    appearance = spec.appearance if appearance is None else appearance
    rng = np.random.default_rng([spec.seed, spec.index])
    size, frames = spec.size, spec.frames
    unit = size / 64.0  # sizes below were tuned at 64×64 and scale with the frame

    background_luma = rng.uniform(45.0, 75.0)
    disk_luma = rng.uniform(125.0, 150.0)
    radius = 0.26 * size
    centre = size / 2.0 + rng.uniform(-0.08, 0.08, 2) * size
    speed = rng.uniform(1.5, 3.0) * unit  # pixels per frame, in the flow's sweet spot
    texture = _texture(rng, size)
    background_texture = _texture(rng, size)
    noise = rng.normal(0.0, 2.0, (frames, size, size))

    motion = MOTIONS[spec.motion]
    sign = rng.choice([-1.0, 1.0])
    tilt = rng.uniform(-math.pi / 12.0, math.pi / 12.0)  # ±15° so directions are not exact
    if motion == "spin":
        velocity = np.zeros(2)
        omega = sign * speed / (0.6 * radius)  # radians per frame; `speed` at 0.6 radius
    else:
        direction = {"up": -math.pi / 2, "down": math.pi / 2,
                     "sideways": 0.0 if sign > 0 else math.pi}[motion] + tilt
        velocity = speed * np.array([math.cos(direction), math.sin(direction)])
        omega = 0.0

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = xx - centre[0], yy - centre[1]
    mask = np.clip(radius + 0.5 - np.hypot(dx, dy), 0.0, 1.0)  # anti-aliased disk edge
    background = background_luma + 5.0 * _eval_texture(background_texture, xx, yy)

    grey = np.empty((frames, size, size), np.float64)
    for t in range(frames):
        # The texture moves by +velocity*t and turns by +omega*t about the centre, so pixel p
        # shows at time t what was at R(-omega*t)(p - centre) + centre - velocity*t at 0.
        cos_r, sin_r = math.cos(-omega * t), math.sin(-omega * t)
        sx = centre[0] + cos_r * dx - sin_r * dy - velocity[0] * t
        sy = centre[1] + sin_r * dx + cos_r * dy - velocity[1] * t
        disk = disk_luma + 22.0 * _eval_texture(texture, sx, sy)
        grey[t] = mask * disk + (1.0 - mask) * background + noise[t]
    grey = np.clip(np.rint(grey), 20, 235).astype(np.uint8)

    chroma = _hue_chroma(appearance, spec.classes, amplitude=45.0)
    rgb = grey[..., None].astype(np.float64) + mask[None, :, :, None] * chroma
    rgb = np.clip(np.rint(rgb), 0, 255)
    return np.stack([_match_grey(rgb[t], grey[t]) for t in range(frames)])


# --- the data set on disk -------------------------------------------------------------------

# Defaults sized for the 2-core CPU demo: ~0.17 CPU-s per video (TV-L1 below, JPEG, VP9), so
# the 468 default videos take ~45 s on two idle cores.
DEFAULT_CLASSES = 3
DEFAULT_VIDEOS_PER_CELL = 40        # training videos per (appearance, motion) cell
DEFAULT_VAL_VIDEOS_PER_CELL = 12    # validation videos per cell
DEFAULT_FRAMES = 12                 # 11 flow pairs: room for K=3 segments of L=5 pairs
DEFAULT_SIZE = 64                   # pixels, square
DEFAULT_FPS = 25
# TV-L1 with a 3-level pyramid and a looser stopping threshold: on these 64×64 scenes its flow
# is within 0.12 px (mean endpoint error) of a converged TV-L1 (20 outer iterations, 8 warps)
# at 0.012 CPU-s per pair, against 0.084 s for OpenCV's defaults (which are within 0.02 px).
SYNTH_TVL1_PARAMS = dict(nscales=3, epsilon=0.05)
SYNTH_FLOW_METHODS = ("tvl1", "farneback")  # synth's --flow: OpenCV's two, on the CPU
META_FORMAT = "ccs_fast.synth/1"
VIDEOS_FOLDER = "videos"  # beside rawframes.RAWFRAMES_FOLDER
_OPTIONS_FILE = ".synth_options.json"


def video_specs(*, seed: int, classes: int, videos_per_cell: int, val_videos_per_cell: int,
                frames: int, size: int) -> list[VideoSpec]:
    """All videos of the data set in file order: split, then class, then name.

    Every (appearance, motion) cell holds ``videos_per_cell`` training and
    ``val_videos_per_cell`` validation videos, so each class holds C cells of each split.
    """
    names = class_names(classes)
    cells = []
    for split, per_cell in (("train", videos_per_cell), ("val", val_videos_per_cell)):
        for appearance in range(classes):
            for motion in range(classes):
                cells += [(split, appearance, motion)] * per_cell
    # Order inside a class by a seeded shuffle so names do not give the cell away.
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(cells))
    cells = [cells[i] for i in order]
    cells.sort(key=lambda cell: (cell[0] != "train", (cell[1] + cell[2]) % classes))
    counters = [0] * classes
    specs = []
    for index, (split, appearance, motion) in enumerate(cells):
        label = (appearance + motion) % classes
        counters[label] += 1
        specs.append(VideoSpec(
            index=index, name=f"v_{names[label]}_{counters[label]:04d}",
            class_name=names[label], label=label, appearance=appearance, motion=motion,
            split=split, seed=seed, classes=classes, frames=frames, size=size))
    return specs


def pick_video_codec() -> str:
    """``libvpx-vp9`` where PyAV can encode it, else ``libvpx`` (VP8): DALI's CPU decoder
    reads VP8/VP9/MJPEG only."""
    import av

    for codec in ("libvpx-vp9", "libvpx"):
        try:
            av.codec.Codec(codec, "w")
            return codec
        except Exception:  # PyAV raises UnknownCodecError or ValueError depending on version
            continue
    raise RuntimeError("PyAV can encode neither VP9 (libvpx-vp9) nor VP8 (libvpx)")


def write_webm(frames_rgb: Sequence[np.ndarray], path: str | os.PathLike, *,
               codec: str = "libvpx-vp9", fps: int = DEFAULT_FPS) -> None:
    """Encode RGB frames into a WebM file; the file appears (by rename) only when complete."""
    import av

    height, width = frames_rgb[0].shape[:2]
    with atomic_path(path) as tmp:
        # bitexact: no muxing date or random track UIDs, so a seed gives the same bytes.
        with av.open(str(tmp), mode="w", format="webm",
                     options={"fflags": "+bitexact"}) as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            # Constant quality, one thread: near-lossless at this size and byte-reproducible.
            stream.options = {"crf": "10", "b:v": "0", "threads": "1", "cpu-used": "4"}
            for rgb in frames_rgb:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))


def _make_video(spec: VideoSpec, root: str, flow: str, flow_params: dict, codec: str,
                fps: int, naming: FrameNaming = FrameNaming()) -> bool:
    """Worker: render one video and write its webm and rawframes, skipping finished parts.

    Returns whether anything was written (False: both already existed from an earlier run).
    """
    from .flow import make_flow_estimator

    cv2.setNumThreads(1)  # the pool already uses every core
    root_path = Path(root)
    video = f"{spec.class_name}/{spec.name}.webm"
    frame_dir = root_path / RAWFRAMES_FOLDER / frames_dir_name(video)
    video_path = root_path / VIDEOS_FOLDER / video
    if frame_dir.is_dir() and video_path.is_file():
        return False
    frames = render_video(spec)
    if not video_path.is_file():
        write_webm(frames, video_path, codec=codec, fps=fps)
    if not frame_dir.is_dir():
        write_rawframes(frames, frame_dir, make_flow_estimator(flow, **flow_params),
                        naming=naming)
    return True


def _remove_stale_temporaries(root: Path) -> None:
    """Delete what a killed run left half-written: hidden temporary videos
    and frame folders (``atomic.is_temporary``: ``atomic_path`` and ``atomic_dir``)."""
    for top in (VIDEOS_FOLDER, RAWFRAMES_FOLDER):
        for class_dir in (root / top).glob("*"):
            for stale in [path for path in class_dir.glob(".*") if is_temporary(path.name)]:
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)


def _count_written(results, bar) -> int:
    written = 0
    for wrote in results:
        written += wrote
        if bar is not None:
            bar.update()
    return written


def _write_text(path: Path, lines: Sequence[str]) -> None:
    write_text(path, "".join(line + "\n" for line in lines))


def _write_lists(root: Path, specs: Sequence[VideoSpec], names: Sequence[str]) -> None:
    train = [s for s in specs if s.split == "train"]
    val = [s for s in specs if s.split == "val"]
    for directory in ("annotations", "splits"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    for split, items in (("train", train), ("val", val)):
        # MMAction2: `frame_dir total_frames label` and `path label`, 0-based labels.
        _write_text(root / "annotations" / f"{split}_rawframes.txt",
                    [f"{s.class_name}/{s.name} {s.frames} {s.label}" for s in items])
        _write_text(root / "annotations" / f"{split}_videos.txt",
                    [f"{s.class_name}/{s.name}.webm {s.label}" for s in items])
    # UCF-101 official split files: 1-based class indices, no label in the test list.
    _write_text(root / "splits" / "classInd.txt", [f"{i + 1} {n}" for i, n in enumerate(names)])
    _write_text(root / "splits" / "trainlist01.txt",
                [f"{s.class_name}/{s.name}.webm {s.label + 1}" for s in train])
    _write_text(root / "splits" / "testlist01.txt", [f"{s.class_name}/{s.name}.webm" for s in val])


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    classes: int = DEFAULT_CLASSES,
    videos_per_cell: int = DEFAULT_VIDEOS_PER_CELL,
    val_videos_per_cell: int = DEFAULT_VAL_VIDEOS_PER_CELL,
    frames: int = DEFAULT_FRAMES,
    size: int = DEFAULT_SIZE,
    flow: str = "tvl1",
    workers: int | None = None,
    fps: int = DEFAULT_FPS,
    progress: bool = False,
    naming: FrameNaming | None = None,
) -> dict:
    """Write the Latin-square data set (module docstring) under ``out_dir``; return a summary.

    ``classes`` C in 2..4 (C appearances × C motions, C² cells); ``frames`` per video (≥ 2);
    ``size`` the square frame side (even, ≥ 16); ``flow`` ``"tvl1"`` (SPEC) or ``"farneback"``
    (fast, for tests); ``workers`` processes (default: every CPU core). Re-running with the
    same options resumes: finished videos are kept. Different options on an existing folder
    raise ``CCSError``. ``naming``: the rawframes' file names (``rawframes.FrameNaming``,
    MMAction2's filename_tmpl, flow_tmpl and start_index; default img_00001.jpg,
    flow_x_00001.jpg), recorded in the options when not the default.
    """
    _check_options(classes, videos_per_cell, val_videos_per_cell, frames, size, flow)
    start = time.perf_counter()
    root = Path(out_dir)
    codec = pick_video_codec()
    flow_params = SYNTH_TVL1_PARAMS if flow == "tvl1" else {}
    options = dict(format=META_FORMAT, seed=seed, classes=classes,
                   videos_per_cell=videos_per_cell, val_videos_per_cell=val_videos_per_cell,
                   frames=frames, size=size, flow=flow, flow_params=flow_params,
                   flow_bound=FLOW_BOUND, codec=codec, fps=fps)
    naming = naming or FrameNaming()
    if naming != FrameNaming():
        options.update(filename_tmpl=naming.filename_tmpl, flow_tmpl=naming.flow_tmpl,
                       start_index=naming.start_index)
    _claim_folder(root, options)

    names = class_names(classes)
    specs = video_specs(seed=seed, classes=classes, videos_per_cell=videos_per_cell,
                        val_videos_per_cell=val_videos_per_cell, frames=frames, size=size)
    workers = max(1, min(workers or os.cpu_count() or 1, len(specs)))
    jobs = [(spec, str(root), flow, flow_params, codec, fps, naming) for spec in specs]
    made = _make_videos(jobs, workers, progress)
    _write_lists(root, specs, names)
    _write_meta(root, options, names, specs)
    return dict(
        out_dir=str(root), seed=seed, classes=classes, class_names=names,
        chance=1.0 / classes, frames=frames, size=size, flow=flow, codec=codec,
        train_videos=sum(s.split == "train" for s in specs),
        val_videos=sum(s.split == "val" for s in specs),
        videos_written=made, videos_kept=len(specs) - made, workers=workers,
        seconds=round(time.perf_counter() - start, 2),
    )


def _check_options(classes: int, videos_per_cell: int, val_videos_per_cell: int, frames: int, size: int,
                   flow: str) -> None:
    if not 2 <= classes <= MAX_CLASSES:
        raise CCSError(f"synth: --classes must be between 2 and {MAX_CLASSES}, got {classes}")
    if videos_per_cell < 1 or val_videos_per_cell < 1:
        raise CCSError("synth: every (appearance, motion) cell needs at least one training "
                       f"and one validation video, got {videos_per_cell} and "
                       f"{val_videos_per_cell}")
    if frames < 2:
        raise CCSError(f"synth: --frames must be at least 2 (one flow pair), got {frames}")
    if size < 16 or size % 2:
        raise CCSError(f"synth: --size must be even and at least 16, got {size}")
    if flow not in SYNTH_FLOW_METHODS:
        raise CCSError(f"synth: --flow must be {' or '.join(SYNTH_FLOW_METHODS)}, got {flow!r}")


def _claim_folder(root: Path, options: dict) -> None:
    """Make ``root`` this data set's folder: refused when it holds another data set or
    anything else; its options file written, a killed run's temporaries removed."""
    options_path = root / _OPTIONS_FILE
    if options_path.is_file():
        try:
            previous = json.loads(options_path.read_text())
        except (OSError, ValueError) as error:
            raise bad_file(options_path, f"unreadable ({error}); delete it or the folder")
        if previous != options:
            changed = sorted(k for k in options if previous.get(k) != options[k])
            raise bad_file(root, f"holds a synthetic data set made with other options "
                                 f"({', '.join(changed)}); pick another --out or delete it")
    elif root.is_dir() and any(root.iterdir()):
        raise bad_file(root, "exists and is not a synthetic data set; pick another --out")
    root.mkdir(parents=True, exist_ok=True)
    _write_text(options_path, [json.dumps(options, sort_keys=True)])
    _remove_stale_temporaries(root)


def _make_videos(jobs: list, workers: int, progress: bool) -> int:
    """Run ``_make_video`` on every job (here, or in a pool of ``workers`` processes);
    the number of videos written."""
    from .progress import VideoProgress

    bar = VideoProgress(len(jobs), "synth") if progress else None
    if workers == 1:
        made = _count_written((_make_video(*job) for job in jobs), bar)
    else:
        import multiprocessing

        # fork, as torch's DataLoader does: spawned workers would re-import torch (seconds
        # each, via ccs_fast.dataloader). Workers never touch torch, and cv2 runs one thread.
        start_method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(start_method)
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            made = _count_written(pool.map(_make_video, *zip(*jobs), chunksize=4), bar)
    if bar is not None:
        bar.close()
    return made


def _write_meta(root: Path, options: dict, names: Sequence[str], specs: Sequence[VideoSpec]) -> None:
    classes = options["classes"]
    meta = dict(
        options,
        class_names=names,
        chance=1.0 / classes,
        label_rule="label = (appearance + motion) % classes",
        motions=list(MOTIONS[:classes]),
        appearance_chroma_angle_degrees=[round(360.0 * a / classes + 15.0, 3)
                                         for a in range(classes)],
        videos=[dict(name=s.name, class_name=s.class_name, label=s.label,
                     appearance=s.appearance, motion=s.motion, split=s.split, frames=s.frames)
                for s in specs],
    )
    _write_text(root / "meta.json", [json.dumps(meta, indent=1)])
