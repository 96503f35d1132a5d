"""recipes/train.py on 2 CPU processes (torchrun, gloo): DDP training, SVB sharded over the ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from recipe_helpers import RECIPES, REPO, make_data


@pytest.mark.slow
def test_two_processes_end_identical(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data", num_train=32, num_test=10, num_classes=4)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(RECIPES), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "tests" / "recipe_dist_worker.py"),
        str(tmp_path),
        str(data),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    # global batch 8 = 2 x 4: 4 steps per epoch, 8 in all; bounding after steps 3 and 6
    assert [r["steps"] for r in ranks] == [8, 8]
    assert [r["num_applied"] for r in ranks] == [2, 2] and ranks[0]["expected"] == 2
    assert ranks[0]["clipped"] > 0  # a tight band (0.05): the bounding changed weights, shared by broadcast
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # parameters and BN statistics
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["recipe"]["num_processes"] == 2 and run["status"] == "finished"
    assert len(list((tmp_path / "run" / "checkpoints" / "epoch_0002").glob("random_states_*.pkl"))) == 2
