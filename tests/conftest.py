"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the benchmark scripts import each other by name, as when they run; the tests import them (and the tools in
# tools/) the same way
for folder in ("benchmarks", "tools"):
    sys.path.insert(0, str(REPO / folder))


@dataclass(frozen=True)
class DigitsRun:
    """The README's main command, run once: ``python recipes/train.py`` with no arguments in ``cwd``."""

    cwd: Path
    done: subprocess.CompletedProcess

    @property
    def run_dir(self) -> Path:
        """The run folder the command printed (``run folder: runs/...``)."""
        assert self.done.returncode == 0, self.done.stdout[-2000:] + self.done.stderr[-4000:]
        match = re.search(r"^run folder: (\S+)$", self.done.stdout, re.MULTILINE)
        assert match, self.done.stdout
        return self.cwd / match.group(1)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> DigitsRun:
    """The embedded default training (scikit-learn's digits, CPU, no network), shared by the recipe-default
    test and the hub end-to-end tests: the one real run of a few minutes, made once per session. One torch
    thread, as the measured command of recipes/README.md (``OMP_NUM_THREADS=1 python recipes/train.py``):
    the thread count changes the figures."""
    cwd = tmp_path_factory.mktemp("digits")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "train.py"), "--no-progress"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    return DigitsRun(cwd, done)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run folder to publish (``hub_helpers.make_run``), made once in each module that uses it."""
    from hub_helpers import make_run  # here, not above: a test run without the hub tests does not load it

    return make_run(tmp_path_factory.mktemp("runs") / "tiny")
