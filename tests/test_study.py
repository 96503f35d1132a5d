"""recipes/study.py: every arm x seed of a study trained (a stopped run resumed, a finished one skipped), the
records copied without weights, and the table and figure written from them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from recipe_helpers import RECIPES, make_data

STUDY = "cpu_fig2_convnet20"
SMALL = ["--epochs", "2", "--train-subset", "16", "--batch-size", "8", "--model-kwargs", "depth_x=1"]


def study(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, str(RECIPES / "study.py"), STUDY, "--runs", str(tmp_path / "runs")]
    cmd += ["--results", str(tmp_path / "results"), *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)


@pytest.mark.slow
def test_study_trains_resumes_skips_and_reports(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data", num_train=16, num_test=8, num_classes=10)
    extra = ["--data-dir", str(data), "--seeds", "0", "--arms", "sgd", "svb_bbn", *SMALL]
    # a run cut short after its first epoch: the study resumes it
    stopped = study(tmp_path, *extra[: -len(SMALL)], "--arms", "sgd", *SMALL, "--stop-after", "1")
    cut = json.loads((tmp_path / "runs" / STUDY / "sgd_s0" / "run.json").read_text())
    assert (cut["status"], cut["completed_epochs"]) == ("stopped", 1), stopped.stdout[-2000:]
    done = study(tmp_path, *extra)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    runs, results = tmp_path / "runs" / STUDY, tmp_path / "results" / STUDY
    for arm in ("sgd", "svb_bbn"):
        run = json.loads((runs / f"{arm}_s0" / "run.json").read_text())
        assert (
            run["status"] == "finished" and run["args"]["seed"] == 0 and run["recipe"]["train_subset"] == 16
        )
        kept = sorted(p.name for p in (results / f"{arm}_s0").iterdir())
        assert kept == ["args.yaml", "machine.json", "run.json", "summary.csv"]  # no weights
    assert [r["after_epoch"] for r in json.loads((runs / "sgd_s0" / "run.json").read_text())["resumes"]] == [
        1
    ]
    table = (results / "table.md").read_text()
    assert (
        "<local>/data, 2 epochs" in table and "| sgd | 0 | 2 | 16 |" in table and "| svb_bbn | 0 |" in table
    )
    assert (results / "curves.png").stat().st_size > 0
    # finished runs are skipped: nothing trains again, also without their run folders (a fresh checkout)
    again = study(tmp_path, *extra)
    assert again.returncode == 0 and "training" not in again.stdout
    shutil.rmtree(tmp_path / "runs")
    fresh = study(tmp_path, *extra)
    assert fresh.returncode == 0 and "training" not in fresh.stdout and not (tmp_path / "runs").exists()


def test_unknown_study_and_arm_are_named(tmp_path: Path) -> None:
    from timm_svb.recipe import study as study_module  # noqa: PLC0415

    with pytest.raises(SystemExit, match="cpu_table1_preact_resnet20"):
        study_module.arms("cpu_nothing")
    assert set(study_module.arms(STUDY)) == {"sgd", "svb", "svb_bbn"}
    with pytest.raises(SystemExit, match="unknown arm"):
        study_module.main([STUDY, "--arms", "nothing", "--report"])


def test_results_are_labelled_by_the_data_the_runs_read() -> None:
    """The table's label comes from run.json: the JPEG copy by its name, other data as given."""
    from timm_svb.hub.card import data_label  # noqa: PLC0415

    copy = {"name": "/x/cifar10-jpeg", "data_dir": "/x/cifar10-jpeg"}
    assert data_label(copy) == "CIFAR-10 (JPEG q75 copy)"
    assert data_label({"name": "uoft-cs/cifar10", "data_dir": None}) == "uoft-cs/cifar10"
    assert data_label({"name": "/x/other", "data_dir": "/x/other"}) == "<local>/other"


def test_study_figure_colours_methods_as_figure_2_and_names_seeds() -> None:
    """The committed Figure 2 study: blue SGD, red SVB, black SVB + BBN, in that order (the table's too); an
    arm's seeds share its colour, differ in line style, and the legend names each seed."""
    from timm_svb.recipe.study import finished_runs, study_curves  # noqa: PLC0415

    folder = Path(__file__).resolve().parents[1] / "results" / STUDY
    curves = study_curves(finished_runs(folder))
    colors = {"sgd": "tab:blue", "svb": "tab:red", "svb_bbn": "black"}
    seeds = {arm: sorted(p.name.rsplit("_s", 1)[1] for p in folder.glob(f"{arm}_s*")) for arm in colors}
    assert all(len(s) >= 2 for s in seeds.values()), seeds
    expected = [
        (f"{arm}, seed {seed}", color, ("-", "--", ":")[i])
        for arm, color in colors.items()
        for i, seed in enumerate(seeds[arm])
    ]
    assert [(c.label.split(":")[0], c.color, c.linestyle) for c in curves] == expected
    assert curves[len(seeds["sgd"])].label == "svb, seed 0: convnet20_svb, SVB eps 0.5"
    assert curves[-1].label.endswith("SVB eps 0.5 + BBN eps 1")
    table = (folder / "table.md").read_text()
    assert table.index("| sgd |") < table.index("| svb |") < table.index("| svb_bbn |")
