"""README's "Layout" section is a map of the tree: each entry exists, and a folder whose
entries are listed lists every Python module and sub-folder it holds (``__init__.py`` and
``conftest.py`` aside). Entries are lines ``<indent><file.ext or folder/>  <what it holds>``,
two spaces of indent per level; a line that starts with another word continues a description."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UNLISTED = {"__init__.py", "conftest.py", "__main__.py"}


def layout_block(readme: str) -> list[str]:
    section = readme.split("\n## Layout\n", 1)[1]
    return section.split("```", 2)[1].splitlines()[1:]


def layout_entries(lines: list[str]) -> dict[Path, list[Path]]:
    """Each listed path -> its listed children (empty for a leaf or an unexpanded folder)."""
    entries, parents = {}, []
    for line in lines:
        match = re.match(r"( *)(\S+)", line)
        if not match or not re.fullmatch(r"[\w-]+(\.\w+)+|[\w.-]+/", match.group(2)):
            continue  # a continued description
        depth = len(match.group(1)) // 2
        parents = parents[:depth]
        path = (parents[-1] if parents else ROOT) / match.group(2).rstrip("/")
        entries[path] = []
        if parents:
            entries[parents[-1]].append(path)
        if match.group(2).endswith("/"):
            parents.append(path)
    return entries


def held(folder: Path) -> set[Path]:
    return {path for path in folder.iterdir()
            if (path.suffix == ".py" and path.name not in UNLISTED)
            or (path.is_dir() and any(path.rglob("*.py")))}


def test_layout_matches_the_tree():
    entries = layout_entries(layout_block((ROOT / "README.md").read_text()))
    assert entries, "README.md: no entries in the Layout section"
    missing = [str(path.relative_to(ROOT)) for path in entries if not path.exists()]
    assert not missing, f"README.md Layout names paths that do not exist: {missing}"
    for folder, children in entries.items():
        if children:
            unlisted = sorted(str(path.relative_to(ROOT)) for path in held(folder) - set(children))
            assert not unlisted, f"README.md Layout: {folder.relative_to(ROOT)}/ does not list {unlisted}"


def test_parser_reads_nesting():
    entries = layout_entries(["a/          top", "  b.py      leaf", "  c/        inner",
                              "    d.py    deeper", "            continued text", "e.py  last"])
    assert entries[ROOT / "a"] == [ROOT / "a/b.py", ROOT / "a/c"]
    assert entries[ROOT / "a/c"] == [ROOT / "a/c/d.py"]
    assert entries[ROOT / "e.py"] == []
