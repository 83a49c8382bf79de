"""The GPU kit: the wheels the bare GPU image lacks, in parts that travel, checked and installed
beside the machine's own packages.

    python -m bench.kit make runs/gpu-kit-download --out .device_wheels   # `make gpu-kit`
    python -m bench.kit check .device_wheels                               # which wheels are complete
    python -m bench.kit calls .device_wheels --only opencv-contrib-python-headless  # carry lists
    python -m bench.kit install .device_wheels --target /tmp/kit           # what `bench.gpu --kit` runs

The bare GPU image (README, "Taking the GPU figures") has torch, triton, torchvision, timm,
opencv-python-headless (no contrib modules), numpy, pytest, pytest-benchmark, matplotlib,
tensorboard, tqdm and pyyaml, and no PyAV, no DALI, no opencv-contrib; nothing can be
installed there from a registry, and files reach it in pieces of at most 60 MiB.

``make`` cuts every wheel of a download folder (less those the image has, ``IMAGE_HAS``) into
parts of at most ``PART_BYTES`` named ``<wheel>.part000``, ``.part001``, … and writes
``manifest.json``: per wheel its name, size and SHA-256, and each part's name, size and
SHA-256. ``install`` checks the parts that arrived, refuses a bad one in one line (its wheel
stays out), joins the complete wheels, checks each whole wheel's SHA-256 and installs them with
``pip install --no-deps --no-index --target``:

- into ``<target>/site``, a folder ``bench.gpu`` puts on ``PYTHONPATH`` of every stage, the
  wheels whose distribution this Python does not have (a wheel of an installed distribution is
  left out: the machine's torch, numpy and OpenCV are never shadowed);
- opencv-contrib-python-headless, which holds a module the machine already has (``cv2``), into
  ``<target>/cv2`` of its own, only where the machine's ``cv2`` lacks ``cv2.optflow``, only
  where the wheel's numpy requirement holds for the machine's numpy, and only after a child
  Python with that folder first on its path imported it from there and ran one TV-L1; ``bench.gpu``
  puts that folder first on the path of the stages that compare with OpenCV's TV-L1
  (``flow`` and the two test stages) and of no other, so that the loader and end-to-end figures keep
  the machine's own OpenCV.

It writes ``<target>/kit.json`` (the folders for ``PYTHONPATH`` and one line per wheel), the
file ``bench.gpu`` reads. A partial kit installs what it completes. This module needs only the
standard library (``make`` runs on any machine with Python 3).

Exit status: 0; 1 for ``check`` when a wheel is incomplete; 2 for a missing or unreadable
manifest or bad arguments (one line on stderr).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

PART_BYTES = 60 * 2**20  # the largest file the device tool carries
MANIFEST = "manifest.json"
KIT_JSON = "kit.json"
CHUNK = 1 << 20

# Distributions the bare GPU image holds (its package list, the ones a kit download can pull in
# as dependencies): never put into a kit, so that a kit cannot shadow the machine's own.
IMAGE_HAS = frozenset({
    "torch", "triton", "torchvision", "timm", "opencv-python-headless", "opencv-python", "numpy",
    "pytest", "pytest-benchmark", "matplotlib", "tensorboard", "tqdm", "pyyaml", "packaging", "six",
    "setuptools", "wheel", "pillow", "typing-extensions", "filelock", "fsspec", "jinja2",
    "markupsafe", "networkx", "sympy", "mpmath", "protobuf", "pip",
})

# What each kit wheel adds on the bare machine (README, "Taking the GPU figures").
ADDS = {
    "av": "PyAV: no stage of `make gpu` needs it; the video paths (ccs-fast synth, prepare and predict, "
          "the torch loader's video modality) then run on the machine",
    "nvidia-dali-cuda130": "DALI: the `dali` stage (dali-gpu and dali-cpu loader rows, e2e case (a))",
    "opencv-contrib-python-headless": "cv2.optflow: OpenCV's TV-L1 in the `flow` stage (agreement, "
                                      "EPE ratio, OpenCV pairs/s) and test_tvl1's OpenCV cases",
}
DALI_DEPENDENCY = "a dependency of nvidia-dali-cuda130"

# Distributions whose module the machine already has under another distribution's name.
SHADOWS = {"opencv-contrib-python-headless": "cv2"}


class KitError(Exception):
    """A kit folder that cannot be used at all (no manifest, unreadable manifest)."""


def dist_name(wheel: str) -> str:
    """Normalised distribution name of a wheel file name (PEP 503): ``nvidia_dali_cuda130-2.4.0-…``
    → ``nvidia-dali-cuda130``."""
    return re.sub(r"[-_.]+", "-", Path(wheel).name.split("-")[0]).lower()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def adds(dist: str) -> str:
    return ADDS.get(dist, DALI_DEPENDENCY)


# ----------------------------------------------------------------------------- making a kit

def make_kit(src: Path, out: Path, part_bytes: int = PART_BYTES, image_has=IMAGE_HAS) -> dict:
    """Cut every wheel of ``src`` (less those of ``image_has``) into parts of at most
    ``part_bytes`` under ``out`` and write ``out/manifest.json``; parts of earlier kits that
    the new manifest does not name are removed. Returns the manifest."""
    if part_bytes <= 0:
        raise ValueError(f"part size must be positive, got {part_bytes}")
    wheels = sorted(p for p in Path(src).glob("*.whl") if dist_name(p.name) not in image_has)
    if not wheels:
        raise KitError(f"{src}: no wheel to put into a kit")
    seen: dict[str, str] = {}
    for wheel in wheels:
        other = seen.setdefault(dist_name(wheel.name), wheel.name)
        if other != wheel.name:
            raise KitError(f"{src}: two wheels of {dist_name(wheel.name)} ({other}, {wheel.name}); keep one")
    out.mkdir(parents=True, exist_ok=True)
    entries, keep = [], {MANIFEST}
    for wheel in wheels:
        whole = hashlib.sha256()
        parts = []
        with open(wheel, "rb") as f:
            while True:
                data = f.read(part_bytes)
                if not data and parts:
                    break
                whole.update(data)
                name = f"{wheel.name}.part{len(parts):03d}"
                (out / name).write_bytes(data)
                parts.append({"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
                keep.add(name)
                if len(data) < part_bytes:
                    break
        entries.append({"wheel": wheel.name, "dist": dist_name(wheel.name), "size": wheel.stat().st_size,
                        "sha256": whole.hexdigest(), "adds": adds(dist_name(wheel.name)), "parts": parts})
    for stale in out.glob("*.whl.part*"):
        if stale.name not in keep:
            stale.unlink()
    manifest = {"format": 1, "part_bytes": part_bytes, "wheels": entries}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(out / MANIFEST)
    return manifest


def plan_calls(kit: Path, room_bytes: int = 62 * 2**20, per_call: int = 7, only=None) -> list[list[str]]:
    """The kit's files grouped for the device tool's calls: each group at most ``room_bytes``
    (what a call carries beside the checkout) and ``per_call`` paths (a call names at most 8);
    ``manifest.json`` in the first. ``only``: distributions to take (default all), in the order
    given, each wheel's parts together where they fit; the rest of the kit stays behind."""
    manifest = read_manifest(kit)
    wheels = manifest["wheels"]
    if only:
        order = {d: i for i, d in enumerate(only)}
        unknown = set(only) - {w.get("dist") or dist_name(w["wheel"]) for w in wheels}
        if unknown:
            raise KitError(f"{kit}: the kit holds no wheel of {', '.join(sorted(unknown))}")
        wheels = sorted((w for w in wheels if (w.get("dist") or dist_name(w["wheel"])) in order),
                        key=lambda w: order[w.get("dist") or dist_name(w["wheel"])])
    manifest_size = (Path(kit) / MANIFEST).stat().st_size
    calls: list[list[str]] = [[MANIFEST]]
    room = [room_bytes - manifest_size]
    for w in wheels:
        for p in w["parts"]:
            if p["size"] > room_bytes:
                raise KitError(f"{kit}: part {p['name']} ({p['size']} bytes) is larger than a call carries")
            for i, group in enumerate(calls):
                if room[i] >= p["size"] and len(group) < per_call:
                    group.append(p["name"])
                    room[i] -= p["size"]
                    break
            else:
                calls.append([p["name"]])
                room.append(room_bytes - p["size"])
    return calls


# ----------------------------------------------------------------------------- checking and joining

def read_manifest(kit: Path) -> dict:
    path = Path(kit) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        wheels = manifest["wheels"]
        for w in wheels:
            w["wheel"], w["size"], w["sha256"]
            for p in w["parts"]:
                p["name"], p["size"], p["sha256"]
    except FileNotFoundError:
        raise KitError(f"{path}: no manifest (make it with `make gpu-kit`)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KitError(f"{path}: not a kit manifest ({type(e).__name__}: {e})") from None
    return manifest


@dataclass
class Checked:
    """The manifest's wheels split by whether every part arrived intact, and one line per
    missing or refused part."""

    complete: list[dict] = field(default_factory=list)
    incomplete: list[dict] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


def check_kit(kit: Path) -> Checked:
    """Each part of each wheel: present, of its size and SHA-256. A wheel with a missing or bad
    part is incomplete; a bad part gets one line saying why it was refused."""
    kit = Path(kit)
    result = Checked()
    for w in read_manifest(kit)["wheels"]:
        missing, bad = [], []
        for p in w["parts"]:
            path = kit / p["name"]
            if not path.is_file():
                missing.append(p["name"])
                continue
            size = path.stat().st_size
            if size != p["size"]:
                bad.append(f"kit: refused {p['name']}: {size} bytes, the manifest says {p['size']}")
                continue
            digest = sha256_file(path)
            if digest != p["sha256"]:
                bad.append(f"kit: refused {p['name']}: sha256 {digest[:16]}…, the manifest says {p['sha256'][:16]}…")
        result.lines += bad
        if missing or bad:
            result.incomplete.append(w)
            if missing:
                result.lines.append(f"kit: {w['wheel']}: {len(missing)} of {len(w['parts'])} parts missing "
                                    f"({', '.join(missing)})")
        else:
            result.complete.append(w)
    return result


def join_wheel(kit: Path, entry: dict, dest: Path) -> Path:
    """Concatenate a complete wheel's parts into ``dest/<wheel>`` and check the whole wheel's
    size and SHA-256 (ValueError on a mismatch, the joined file removed)."""
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / entry["wheel"]
    h = hashlib.sha256()
    with open(path, "wb") as out:
        for p in entry["parts"]:
            with open(Path(kit) / p["name"], "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
    size = path.stat().st_size
    if size != entry["size"] or h.hexdigest() != entry["sha256"]:
        path.unlink()
        raise ValueError(f"kit: {entry['wheel']}: the joined parts are {size} bytes with sha256 "
                         f"{h.hexdigest()[:16]}…, the manifest says {entry['size']} and {entry['sha256'][:16]}…")
    return path


# ----------------------------------------------------------------------------- installing

def installed(dist: str) -> bool:
    from importlib import metadata

    try:
        metadata.distribution(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def _pip_target(wheels: list[Path], target: Path, python: str) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
                           "--disable-pip-version-check", "--quiet", "--target", str(target), *map(str, wheels)],
                          capture_output=True, text=True)


CV2_PROBE = ("import sys, numpy as np, cv2; "
             "assert cv2.__file__.startswith(sys.argv[1]), 'cv2 came from ' + cv2.__file__; "
             "a = np.zeros((16, 16), np.uint8); a[4:8, 4:8] = 200; "
             "cv2.optflow.DualTVL1OpticalFlow_create().calc(a, np.roll(a, 1, 1), None); "
             "print(cv2.__version__, 'numpy', np.__version__)")


def machine_cv2(python: str) -> str:
    """``"optflow"`` when this machine's cv2 has the contrib modules, ``"plain"`` without them,
    ``"none"`` when cv2 does not import (asked of a child Python: importing cv2 here is not needed)."""
    probe = subprocess.run([python, "-c", "import cv2; print('optflow' if hasattr(cv2, 'optflow') else 'plain')"],
                           capture_output=True, text=True)
    return probe.stdout.strip() if probe.returncode == 0 else "none"


def _numpy_requirement_holds(wheel: Path) -> str | None:
    """None when the wheel's numpy requirement (for this Python) holds for the installed numpy,
    else the reason."""
    import zipfile

    try:
        from packaging.requirements import Requirement
    except ImportError:  # no packaging: the probe after installing decides
        return None
    from importlib import metadata

    with zipfile.ZipFile(wheel) as z:
        name = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
        text = z.read(name).decode() if name else ""
    try:
        have = metadata.version("numpy")
    except metadata.PackageNotFoundError:
        return "numpy is not installed"
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.name.lower() == "numpy" and (req.marker is None or req.marker.evaluate()):
                if not req.specifier.contains(have, prereleases=True):
                    return f"it needs numpy {req.specifier}, this machine has {have}"
    return None


def install_kit(kit: Path, target: Path, python: str = sys.executable) -> dict:
    """Check, join and install the complete wheels of ``kit`` under ``target`` (see the module
    docstring); write and return ``target/kit.json``:
    ``{"pythonpath": [...], "cv2_path": str | None, "installed": [dists], "lines": [...]}``."""
    target = Path(target).resolve()
    checked = check_kit(kit)
    lines = list(checked.lines)
    joined = target / "wheels"
    site, cv2_dir = target / "site", target / "cv2"
    general, shadowing = _join_wheels(kit, checked.complete, joined, lines)
    done = _install_general(general, site, python, lines)
    cv2_path = None
    for dist, wheel in shadowing:
        if _install_cv2(dist, wheel, cv2_dir, python, lines):
            cv2_path = str(cv2_dir)
            done.append(dist)
    shutil.rmtree(joined, ignore_errors=True)
    for entry in checked.incomplete:
        dist = entry.get("dist") or dist_name(entry["wheel"])
        lines.append(f"kit: {entry['wheel']} incomplete: not installed ({adds(dist)} stays out)")
    report = {"pythonpath": [str(site)] if (site.is_dir() and any(d not in SHADOWS for d in done)) else [],
              "cv2_path": cv2_path, "installed": done, "lines": lines}
    target.mkdir(parents=True, exist_ok=True)
    (target / KIT_JSON).write_text(json.dumps(report, indent=1) + "\n")
    return report


def _join_wheels(kit: Path, complete: list[dict], dest: Path, lines: list[str]):
    """The complete wheels joined into ``dest``, as (dist, wheel) pairs: those that go on the
    stages' path and those that shadow a module of the machine (``SHADOWS``). A wheel of an
    installed distribution is left out, with a line in ``lines``."""
    general, shadowing = [], []
    for entry in complete:
        dist = entry.get("dist") or dist_name(entry["wheel"])
        if dist not in SHADOWS and installed(dist):
            lines.append(f"kit: {entry['wheel']}: {dist} is installed here already; left out")
            continue
        try:
            wheel = join_wheel(kit, entry, dest)
        except ValueError as e:
            lines.append(str(e))
            continue
        (shadowing if dist in SHADOWS else general).append((dist, wheel))
    return general, shadowing


def _install_general(general: list[tuple[str, Path]], site: Path, python: str, lines: list[str]) -> list[str]:
    """One pip call for the wheels that go on every stage's path; the distributions installed."""
    if not general:
        return []
    proc = _pip_target([w for _, w in general], site, python)
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["?"])[-1]
        lines.append(f"kit: pip could not install {', '.join(w.name for _, w in general)}: {err}")
        return []
    _merge_nvidia_namespace(site)
    lines += [f"kit: installed {w.name} into {site}: {adds(d)}" for d, w in general]
    return [d for d, _ in general]


def _install_cv2(dist: str, wheel: Path, cv2_dir: Path, python: str, lines: list[str]) -> bool:
    """opencv-contrib into a folder of its own, only where the machine's cv2 lacks cv2.optflow,
    the wheel's numpy requirement holds, and a child Python imports it from there and runs one
    TV-L1. True when it is installed."""
    if machine_cv2(python) == "optflow":
        lines.append(f"kit: {wheel.name}: this machine's cv2 has cv2.optflow already; left out")
        return False
    why = _numpy_requirement_holds(wheel)
    if why:
        lines.append(f"kit: {wheel.name}: left out, {why}")
        return False
    proc = _pip_target([wheel], cv2_dir, python)
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["?"])[-1]
        lines.append(f"kit: pip could not install {wheel.name}: {err}")
        return False
    probe = subprocess.run([python, "-c", CV2_PROBE, str(cv2_dir)], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                               [str(cv2_dir), *filter(None, [os.environ.get("PYTHONPATH")])])))
    if probe.returncode != 0:
        err = (probe.stderr.strip().splitlines() or ["?"])[-1]
        lines.append(f"kit: {wheel.name} does not work here ({err}); left out")
        shutil.rmtree(cv2_dir, ignore_errors=True)
        return False
    lines.append(f"kit: installed {wheel.name} into {cv2_dir} (OpenCV {probe.stdout.strip()}), first on "
                 f"the path of the stages that use OpenCV's TV-L1 only: {adds(dist)}")
    return True


def _merge_nvidia_namespace(site: Path) -> None:
    """Some NVIDIA wheels (nvimgcodec, nvjpeg2k, nvtiff) ship ``nvidia/__init__.py``, which would
    make the kit's ``nvidia`` a regular package hiding the machine's ``nvidia.*``: extend its
    ``__path__`` over every ``nvidia`` folder on ``sys.path``."""
    init = site / "nvidia" / "__init__.py"
    if init.is_file():
        text = init.read_text()
        line = "__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n"
        if line not in text:
            init.write_text(text.rstrip("\n") + "\n" + line)


# ----------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kit", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="cut the wheels of a folder into parts with a manifest")
    m.add_argument("src", type=Path)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--part-mib", type=float, default=PART_BYTES / 2**20)
    c = sub.add_parser("check", help="which wheels of a kit folder arrived complete")
    c.add_argument("kit", type=Path)
    cl = sub.add_parser("calls", help="group the kit's files for the device tool's calls (carry lists)")
    cl.add_argument("kit", type=Path)
    cl.add_argument("--room-mib", type=float, default=62.0,
                    help="what one call carries beside the checkout (64 MiB less the checkout)")
    cl.add_argument("--only", default="", help="comma list of distributions to carry (default: the whole kit)")
    i = sub.add_parser("install", help="check, join and install a kit under --target")
    i.add_argument("kit", type=Path)
    i.add_argument("--target", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        if args.cmd == "make":
            manifest = make_kit(args.src, args.out, int(args.part_mib * 2**20))
            total = sum(w["size"] for w in manifest["wheels"])
            for w in manifest["wheels"]:
                print(f"{w['wheel']}: {w['size'] / 2**20:.1f} MiB in {len(w['parts'])} parts ({w['adds']})")
            print(f"{len(manifest['wheels'])} wheels, {total / 2**20:.0f} MiB, "
                  f"{sum(len(w['parts']) for w in manifest['wheels'])} parts of at most "
                  f"{manifest['part_bytes'] / 2**20:g} MiB in {args.out}/")
            return 0
        if args.cmd == "check":
            checked = check_kit(args.kit)
            for line in checked.lines:
                print(line)
            for w in checked.complete:
                print(f"kit: {w['wheel']} complete ({len(w['parts'])} parts)")
            return 0 if not checked.incomplete else 1
        if args.cmd == "calls":
            calls = plan_calls(args.kit, int(args.room_mib * 2**20), only=list(filter(None, args.only.split(","))))
            for n, group in enumerate(calls, 1):
                print(json.dumps([str(args.kit / name) for name in group]))
            return 0
        report = install_kit(args.kit, args.target)
        for line in report["lines"]:
            print(line)
        return 0
    except (KitError, ValueError) as e:
        print(f"bench.kit: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
