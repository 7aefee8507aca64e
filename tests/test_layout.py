"""The layout rules, checked on the source itself (ast, no imports): which package may import which, file
sizes, and what ``import vimtr`` does to the process."""
import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "vimtr"
MAX_LINES = 600
# Over the limit today and owned by other work (split pending, issue #18): each may not grow, and must leave
# this list once it is split.
KNOWN_OVER: dict = {}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, top_level_only: bool = False):
    """(line, imported module) for every import in the file (function-level ones too, unless
    ``top_level_only``), relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            yield node.lineno, base
            for alias in node.names:  # "from vimtr import reduction" imports the module vimtr.reduction
                yield node.lineno, f"{base}.{alias.name}"


def _violations(folder: str, forbidden: tuple, top_level_only: bool = False) -> list[str]:
    found = []
    for path in sorted((PKG / folder).rglob("*.py")):
        for line, name in _imports(path, top_level_only):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(SRC)}:{line} imports {name}")
    return found


def test_models_import_neither_numba_nor_the_reduction_methods():
    assert _violations("models", ("numba", "llvmlite", "vimtr.reduction")) == []


def test_ops_import_neither_models_nor_the_reduction_methods():
    assert _violations("ops", ("vimtr.models", "vimtr.reduction")) == []


def test_models_do_not_import_timm_at_module_level():
    assert _violations("models", ("timm", "torchvision"), top_level_only=True) == []


def test_the_import_checker_sees_imports_of_every_form(tmp_path, monkeypatch):
    """The checker itself: plain, from, relative and function-level imports are all reported."""
    pkg = tmp_path / "vimtr" / "models"
    pkg.mkdir(parents=True)
    (pkg / "bad.py").write_text("import numba.core\nfrom ..reduction import merge\n\n\ndef f():\n"
                                "    from vimtr import reduction\n    import timm\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PKG", tmp_path / "vimtr")
    found = _violations("models", ("numba", "vimtr.reduction"))
    assert [v.split(" imports ")[1] for v in found] == ["numba.core", "vimtr.reduction", "vimtr.reduction.merge",
                                                         "vimtr.reduction"]
    assert _violations("models", ("timm",), top_level_only=True) == []
    assert len(_violations("models", ("timm",))) == 1


def test_no_source_file_is_over_600_lines():
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    over = {name: n for name, n in sizes.items() if n > MAX_LINES and name not in KNOWN_OVER}
    assert over == {}, f"split these files (at most {MAX_LINES} lines each): {over}"
    for name, allowed in KNOWN_OVER.items():
        assert name in sizes and MAX_LINES < sizes[name] <= allowed, \
            f"{name}: {sizes.get(name)} lines; it may not grow, and once split it leaves KNOWN_OVER"


def _fresh(code: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_import_vimtr_and_building_a_model_stay_light():
    """``import vimtr`` leaves os.environ and the thread settings alone; building a model imports neither
    timm, torchvision nor numba (fresh interpreters, GOMP_SPINCOUNT unset)."""
    got = _fresh("import json, os, sys, torch; threads = torch.get_num_threads(); env = dict(os.environ); "
                 "import vimtr; vimtr.create_model('vim_tiny', depth=1); "
                 "print(json.dumps({'env_same': dict(os.environ) == env, 'threads_same': torch.get_num_threads() "
                 "== threads, 'heavy': [m for m in ('timm', 'torchvision', 'numba') if m in sys.modules]}))")
    assert got == {"env_same": True, "threads_same": True, "heavy": []}
