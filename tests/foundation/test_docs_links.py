"""Every relative link and every named module path in the repository's Markdown pages exists.

Checked: `](target)` links (relative to the page), backticked `fica_jax/...py`, `configs/...py`
and `data_pipelines/...py` paths (relative to the repository root), and dotted `fica_jax.x.y`
names, whose first name after the deepest module or package must be defined or imported there.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGES = ["README.md", "launch/README.md", "data_pipelines/SCHEMA.md", "fica_jax/stages/README.md"]
PAGES += sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
PLACEHOLDERS = {"NAME", "STAGE", "X"}  # `fica_jax/stages/NAME.py` in a recipe

LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
PATH = re.compile(r"\b((?:fica_jax|configs|data_pipelines)/[\w/.-]*?\.py)\b")
DOTTED = re.compile(r"\bfica_jax(?:\.\w+)+")


def dead_links(page: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
    """Each dead reference in `page`, one line each: the page, line number and reference."""
    dead = []
    for n, line in enumerate(page.read_text().splitlines(), 1):
        where = f"{page.relative_to(root)}:{n}"
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:|#", target):  # a URL or an anchor on the same page
                continue
            if not (page.parent / target.split("#")[0]).exists():
                dead.append(f"{where}: link ({target})")
        for span in CODE.findall(line):
            for path in PATH.findall(span):
                if not PLACEHOLDERS & set(pathlib.Path(path).with_suffix("").parts):
                    if not (root / path).exists():
                        dead.append(f"{where}: path `{path}`")
        for name in DOTTED.findall(line):
            if not _resolves(name, root):
                dead.append(f"{where}: module `{name}`")
    return dead


def _resolves(name: str, root: pathlib.Path) -> bool:
    parts = name.split(".")
    if PLACEHOLDERS & set(parts):
        return True
    for i in range(len(parts), 0, -1):  # the deepest module or package the name starts with
        base = root.joinpath(*parts[:i])
        module = base.with_suffix(".py")
        source = module if module.exists() else base / "__init__.py"
        if source.exists():
            if i == len(parts):
                return True
            n = re.escape(parts[i])  # defined or imported there, not just mentioned
            defines = rf"(def|class)\s+{n}\b|^\s*{n}\s*[:=]|^\s*(from|import)\s.*\b{n}\b"
            return re.search(defines, source.read_text(), re.M) is not None
    return False


@pytest.mark.parametrize("page", PAGES)
def test_every_link_and_module_path_exists(page):
    assert dead_links(ROOT / page) == []


def test_the_checker_finds_dead_links(tmp_path):
    (tmp_path / "fica_jax").mkdir()
    (tmp_path / "fica_jax" / "__init__.py").write_text("")
    (tmp_path / "fica_jax" / "files.py").write_text("def write_text(): ...\n")
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "p.md"
    page.write_text(
        "[ok](../fica_jax/files.py) [gone](../fica_jax/old.py) [web](https://x.org) [a](#top)\n"
        "`fica_jax/files.py` `fica_jax/moved/old.py:main` `fica_jax/stages/NAME.py`\n"
        "`fica_jax.files.write_text` `fica_jax.files.gone_fn` `fica_jax.cli`\n"
    )
    assert dead_links(page, tmp_path) == [
        "docs/p.md:1: link (../fica_jax/old.py)",
        "docs/p.md:2: path `fica_jax/moved/old.py`",
        "docs/p.md:3: module `fica_jax.files.gone_fn`",
        "docs/p.md:3: module `fica_jax.cli`",
    ]
