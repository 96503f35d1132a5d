"""recipes/train.py on 2 CPU processes (torchrun, gloo), one launch of several runs: DDP training with
gradient accumulation, SVB sharded over the ranks (and bounding the model EMA), per-rank augmentation, resume
of a torch.compile'd run (its EMA too), a streamed training split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from recipe_helpers import REPO, make_data

import timm_svb  # noqa: F401  (registers the zoo)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    tmp_path = tmp_path_factory.mktemp("dist")
    data = make_data(tmp_path / "data", num_train=32, num_test=10, num_classes=4)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "tests" / "workers" / "recipe_dist_worker.py"),
        str(tmp_path),
        str(data),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)], tmp_path


@pytest.mark.slow
def test_two_processes_end_identical(ranks: tuple[list[dict], Path]) -> None:
    (r0, r1), tmp_path = ranks
    assert r0["world"] == r1["world"] == 2
    a, b = r0["straight"], r1["straight"]
    # global batch 8 = 2 x 4 (each 2 micro-batches of 2): 4 steps per epoch, 8 in all; bounding after 3 and 6
    assert a["steps"] == b["steps"] == 8 and a["num_applied"] == b["num_applied"] == a["expected"] == 2
    assert a["clipped"] > 0  # a tight band (0.05): the bounding changed weights, shared by broadcast
    assert same(a["state"], b["state"])  # parameters and BN statistics
    # the EMA, bounded after each bounding of the model (a collective: on both ranks, or the run would hang),
    # ends identical on both ranks, BN statistics averaged over them as the model's
    assert a["ema_applied"] == b["ema_applied"] == 2 and same(a["ema_state"], b["ema_state"])
    assert not same(a["ema_state"], a["state"])
    run = json.loads((tmp_path / "straight" / "run.json").read_text())
    assert run["recipe"]["num_processes"] == 2 and run["status"] == "finished"
    assert len(list((tmp_path / "straight" / "checkpoints" / "epoch_0002").glob("random_states_*.pkl"))) == 2
    # spectrum statistics (--spectrum-every 1): computed by the main process only, once an epoch
    assert (
        len(r0["straight"]["seen"]["spectrum_summary"]) == 2
        and "spectrum_summary" not in r1["straight"]["seen"]
    )
    # --sync-bn has no CPU kernel: refused on every rank, with the reason
    assert "--sync-bn needs GPUs" in r0["sync_bn"] and "--sync-bn needs GPUs" in r1["sync_bn"]


@pytest.mark.slow
def test_ranks_augment_differently_over_a_shared_shuffle(ranks: tuple[list[dict], Path]) -> None:
    (r0, r1), _ = ranks
    seen0, seen1 = r0["straight"]["seen"], r1["straight"]["seen"]
    # each rank took its half of every global batch of one shuffle: disjoint, together the whole split
    for epoch in range(2):
        i0, i1 = (s["indices"][16 * epoch : 16 * (epoch + 1)] for s in (seen0, seen1))
        assert not set(i0) & set(i1) and sorted(i0 + i1) == list(range(32))
    assert seen0["indices"][:16] != seen0["indices"][16:]  # reshuffled every epoch
    # ... and drew its own random crops (seed + rank): with one seed for all, the lists would be equal
    assert len(seen0["crops"]) == len(seen1["crops"]) == 32
    assert seen0["crops"] != seen1["crops"]


@pytest.mark.slow
def test_compiled_run_resumes_bit_exact(ranks: tuple[list[dict], Path]) -> None:
    """Stopped after a compiled epoch, resumed without compiling: the uninterrupted run's weights."""
    (r0, r1), _ = ranks
    for r in (r0, r1):
        assert r["first"]["start_epoch"] == 0 and r["resumed"]["start_epoch"] == 1  # only epoch 2 retrained
        assert same(r["resumed"]["state"], r["straight"]["state"])
        assert same(r["resumed"]["ema_state"], r["straight"]["ema_state"])  # the EMA resumed exactly
        assert r["resumed"]["seen"]["crops"] == r["straight"]["seen"]["crops"][16:]  # the same draws


@pytest.mark.slow
def test_compiled_ddp_accumulates_without_sync_and_saves_plain_weights(
    ranks: tuple[list[dict], Path],
) -> None:
    (r0, r1), tmp_path = ranks
    # 4 steps an epoch of 2 micro-batches: the first of each inside DDP's no_sync, through the compile wrapper
    # in the compiled run (keep_torch_compile=True in unwrap_model would lose it)
    for run, entries in (("straight", 8), ("first", 4), ("resumed", 4)):
        assert len(r0[run]["seen"]["no_sync"]) == len(r1[run]["seen"]["no_sync"]) == entries
        assert same(r0[run]["state"], r1[run]["state"])
    keys = sorted(timm.create_model("convnet20_svb", num_classes=4, depth_x=1).state_dict())
    assert r0["first_files"] == {name: keys for name in r0["first_files"]}  # no `_orig_mod.` prefixes
    model = timm.create_model("convnet20_svb", num_classes=4, depth_x=1)
    model.load_state_dict(safetensors.torch.load_file(str(tmp_path / "b" / "model_final.safetensors")))
    assert same(model.state_dict(), r0["resumed"]["state"])


@pytest.mark.slow
def test_streamed_split_is_shared_out_over_the_ranks(ranks: tuple[list[dict], Path]) -> None:
    (r0, r1), _ = ranks
    s0, s1 = r0["streamed"]["seen"]["streamed"], r1["streamed"]["seen"]["streamed"]
    assert len(s0) == len(s1) == 16  # 4 steps of 4 images on each rank
    assert not {f for _, f in s0} & {f for _, f in s1}  # disjoint
    assert len({f for _, f in s0 + s1}) == 32  # together, the whole split
    assert same(r0["streamed"]["state"], r1["streamed"]["state"])
