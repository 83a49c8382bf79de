"""bench.kit: wheels cut into parts with a manifest, a bad part refused in one line, a partial kit
installing what it completes, the joined wheel identical to the original, the install beside
the machine's packages (PYTHONPATH), and opencv-contrib taken only where it is safe."""
import base64
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bench import kit
from bench.gpu import plan, runner

REPO = Path(__file__).resolve().parents[2]


def random_wheel(folder: Path, name: str, size: int, rng) -> Path:
    path = folder / name
    path.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def real_wheel(folder: Path, dist: str, module: str, source: str, version: str = "1.0") -> Path:
    """A minimal installable pure-Python wheel holding ``module/__init__.py``."""
    stem = f"{dist.replace('-', '_')}-{version}"
    files = {f"{module}/__init__.py": source.encode(),
             f"{stem}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
             f"{stem}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{stem}.dist-info/RECORD,,")
    files[f"{stem}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def test_split_writes_parts_of_at_most_the_part_size_and_a_manifest(tmp_path):
    rng = np.random.default_rng()
    src, out = tmp_path / "src", tmp_path / "kit"
    src.mkdir()
    part = int(rng.integers(100, 400))
    sizes = {"alpha_pkg-1.0-py3-none-any.whl": 3 * part, "beta_pkg-2.0-py3-none-any.whl": 2 * part + 7,
             "gamma-0.1-py3-none-any.whl": part - 1}
    wheels = {n: random_wheel(src, n, size, rng) for n, size in sizes.items()}
    random_wheel(src, "numpy-2.5.0-cp312-cp312-manylinux_2_28_x86_64.whl", 50, rng)  # the image has numpy
    manifest = kit.make_kit(src, out, part_bytes=part)
    assert [w["wheel"] for w in manifest["wheels"]] == sorted(sizes)  # numpy left out
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest and on_disk["part_bytes"] == part
    for w in manifest["wheels"]:
        data = wheels[w["wheel"]].read_bytes()
        assert w["size"] == len(data) and w["sha256"] == hashlib.sha256(data).hexdigest()
        assert len(w["parts"]) == -(-len(data) // part)
        joined = b""
        for p in w["parts"]:
            blob = (out / p["name"]).read_bytes()
            assert 0 < len(blob) <= part and p["size"] == len(blob)
            assert p["sha256"] == hashlib.sha256(blob).hexdigest()
            joined += blob
        assert joined == data
    # a new kit drops the parts of the old one
    (src / "alpha_pkg-1.0-py3-none-any.whl").unlink()
    kit.make_kit(src, out, part_bytes=part)
    assert not list(out.glob("alpha_pkg*"))


def test_a_bad_part_is_refused_in_one_line_and_a_partial_kit_keeps_the_complete_wheels(tmp_path):
    rng = np.random.default_rng()
    src, out = tmp_path / "src", tmp_path / "kit"
    src.mkdir()
    for name in ("alpha_pkg-1.0-py3-none-any.whl", "beta_pkg-2.0-py3-none-any.whl", "gamma-0.1-py3-none-any.whl"):
        random_wheel(src, name, int(rng.integers(500, 900)), rng)
    manifest = kit.make_kit(src, out, part_bytes=256)
    alpha, beta, gamma = manifest["wheels"]
    bad = out / alpha["parts"][1]["name"]
    blob = bytearray(bad.read_bytes())
    blob[int(rng.integers(len(blob)))] ^= 0x5A
    bad.write_bytes(bytes(blob))
    (out / beta["parts"][-1]["name"]).unlink()  # still on its way
    checked = kit.check_kit(out)
    assert [w["wheel"] for w in checked.complete] == [gamma["wheel"]]
    assert [w["wheel"] for w in checked.incomplete] == [alpha["wheel"], beta["wheel"]]
    refused = [line for line in checked.lines if "refused" in line]
    assert len(refused) == 1 and bad.name in refused[0] and "sha256" in refused[0] and "\n" not in refused[0]
    assert any(beta["parts"][-1]["name"] in line and "missing" in line for line in checked.lines)
    proc = subprocess.run([sys.executable, "-m", "bench.kit", "check", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr == ""
    assert sum("refused" in line for line in proc.stdout.splitlines()) == 1
    assert f"{gamma['wheel']} complete" in proc.stdout


def test_joined_wheel_is_the_original_and_a_wrong_whole_is_refused(tmp_path):
    rng = np.random.default_rng()
    src, out = tmp_path / "src", tmp_path / "kit"
    src.mkdir()
    original = random_wheel(src, "alpha_pkg-1.0-py3-none-any.whl", int(rng.integers(1000, 3000)), rng)
    entry = kit.make_kit(src, out, part_bytes=300)["wheels"][0]
    joined = kit.join_wheel(out, entry, tmp_path / "joined")
    assert joined.read_bytes() == original.read_bytes()
    # parts that each match the manifest but not the whole (a manifest edited by hand)
    with pytest.raises(ValueError, match="sha256"):
        kit.join_wheel(out, {**entry, "sha256": "0" * 64}, tmp_path / "again")
    assert not (tmp_path / "again" / entry["wheel"]).exists()


def test_calls_carry_every_part_once_within_what_a_call_carries(tmp_path):
    rng = np.random.default_rng()
    src, out = tmp_path / "src", tmp_path / "kit"
    src.mkdir()
    names = [f"w{i}_pkg-1.0-py3-none-any.whl" for i in range(6)]
    for name in names:
        random_wheel(src, name, int(rng.integers(100, 2500)), rng)
    manifest = kit.make_kit(src, out, part_bytes=1000)
    room = 1500 + (out / "manifest.json").stat().st_size
    calls = kit.plan_calls(out, room_bytes=room, per_call=3)
    assert calls[0][0] == "manifest.json"
    parts = {p["name"]: p["size"] for w in manifest["wheels"] for p in w["parts"]}
    assert sorted(n for group in calls for n in group if n != "manifest.json") == sorted(parts)
    for group in calls:
        assert len(group) <= 3 and sum((out / n).stat().st_size for n in group) <= room
    only = kit.plan_calls(out, room_bytes=room, only=["w3-pkg"])
    assert sorted(n for group in only for n in group) == sorted(
        ["manifest.json"] + [p["name"] for p in manifest["wheels"][3]["parts"]])
    with pytest.raises(kit.KitError, match="no wheel of nothing"):
        kit.plan_calls(out, only=["nothing"])


def test_bad_manifest_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.kit", "install", str(tmp_path), "--target", str(tmp_path / "t")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no manifest" in proc.stderr
    (tmp_path / "manifest.json").write_text('{"wheels": [{"wheel": "x.whl"}]}')
    with pytest.raises(kit.KitError, match="not a kit manifest"):
        kit.check_kit(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--dry-run", "--kit", str(tmp_path / "nothing")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "manifest.json" in proc.stderr


def test_partial_kit_installs_what_it_completes_and_the_stages_see_it(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTHONPATH", raising=False)
    rng = np.random.default_rng()
    token = str(int(rng.integers(1 << 30)))
    src, out, target = tmp_path / "src", tmp_path / "kit", tmp_path / "target"
    src.mkdir()
    real_wheel(src, "ccs-kit-probe", "ccs_kit_probe", f"TOKEN = {token!r}\n")
    real_wheel(src, "ccs-kit-late", "ccs_kit_late", "")
    random_wheel(src, "pytest-8.0.0-py3-none-any.whl", 300, rng)  # installed here: left out, never shadowed
    manifest = kit.make_kit(src, out, part_bytes=200, image_has=frozenset())
    late = next(w for w in manifest["wheels"] if w["dist"] == "ccs-kit-late")
    (out / late["parts"][0]["name"]).unlink()
    report = kit.install_kit(out, target)
    assert report["installed"] == ["ccs-kit-probe"] and report["cv2_path"] is None
    assert report["pythonpath"] == [str((target / "site").resolve())]
    assert json.loads((target / "kit.json").read_text()) == report
    assert any("pytest" in line and "left out" in line for line in report["lines"])
    assert any("ccs_kit_late" in line and "incomplete" in line for line in report["lines"])
    assert not (target / "site" / "pytest").exists() and not (target / "wheels").exists()
    # a stage of bench.gpu imports the kit's module from the temporary folder
    run = runner.Run(dry_run=True, python=sys.executable, out=tmp_path, work=tmp_path, logs=tmp_path,
                  wheelhouse=tmp_path, deadline=time.monotonic() + 60, kit_target=target)
    run.load_kit()
    stage = plan.Stage("toy", "", 30, 30, (plan.Step(("{python}", "-c",
                                                    "import ccs_kit_probe; print('token', ccs_kit_probe.TOKEN)")),))
    assert runner.run_stage(stage, run).status == "ok"
    assert f"token {token}" in (tmp_path / "toy.log").read_text()


def fake_contrib_kit(tmp_path) -> Path:
    src, out = tmp_path / "src", tmp_path / "kit"
    src.mkdir()
    real_wheel(src, "opencv-contrib-python-headless", "cv2", "__version__ = 'fake'\n", version="9.9.9")
    kit.make_kit(src, out, part_bytes=150)
    return out


@pytest.mark.skipif(kit.machine_cv2(sys.executable) != "optflow", reason="this Python's cv2 lacks cv2.optflow")
def test_opencv_contrib_is_left_out_where_cv2_has_optflow(tmp_path, monkeypatch):
    out = fake_contrib_kit(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    report = kit.install_kit(out, tmp_path / "t1")
    assert report["cv2_path"] is None and report["installed"] == []
    assert any("has cv2.optflow already" in line for line in report["lines"]), report["lines"]
    assert not (tmp_path / "t1" / "cv2").exists()


def test_opencv_contrib_that_fails_the_tvl1_probe_is_left_out(tmp_path, monkeypatch):
    """Where the machine's cv2 lacks cv2.optflow (the bare image: bench/bare_image) the kit's is
    installed into a folder of its own, then probed; one that cannot run TV-L1 is removed."""
    out = fake_contrib_kit(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(REPO / "bench" / "bare_image"))
    report = kit.install_kit(out, tmp_path / "t2")
    assert report["cv2_path"] is None and report["installed"] == [], report["lines"]
    assert any("does not work here" in line for line in report["lines"]), report["lines"]
    assert not (tmp_path / "t2" / "cv2").exists()


def test_nvidia_namespace_of_the_kit_reaches_the_machines_nvidia_folders(tmp_path):
    site, machine = tmp_path / "site", tmp_path / "machine"
    (site / "nvidia" / "dali").mkdir(parents=True)
    (site / "nvidia" / "__init__.py").write_text("# shipped by nvimgcodec\n")
    (site / "nvidia" / "dali" / "__init__.py").write_text("WHERE = 'kit'\n")
    (machine / "nvidia" / "cublas").mkdir(parents=True)
    (machine / "nvidia" / "__init__.py").write_text("")
    (machine / "nvidia" / "cublas" / "__init__.py").write_text("WHERE = 'machine'\n")
    kit._merge_nvidia_namespace(site)
    kit._merge_nvidia_namespace(site)  # idempotent
    proc = subprocess.run([sys.executable, "-c", "import nvidia.dali, nvidia.cublas; "
                           "print(nvidia.dali.WHERE, nvidia.cublas.WHERE)"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=f"{site}:{machine}"), timeout=60)
    assert proc.stdout.split() == ["kit", "machine"], proc.stderr
