"""The architecture, read from the code's imports (the layers of docs/architecture.md, "Layout").

- ``core/`` imports no FiftyOne, and no higher layer; ``dataset/`` no ``plugin/``;
- the runtime (package, dataset functions, plugin) never imports ``bench/``;
- no module imports another module's private (``_name``) names.
Checked statically (the AST of every module) and at run time in a fresh interpreter.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fiftyone_sdcorr"


def _imports(path: Path):
    """``(module, [names])`` of every import in a file (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = path.relative_to(PKG.parent).with_suffix("").parts[: -node.level]
                mod = ".".join(base + ((mod,) if mod else ()))
            out.append((mod, [a.name for a in node.names]))
    return out


def _modules(sub: str):
    return sorted((PKG / sub).rglob("*.py")) if sub else sorted(PKG.glob("*.py"))


@pytest.mark.parametrize("layer, forbidden", [
    ("core", ("fiftyone.", "fiftyone_sdcorr.dataset", "fiftyone_sdcorr.plugin", "fiftyone_sdcorr.bench")),
    ("dataset", ("fiftyone_sdcorr.plugin", "fiftyone_sdcorr.bench")),
    ("plugin", ("fiftyone_sdcorr.bench",)),
])
def test_layers_import_only_downwards(layer, forbidden):
    bad = []
    for path in _modules(layer):
        for mod, _ in _imports(path):
            name = mod + "."
            if any(name.startswith(f) or mod == f.rstrip(".") for f in forbidden) or (
                    layer == "core" and mod == "fiftyone"):
                bad.append(f"{path.relative_to(PKG)} imports {mod}")
    assert not bad, bad


def test_no_private_names_across_modules():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        for mod, names in _imports(path):
            if mod.startswith("fiftyone_sdcorr"):
                bad += [f"{path.relative_to(PKG)}: {mod}.{n}" for n in names if n.startswith("_")]
    assert not bad, bad


def test_runtime_imports_no_benchmark_and_core_no_fiftyone():
    code = (
        "import sys\n"
        "import fiftyone_sdcorr.core.features.extractor, fiftyone_sdcorr.core.matching.correspondence, fiftyone_sdcorr.core.features.store\n"
        "import fiftyone_sdcorr.core.pictures.visualize, fiftyone_sdcorr.core.features.fusion, fiftyone_sdcorr.core.common.geometry\n"
        "assert not [m for m in sys.modules if m == 'fiftyone' or m.startswith('fiftyone.')], 'core loaded fiftyone'\n"
        "import fiftyone_sdcorr\n"
        "for name in fiftyone_sdcorr.__all__: getattr(fiftyone_sdcorr, name)\n"
        "import fiftyone_sdcorr.plugin.operators_features, fiftyone_sdcorr.plugin.operators_keypoints\n"
        "import fiftyone_sdcorr.plugin.operators_views, fiftyone_sdcorr.plugin.panels\n"
        "bench = [m for m in sys.modules if m.startswith('fiftyone_sdcorr.bench')]\n"
        "assert not bench, bench\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


MAX_FUNCTION_LINES = 60  # code lines of one function, its docstring not counted


def _code_lines(node) -> int:
    n = node.end_lineno - node.lineno + 1
    first = node.body[0] if node.body else None
    if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
            and isinstance(first.value.value, str):
        n -= first.end_lineno - first.lineno + 1
    return n


@pytest.mark.parametrize("sub", ["", "core", "dataset", "plugin", "bench"])
def test_functions_read_like_a_table_of_contents(sub):
    """No function of the package is longer than :data:`MAX_FUNCTION_LINES` lines of code
    (a long job is numbered steps, each a function)."""
    long = []
    for path in _modules(sub):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _code_lines(node)
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PKG)}:{node.name} ({n} lines)")
    assert not long, long


def test_no_unused_imports_or_undefined_names():
    """pyflakes over the package: an unused import or an undefined name is a defect (a
    re-export is listed in the module's ``__all__``)."""
    import io

    from pyflakes.api import checkPath
    from pyflakes.reporter import Reporter

    out = io.StringIO()
    found = sum(checkPath(str(path), Reporter(out, out)) for path in sorted(PKG.rglob("*.py")))
    assert found == 0, out.getvalue()


def test_core_is_organised_by_concern_without_import_cycles():
    """``core/`` is folders by concern, each opening with a one-line comment, and no two
    modules of ``core/`` import each other, directly or through others (top-level and
    deferred imports alike)."""
    core = PKG / "core"
    loose = [p.name for p in core.glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules outside a concern folder: {loose}"
    for folder in [p for p in core.iterdir() if p.is_dir() and p.name != "__pycache__"]:
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) == 1, folder
    name = lambda p: ".".join(p.relative_to(PKG.parent).with_suffix("").parts)  # noqa: E731
    graph = {name(p): {m for m, _ in _imports(p) if m.startswith("fiftyone_sdcorr.core.")}
             for p in core.rglob("*.py") if p.name != "__init__.py"}
    state = {}

    def visit(mod, path):
        if state.get(mod) == "done" or mod not in graph:
            return
        assert state.get(mod) != "open", f"import cycle: {' -> '.join(path + [mod])}"
        state[mod] = "open"
        for dep in graph[mod]:
            visit(dep, path + [mod])
        state[mod] = "done"

    for mod in graph:
        visit(mod, [])
