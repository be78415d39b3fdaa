"""The import rules of ../shared/DESIGN.md, checked on the source (no imports executed)."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SIDES = ("actors", "adversary", "learner")
PROJECT = ("core", "actors", "adversary", "learner", "cluster")


def _imports(path: Path) -> set[str]:
    """Top-level package names a module imports, at any depth of its code (lazy imports count)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _modules(package: str):
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("path", _modules("core"), ids=lambda p: str(p.relative_to(REPO)))
def test_core_imports_no_side_no_ray_no_vllm(path):
    bad = _imports(path) & {"ray", "vllm", *PROJECT[1:]}
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


@pytest.mark.parametrize("side", SIDES)
def test_sides_import_only_core(side):
    others = set(PROJECT) - {"core", side}
    for path in _modules(side):
        bad = _imports(path) & others
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}: only cluster/ joins the sides"


def test_vllm_only_inside_actors_engines():
    for package in PROJECT:
        for path in _modules(package):
            if "vllm" in _imports(path):
                assert path.relative_to(REPO).parts[:2] == ("actors", "engines"), path


def test_the_checker_sees_lazy_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import ray\n    from vllm import LLM\n")
    assert {"ray", "vllm"} <= _imports(f)
