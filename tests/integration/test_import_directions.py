"""The import arrows of the package point one way (README "Layout").

Every module of ccs_fast, ccs_fast.kernels and ccs_fast.dataloader belongs to one layer, and
a module may import (at the top or inside a function: an arrow is an arrow) only from its own
layer and the layers below it:

    cli -> app (trainer, evaluate, predict, ...) -> core (model, checkpoint, ...) -> config
        -> nn (backbones, connection, losses, ...) / dataloader -> kernels -> base

A new module fails ``test_every_module_has_a_layer`` until it is placed in ``LAYERS``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"ccs_fast": ROOT / "ccs_fast", "ccs_fast.kernels": ROOT / "kernels",
           "ccs_fast.dataloader": ROOT / "dataloader"}

# Lowest first; a module may import its own layer and any layer listed before it, except
# that ``dataloader`` and ``nn`` are side by side (neither imports the other).
ORDER = ["base", "kernels", "dataloader", "nn", "config", "core", "app", "cli"]
BESIDE = {("dataloader", "nn"), ("nn", "dataloader")}
LAYERS = {
    "nn": {"ccs_fast.backbones", "ccs_fast.video_backbones", "ccs_fast.connection", "ccs_fast.trn",
           "ccs_fast.losses"},
    "config": {"ccs_fast.config"},
    "core": {"ccs_fast.model", "ccs_fast.amp", "ccs_fast.checkpoint", "ccs_fast.metrics",
             "ccs_fast.loaders", "ccs_fast.paper_table", "ccs_fast.viz", "ccs_fast.recipe"},
    "app": {"ccs_fast.trainer", "ccs_fast.epoch", "ccs_fast.resume", "ccs_fast.evaluate", "ccs_fast.scoring",
            "ccs_fast.predict", "ccs_fast.demo", "ccs_fast.pictures", "ccs_fast.run_folder"},
    "cli": {"ccs_fast.cli", "ccs_fast"},
}


def layer_of(module: str) -> str | None:
    for prefix, layer in (("ccs_fast.base", "base"), ("ccs_fast.kernels", "kernels"),
                          ("ccs_fast.dataloader", "dataloader")):
        if module == prefix or module.startswith(prefix + "."):
            return layer
    for layer, modules in LAYERS.items():
        if module in modules:
            return layer
    return None


def package_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the installed package (base is inside ccs_fast/)."""
    modules = {}
    for package, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if package == "ccs_fast" and parts and parts[0] in ("kernels", "dataloader"):
                continue  # not part of this package
            modules[".".join([package, *parts])] = path
    return modules


def imported_modules(name: str, path: Path) -> set[str]:
    """The ccs_fast modules ``path`` imports, relative imports resolved, ``from X import Y``
    counted as X.Y when X.Y is a module and as X otherwise."""
    known = package_modules()
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source)
    return {module for module in found if module == "ccs_fast" or module.startswith("ccs_fast.")}


def allowed(importer: str, imported: str) -> bool:
    if (importer, imported) in BESIDE:
        return False
    return ORDER.index(imported) <= ORDER.index(importer)


def test_every_module_has_a_layer():
    unplaced = [name for name in package_modules() if layer_of(name) is None]
    assert not unplaced, f"place these modules in a layer of {__file__}: {unplaced}"


def test_imports_point_down():
    wrong = []
    for name, path in package_modules().items():
        layer = layer_of(name)
        if layer is None:
            continue
        for target in imported_modules(name, path):
            target_layer = layer_of(target)
            if target_layer is not None and not allowed(layer, target_layer):
                wrong.append(f"{name} ({layer}) imports {target} ({target_layer})")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


@pytest.mark.parametrize("importer, imported, expected", [
    ("dataloader", "base", True), ("kernels", "dataloader", False), ("nn", "dataloader", False),
    ("config", "dataloader", True), ("app", "cli", False), ("base", "base", True),
])
def test_allowed_table(importer, imported, expected):
    assert allowed(importer, imported) is expected
