"""The layer table of `fica_jax/` and `data_pipelines/`, and the test that every import obeys it.

A module may import from its own layer and from any layer below it, never from one above; no two
modules may import each other, directly or in a circle; and the stages, which are plug-ins, are
loaded by name through the registry (`fica_jax.train.stage.get_stage`), never imported from
outside their folder. Imports inside functions count the same as imports at the top of a file.
docs/architecture.md ("Layers") explains what each layer is for.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("fica_jax", "data_pipelines")

# Bottom to top. A module belongs to the layer of the longest entry that names it or a folder
# above it; a package's own `__init__` is named `PKG.__init__`, so a new loose module at the top of
# `fica_jax/` belongs to no layer until it is placed here.
LAYERS = (
    ("foundation", ("fica_jax.__init__", "fica_jax.errors", "fica_jax.files", "fica_jax.config",
                    "fica_jax.flow", "fica_jax.preview", "fica_jax.sharding")),
    ("geometry", ("fica_jax.geometry",)),  # head template, UV maps, capture renderer
    ("render", ("fica_jax.render",)),  # the Gaussian rasteriser, surfels, .ply
    ("models", ("fica_jax.models",)),  # NNX networks and checkpoint importers
    ("quality", ("fica_jax.quality",)),  # PSNR/SSIM, LPIPS, ArcFace, the face region
    ("data", ("data_pipelines",)),  # record schema, shards, Grain pipelines, synthetic heads
    ("perf", ("fica_jax.perf",)),  # chip table, HLO cost analysis
    ("train", ("fica_jax.train",)),  # the one train loop and the stage contract
    ("plan", ("fica_jax.plan",)),  # AOT plans of a train step for a virtual pod
    ("export", ("fica_jax.export",)),  # safetensors export, the PyTorch runtime
    ("avatar", ("fica_jax.avatar",)),  # avatar bundles, driving them, ARKit
    ("infer", ("fica_jax.infer",)),  # conditioning, pose, VAE bundle, sampling, refine, maps
    ("stages", ("fica_jax.stages",)),  # what each stage plugs into the train loop
    ("eval", ("fica_jax.eval",)),  # the zero-shot animation protocol and its report
    ("commands", ("fica_jax.commands",)),  # each `fica` verb: argparse + handler
)  # fmt: skip
PLUGINS = ("fica_jax.stages",)  # loaded by name through the registry only


def modules(root: pathlib.Path, packages=PACKAGES) -> dict[str, pathlib.Path]:
    found = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: pathlib.Path, known) -> list[tuple[int, str]]:
    """(line, module) for every import of a known module in `path`, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    got = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import sub` imports the module pkg.sub where there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]  # fmt: skip
        else:
            continue
        for target in dict.fromkeys(targets):
            while target and target not in known:
                target = target.rpartition(".")[0]
            # a package and its own modules: the package's __init__ re-exports them
            if (
                target
                and not (name + ".").startswith(target + ".")
                and not target.startswith(name + ".")
            ):
                got.append((node.lineno, target))
    return got


def layer_of(module: str, known, layers=LAYERS) -> int | None:
    if known[module].name == "__init__.py":
        module += ".__init__"
    best = None
    for i, (_, prefixes) in enumerate(layers):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return None if best is None else best[0]


def violations(root: pathlib.Path, packages=PACKAGES, layers=LAYERS, plugins=PLUGINS):
    """Every broken rule, one line each, naming the file, line and import."""
    known = modules(root, packages)
    edges: dict[str, set[str]] = {m: set() for m in known}
    found = []
    for name, path in known.items():
        here = layer_of(name, known, layers)
        where = path.relative_to(root)
        if here is None:
            found.append(f"{where}: module {name} is in no layer of the table")
            continue
        for line, target in imports(name, path, known):
            edges[name].add(target)
            there = layer_of(target, known, layers)
            if there is not None and there > here:
                found.append(f"{where}:{line}: {name} ({layers[here][0]}) imports {target} "
                             f"({layers[there][0]}), a layer above it")  # fmt: skip
            plugin = next((p for p in plugins if target.startswith(p + ".")), None)
            if plugin and not name.startswith(plugin):
                found.append(f"{where}:{line}: {name} imports the plug-in {target}; load it "
                             "by name through fica_jax.train.stage.get_stage")  # fmt: skip
    for cycle in _cycles(edges):
        found.append("import cycle: " + " -> ".join(cycle + [cycle[0]]))
    return found


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_import_points_down_the_layer_table():
    assert violations(ROOT) == []


# ----------------------------------------------------------------------------- the checker itself
def _tree(tmp_path, files: dict[str, str]) -> pathlib.Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


TOY_LAYERS = (("low", ("pkg.__init__", "pkg.low")), ("mid", ("pkg.mid",)), ("stages", ("pkg.stages",)),
              ("top", ("pkg.top",)))  # fmt: skip


@pytest.mark.parametrize(
    "text",
    [
        "from pkg.top import cmd\n",  # module level
        "def f():\n    from pkg.top import cmd\n",  # inside a function
        "def f():\n    from ..top import cmd\n",  # relative
        "import pkg.top.cmd as c\n",
    ],
)
def test_an_upward_import_is_named_with_its_file_and_line(tmp_path, text):
    root = _tree(tmp_path, {"pkg/__init__.py": "", "pkg/low.py": "", "pkg/mid/__init__.py": "",
                            "pkg/mid/m.py": text, "pkg/top/__init__.py": "",
                            "pkg/top/cmd.py": "from pkg import low\n"})  # fmt: skip
    found = violations(root, ("pkg",), TOY_LAYERS, ())
    line = text.count("\n")
    assert found == [
        f"pkg/mid/m.py:{line}: pkg.mid.m (mid) imports pkg.top.cmd (top), a layer above it"
    ]


def test_downward_imports_pass_and_cycles_and_plugins_do_not(tmp_path):
    files = {"pkg/__init__.py": "", "pkg/low.py": "", "pkg/mid/__init__.py": "",
             "pkg/mid/a.py": "from pkg import low\nfrom pkg.mid import b\n",
             "pkg/mid/b.py": "import pkg.low\n", "pkg/stages/__init__.py": "",
             "pkg/stages/s.py": "from pkg.mid import a\n", "pkg/top/__init__.py": "",
             "pkg/top/cmd.py": "from pkg.mid import a\n"}  # fmt: skip
    root = _tree(tmp_path, files)
    assert violations(root, ("pkg",), TOY_LAYERS, ("pkg.stages",)) == []

    (root / "pkg/mid/b.py").write_text("def f():\n    from pkg.mid import a\n")
    (root / "pkg/top/cmd.py").write_text("from pkg.stages import s\n")
    (root / "pkg/unlisted.py").write_text("")
    found = violations(root.resolve(), ("pkg",), TOY_LAYERS, ("pkg.stages",))
    assert "import cycle: pkg.mid.a -> pkg.mid.b -> pkg.mid.a" in found
    assert any(f.startswith("pkg/top/cmd.py:1: pkg.top.cmd imports the plug-in pkg.stages.s")
               for f in found)  # fmt: skip
    assert "pkg/unlisted.py: module pkg.unlisted is in no layer of the table" in found


def test_the_table_names_every_folder_of_the_library():
    """A new folder must be placed in the table, not fall into the layer of its parent."""
    folders = {".".join(p.relative_to(ROOT).parts) for pkg in PACKAGES
               for p in (ROOT / pkg).rglob("__init__.py") for p in [p.parent]}  # fmt: skip
    named = {p.removesuffix(".__init__") for _, prefixes in LAYERS for p in prefixes}
    inner = {"data_pipelines.synthetic", "data_pipelines.formats"}  # part of the data layer
    assert sorted(folders - named - inner) == []
