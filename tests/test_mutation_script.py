"""The mutation check (tests/mutation.py) itself: its patches are valid Python and a stale one is reported."""

from __future__ import annotations

from pathlib import Path

import mutation  # tests/mutation.py, beside this file (tests/ is on sys.path, as for recipe_helpers)
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
