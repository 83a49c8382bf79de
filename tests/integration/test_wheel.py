"""The wheel: complete packages, and the README's drop-in example runs from it alone.

The packaging inputs (setup.py, pyproject.toml, README.md and the three package folders) are
copied to a temporary folder, so the build writes nothing into the checkout and sees one
consistent snapshot of it, and built with
``pip wheel --no-deps --no-build-isolation`` (offline: the running interpreter's setuptools).
The wheel must hold every module of ``ccs_fast``, ``ccs_fast.kernels`` and
``ccs_fast.dataloader`` and the package data of that snapshot. It is then installed with ``pip install
--target`` into a folder of its own, and a child interpreter started with ``-I -S`` (no
site-packages processing, so no editable-install finder; no current folder on the path) and
a ``sys.path`` of that folder plus this interpreter's site-packages (torch and the other
dependencies) runs the README's example.
"""
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"ccs_fast": "ccs_fast", "ccs_fast/kernels": "kernels", "ccs_fast/dataloader": "dataloader"}
PACKAGE_DATA = ["ccs_fast/configs/*.yaml"]

EXAMPLE_INPUTS = """
import torch
torch.manual_seed(0)
B, D = 6, 32
x_f, x_o = torch.randn(B, 5, 2048), torch.randn(B, 7, 2048)
z_f, z_o = torch.randn(B, D, requires_grad=True), torch.randn(B, D, requires_grad=True)
labels = torch.tensor([0, 0, 1, 1, 2, 2])
"""

EXAMPLE_CHECKS = """
import ccs_fast, ccs_fast.kernels, ccs_fast.dataloader
loss.backward()
assert x_f.shape == (B, 5, 2048) and x_o.shape == (B, 7, 2048)
assert loss.dim() == 0 and torch.isfinite(loss) and z_f.grad is not None
print("from", ccs_fast.__file__, ccs_fast.kernels.__file__, ccs_fast.dataloader.__file__)
"""


def readme_example(src: Path) -> str:
    """The first python block of the README section "Use the layers in your model"."""
    section = (src / "README.md").read_text().split("## Use the layers in your model", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def expected_files(src: Path) -> set[str]:
    """Wheel paths of every module and data file in the copied source folder ``src``."""
    files = {f"{pkg}/{p.name}" for pkg, folder in PACKAGES.items() for p in (src / folder).glob("*.py")}
    for pattern in PACKAGE_DATA:
        folder, glob = pattern.rsplit("/", 1)
        files |= {f"{folder}/{p.name}" for p in (src / folder).glob(glob)}
    return files


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in set(PACKAGES.values()):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return src


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> Path:
    src = source
    out = tmp_path_factory.mktemp("dist")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--no-index", "--wheel-dir", str(out), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (path,) = out.glob("ccs_fast-*.whl")
    return path


def test_wheel_holds_every_module_and_the_package_data(wheel, source):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    missing = expected_files(source) - names
    assert not missing, sorted(missing)
    assert not any(n.startswith(("kernels/", "dataloader/", "tests/", "bench/")) for n in names)
    assert "Requires-Python: >=3.10" in metadata
    assert "Classifier: Programming Language :: Python :: 3.12" in metadata
    assert "## Use the layers in your model" in metadata  # the README is the long description
    assert "Provides-Extra: dali" in metadata


def test_readme_example_runs_from_the_installed_wheel(wheel, source, tmp_path):
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
                              str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    site_packages = sysconfig.get_paths()["purelib"]
    script = "\n".join([f"import sys; sys.path[:0] = [{str(target)!r}, {site_packages!r}]",
                        EXAMPLE_INPUTS, readme_example(source), EXAMPLE_CHECKS])
    run = subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    where = run.stdout.split("from", 1)[1].split()
    assert len(where) == 3 and all(path.startswith(str(target)) for path in where), run.stdout
