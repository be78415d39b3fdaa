"""Checked on the source (no code executed): checkpoints load only through safetensors or
`torch.load(..., weights_only=True)`, and nothing evaluates text (model output is untrusted)."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "actors", "adversary", "learner", "cluster", "bench")
SOURCES = sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_unsafe_loads_or_evaluation(path):
    for node, name in _calls(path):
        where = f"{path.relative_to(REPO)}:{node.lineno}"
        if name == "torch.load":
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            assert safe, f"{where}: torch.load without weights_only=True"
        assert name not in ("eval", "exec", "pickle.load", "pickle.loads", "sympify", "sympy.sympify"), \
            f"{where}: {name}() on data"


def test_the_checker_sees_an_unsafe_load(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import torch\ntorch.load('x.pt')\ntorch.load('y.pt', weights_only=True)\n")
    unsafe = [n.lineno for n, name in _calls(f) if name == "torch.load"
              and not any(k.arg == "weights_only" for k in n.keywords)]
    assert unsafe == [2]
