"""The mutation check (tools/mutation.py) itself: its patches are valid Python and a stale one is reported."""

from __future__ import annotations

import ast
import importlib
import textwrap
from pathlib import Path

import mutation  # tools/mutation.py (conftest.py puts tools/ on sys.path, as running it does)
import pytest


@pytest.mark.parametrize("mutant", [m for m in mutation.MUTANTS if m.patch], ids=lambda m: m.name)
def test_every_patch_is_valid_module_code(mutant):
    # the patch runs as module code at interpreter start-up: it must compile there, not as an indented string
    compile(mutation.sitecustomize(mutant), f"sitecustomize ({mutant.name})", "exec")


def test_every_mutant_names_tests_that_exist():
    root = Path(__file__).resolve().parents[1]
    for mutant in mutation.MUTANTS:
        for test in mutant.tests:
            path, _, name = test.partition("::")
            assert (root / path).is_file(), (mutant.name, path)
            assert not name or f"def {name.split('[')[0]}(" in (root / path).read_text(), (mutant.name, test)


@pytest.mark.slow
def test_a_patch_naming_what_is_gone_is_stale(tmp_path):
    gone = mutation.Mutant(
        name="gone",
        breaks="nothing",
        tests=(),
        patch="from timm_svb import functional\nfunctional.no_such_name",
    )
    (tmp_path / "timm_svb").mkdir()
    (tmp_path / "timm_svb" / "__init__.py").write_text("")
    (tmp_path / "timm_svb" / "functional.py").write_text("")
    assert "the patch does not apply: AttributeError" in mutation.apply(gone, tmp_path)


def test_an_edit_whose_text_is_gone_is_stale(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    gone = mutation.Mutant(name="gone", breaks="nothing", tests=(), edits=(("a.py", "x = 2", "x = 3"),))
    assert "occurs 0 times" in mutation.apply(gone, tmp_path)


def assigned_attributes(patch: str) -> list[tuple[object, str, str]]:
    """``(object, attribute, source)`` for each ``obj.attr = ...`` or ``obj.attr[...] = ...`` in a patch
    whose ``obj`` is a module it imports (or an attribute path from one), resolved in this interpreter."""
    tree = ast.parse(textwrap.dedent(patch))
    bound: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                bound[alias.asname or top] = importlib.import_module(alias.name if alias.asname else top)
                importlib.import_module(alias.name)  # `import a.b` binds a, with a.b loaded
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                try:
                    value = importlib.import_module(f"{node.module}.{alias.name}")
                except ModuleNotFoundError:
                    value = getattr(importlib.import_module(node.module), alias.name)
                bound[alias.asname or alias.name] = value

    def resolve(expr: ast.expr) -> object | None:
        if isinstance(expr, ast.Name):
            return bound.get(expr.id)
        if isinstance(expr, ast.Attribute):
            owner = resolve(expr.value)
            return None if owner is None else getattr(owner, expr.attr)
        return None

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                target = target.value if isinstance(target, ast.Subscript) else target
                if isinstance(target, ast.Attribute):
                    owner = resolve(target.value)
                    if owner is not None:
                        found.append((owner, target.attr, ast.unparse(target)))
    return found


@pytest.mark.parametrize("mutant", [m for m in mutation.MUTANTS if m.patch], ids=lambda m: m.name)
def test_every_patch_replaces_names_that_exist(mutant):
    # assigning to a module attribute that moved elsewhere creates a new one and puts no bug in: the mutant
    # would be killed by nothing, or survive for the wrong reason; apply() only sees names the patch reads
    for owner, attribute, source in assigned_attributes(mutant.patch):
        assert hasattr(owner, attribute), f"{mutant.name}: {source} names nothing that exists"


def test_a_patch_replacing_a_moved_name_is_seen():
    # _svd_clip lives in timm_svb._solver: replacing it on functional would silently put no bug in
    moved = (
        "import torch\nfrom timm_svb import functional as f\nf._svd_clip = f._ROUTES[torch.float32] = None"
    )
    assert [
        (owner.__name__, name, hasattr(owner, name)) for owner, name, _ in assigned_attributes(moved)
    ] == [
        ("timm_svb.functional", "_svd_clip", False),
        ("timm_svb.functional", "_ROUTES", False),
    ]
