"""The main command (README.md, recipes/README.md): ``python recipes/train.py`` with no arguments, no
network, on the CPU (the session's shared run, ``conftest.digits_run``)."""

from __future__ import annotations

import csv
import json
import re

import pytest


@pytest.mark.slow
def test_embedded_default_learns_the_digits(digits_run) -> None:
    done, tmp_path = digits_run.done, digits_run.cwd
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    match = re.search(r"^run folder: (\S+)$", done.stdout, re.MULTILINE)
    assert match, done.stdout
    run_dir = tmp_path / match.group(1)
    assert run_dir.parent == tmp_path / "runs" and run_dir.name.endswith("-convnet20_svb")
    run = json.loads((run_dir / "run.json").read_text())
    assert run["model"] == "convnet20_svb" and run["dataset"]["name"] == "sklearn-digits"
    assert run["status"] == "finished" and run["svb_config"]["epsilon"] == 0.5
    accuracy = 100 - run["metrics"]["final"]["top1_err"]
    assert accuracy >= 90, f"test accuracy {accuracy:.2f}%"
    assert f"top-1 {run['metrics']['final']['top1_err']:.2f}%" in done.stdout
    for name in ("model_best.safetensors", "model_final.safetensors", "summary.csv"):
        assert (run_dir / name).is_file()
    with open(run_dir / "summary.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == run["recipe"]["epochs"]
    assert int(rows[-1]["svb_applied_total"]) >= 1  # SVB + BBN ran (once an epoch, not in the final one)
