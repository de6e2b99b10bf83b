"""The package's layers: the model core depends on torch alone, and no module imports one that imports it back.

The core (tokenizer, scans, kernel record, Mamba block, PTMMamba) imports nothing of ptm_mamba but
itself and `ptm_mamba.errors`, and reads no workflow file: a user can build and run the network
without the pipeline. Import cycles are counted with the imports inside functions, which hide a
cycle from Python but not from a reader.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ptm_mamba"
CORE = ("ptm_mamba.tokenizer", "ptm_mamba.scan", "ptm_mamba.scan_triton", "ptm_mamba.kernels",
        "ptm_mamba.mamba_block", "ptm_mamba.model")
ALLOWED = {"ptm_mamba", "ptm_mamba.errors", *CORE}

# Run in a fresh interpreter: records every file opened from the first core import on, then builds a
# tiny model and runs a forward pass with ESM-2 features.
CORE_FORWARD = """
import json, sys
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" and args else None)
import torch
import ptm_mamba.kernels, ptm_mamba.mamba_block, ptm_mamba.scan, ptm_mamba.scan_triton
from ptm_mamba.model import ModelConfig, PTMMamba
from ptm_mamba.tokenizer import PAD_ID, PTMTokenizer
tok = PTMTokenizer()
ids = torch.tensor([tok.encode("MK<Phosphoserine>LVA", add_special_tokens=True),
                    tok.encode("MKLVA", add_special_tokens=True) + [PAD_ID]])
model = PTMMamba(ModelConfig(d_model=16, n_layer=1, esm_dim=8)).eval()
with torch.no_grad():
    out = model(ids, torch.randn(*ids.shape, 8))
assert out.logits.shape == (*ids.shape, tok.vocab_size), out.logits.shape
print(json.dumps({"modules": sorted(m for m in sys.modules if m.split(".")[0] == "ptm_mamba"), "opened": opened}))
"""


def test_the_model_core_loads_no_pipeline_module_and_reads_no_workflow_file():
    result = subprocess.run([sys.executable, "-c", CORE_FORWARD], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(seen["modules"]) <= ALLOWED, f"pipeline modules loaded: {sorted(set(seen['modules']) - ALLOWED)}"
    workflow = (REPO / "workflow").resolve()
    read = [p for p in seen["opened"]
            if p.endswith((".yaml", ".yml")) or (REPO / p).resolve().is_relative_to(workflow)]
    assert read == [], f"the core read {read}"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(source: str, name: str, modules: set[str], is_package: bool = False) -> set[str]:
    """The modules of `modules` that module `name` (of text `source`) imports anywhere (in functions
    too, not under `if TYPE_CHECKING:`). `from X import y` counts X, and X.y where that is a module."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source, name))
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imported_modules(f.read_text(encoding="utf-8"), module_name(f), modules,
                                             f.name == "__init__.py") for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = walk(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = walk(start)
            if cycle:
                return cycle
    return None


def test_the_import_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "ptm_mamba.errors" in graph["ptm_mamba.model"]  # absolute, at module level
    assert "ptm_mamba.mamba_block" in graph["ptm_mamba.doctor"]  # relative, inside a function
    source = """
from typing import TYPE_CHECKING
from . import b, c as see
if TYPE_CHECKING:
    from .d import D
else:
    import p.e
def f():
    from ..q import g
"""
    modules = {"p", "p.e", "p.q", "p.q.g", *(f"p.sub.{m}" for m in "abcd"), "p.sub"}
    assert imported_modules(source, "p.sub.a", modules) == {"p.sub", "p.sub.b", "p.sub.c", "p.e", "p.q", "p.q.g"}
    assert imported_modules("from . import b", "p.sub", modules, is_package=True) == {"p.sub.b"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_ptm_mamba_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    if cycle:
        pytest.fail("import cycle: " + " -> ".join(cycle))
