"""The layout a maintainer relies on: the logic is in the installed ``timm_svb`` (``timm_svb.recipe``,
``timm_svb.hub``), the checkout's ``recipes/`` and ``hub/`` are thin command lines that run as scripts and
as modules, without editing ``sys.path``, and ``import timm_svb`` stays light."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = [*sorted((REPO / "recipes").glob("*.py")), *sorted((REPO / "hub").glob("*.py"))]


def test_scripts_do_not_edit_the_import_path() -> None:
    for script in SCRIPTS:
        text = script.read_text(encoding="utf-8")
        assert "sys.path" not in text and "sys.modules" not in text, script


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv",
    [
        ["recipes/train.py"],
        ["-m", "recipes.train"],
        ["-m", "timm_svb.recipe"],
        ["recipes/validate.py"],
        ["-m", "recipes.validate"],
        ["recipes/study.py"],
        ["hub/publish.py"],
        ["-m", "hub.publish"],
    ],
)
def test_command_lines_run_as_scripts_and_as_modules(argv: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, *argv, "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]


@pytest.mark.slow  # a fresh interpreter imports torch: ~10 s
def test_importing_the_library_leaves_the_recipe_and_the_publisher_alone() -> None:
    code = "import sys, timm_svb; print(sorted(m for m in sys.modules if m.startswith(PREFIXES)))"
    code = code.replace("PREFIXES", repr(("timm_svb.recipe", "timm_svb.hub")))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.strip() == "[]"


def test_recipe_configs_ship_with_the_package() -> None:
    from importlib.resources import files  # noqa: PLC0415

    configs = [p.name for p in (files("timm_svb.recipe") / "configs").iterdir() if p.name.endswith(".yaml")]
    assert "table2_wrn28_10_cifar10_svb_bbn.yaml" in configs
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert '"timm_svb.recipe" = ["configs/*.yaml"]' in pyproject
