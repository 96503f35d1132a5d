"""recipes/train.py end to end, on the CPU without network: whole training runs on generated data, the
run-folder contract, resume, fine-tuning, the schedules a run follows, compile; the offline command line."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from recipe_helpers import (
    RECIPES,
    make_data,
    one_thread,  # noqa: F401  (autouse fixture)
    optimizer_groups,
    recipe_data,
    recipe_loop,
    recipe_options,
    recipe_rundir,
    recipe_trainer,
    run_recipe,
)

import timm_svb  # noqa: F401  (registers the zoo)

# end-to-end runs: every test trains
pytestmark = pytest.mark.slow

build_test_loader, evaluate = recipe_data.build_test_loader, recipe_loop.evaluate
lr_at_epoch, parse_args = recipe_loop.lr_at_epoch, recipe_options.parse_args

RUN_KEYS = {
    "model",
    "model_kwargs",
    "num_classes",
    "svb_config",
    "dataset",
    "recipe",
    "metrics",
    "pretrained_cfg",
    "timm_svb_version",
}
TIMING = {"images_per_s", "epoch_s", "svb_s"}


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data") / "cifar_like", num_train=16, num_test=8, num_classes=4)


def read_summary(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "summary.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


@pytest.mark.slow
def test_offline_command_line_says_one_line(tmp_path: Path) -> None:
    """``python recipes/train.py -c table2_...`` offline: exit status 1, one line on stderr that says what to
    do, no traceback, no run folder."""
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    env.pop("HF_DATASETS_CACHE", None)
    done = subprocess.run(
        [sys.executable, str(RECIPES / "train.py"), "-c", "table2_wrn28_10_cifar10_svb_bbn"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # a sanity cap, not a speed check: that is the in-process test's no-retry assertion
        check=False,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: data set 'uoft-cs/cifar10'"), done.stderr
    assert "--data-dir DIR" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert [p.name for p in tmp_path.iterdir() if p.name != "hf"] == []  # no runs/


def test_cifar_model_trains_and_fills_the_run_folder(tmp_path: Path, cifar_like: Path) -> None:
    out = tmp_path / "run"
    args = "--model convnet20_svb --dataset generated-cifar --epochs 2 --batch-size 8 --lr 0.05"
    args += " --svb-every 2 --svb-skip-last 0"
    result = run_recipe([*args.split(), "--data-dir", str(cifar_like), "--output", str(out)])
    run = json.loads((out / "run.json").read_text())
    assert RUN_KEYS <= set(run)
    assert run["model"] == "convnet20_svb" and run["num_classes"] == 4
    assert run["svb_config"] == {"epsilon": 0.5, "bbn_epsilon": 1.0, "every_n_steps": 2}
    assert run["dataset"]["name"] == "generated-cifar" and run["dataset"]["num_test_images"] == 8
    assert run["dataset"]["label_names"] == [f"class{i}" for i in range(4)]
    assert run["pretrained_cfg"]["input_size"] == [3, 32, 32] and run["pretrained_cfg"]["crop_pct"] == 1.0
    assert run["recipe"]["aug"] == "cifar" and run["recipe"]["epochs"] == 2 and run["status"] == "finished"
    for which in ("best", "final"):
        assert set(run["metrics"][which]) == {"epoch", "top1_err", "top5_err"}
    assert run["metrics"]["final"]["epoch"] == 2
    # 2 steps per epoch; bounding after steps 2 and 4, but not in the final epoch (step 4)
    assert result.svb_steps == [2] and result.svb.num_applied == 1
    rows = read_summary(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [float(r["lr"]) for r in rows] == pytest.approx(
        [lr_at_epoch(e, lr=0.05, epochs=2) for e in (0, 1)], rel=1e-5
    )
    assert [int(r["svb_applied"]) for r in rows] == [1, 0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0001", "epoch_0002"]
    # the weights load into timm.create_model(run["model"], **run["model_kwargs"]), re-evaluate to the record
    model = timm.create_model(run["model"], **run["model_kwargs"])
    model.load_state_dict(load_weights(out / "model_final.safetensors"), strict=True)
    assert all(torch.equal(v, result.model.state_dict()[k]) for k, v in model.state_dict().items())
    metrics = evaluate(model, build_test_loader(run, batch_size=3))
    assert metrics["top1_err"] == pytest.approx(run["metrics"]["final"]["top1_err"])
    assert metrics["top5_err"] == pytest.approx(run["metrics"]["final"]["top5_err"])
    best = timm.create_model(run["model"], **run["model_kwargs"])
    best.load_state_dict(load_weights(out / "model_best.safetensors"), strict=True)
    # the final singular-value spectrum plot (Figure 1 style) is a PNG in the run folder
    assert (out / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a finished run is not overwritten by accident
    with pytest.raises(SystemExit, match="--resume"):
        run_recipe(["--data-dir", str(cifar_like), "--output", str(out)])


def test_small_299_input_model(tmp_path: Path) -> None:
    data = make_data(tmp_path / "big", num_train=8, num_test=4, num_classes=3, image_size=(40, 48))
    out = tmp_path / "run"
    args = "--model test_resnet --input-size 3 299 299 --crop-pct 0.8975 --epochs 1 --batch-size 4 --lr 0.01"
    args += " --svb-epsilon 0.5 --bbn-epsilon 1 --svb-every 1 --svb-skip-last 0 --no-svb-skip-final-epoch"
    args += " --checkpoint-hist 0"
    result = run_recipe([*args.split(), "--data-dir", str(data), "--output", str(out)])
    run = json.loads((out / "run.json").read_text())
    assert run["recipe"]["aug"] == "inception"
    assert (
        run["pretrained_cfg"]["input_size"] == [3, 299, 299] and run["pretrained_cfg"]["crop_pct"] == 0.8975
    )
    assert run["svb_config"]["epsilon"] == 0.5 and run["svb_config"]["bbn_epsilon"] == 1.0
    assert result.svb.num_applied == 2
    loader = build_test_loader(run)
    x, _ = next(iter(loader))
    assert tuple(x.shape[1:]) == (3, 299, 299)
    assert not (out / "checkpoints").exists()


def test_resume_gives_the_same_weights(tmp_path: Path, cifar_like: Path) -> None:
    args = "--model convnet20_svb --epochs 2 --batch-size 8 --lr 0.05 --seed 7"
    args += " --svb-every 3 --svb-skip-last 0 --no-svb-skip-final-epoch"
    common = [*args.split(), "--data-dir", str(cifar_like)]
    straight = run_recipe([*common, "--output", str(tmp_path / "a")])
    first = run_recipe([*common, "--output", str(tmp_path / "b"), "--stop-after", "1"])
    assert not first.finished and not (tmp_path / "b" / "model_final.safetensors").exists()
    assert json.loads((tmp_path / "b" / "run.json").read_text())["status"] == "stopped"
    # the weights, data order and random state come from the checkpoint: another seed is refused, as is
    # switching SVB off (its schedule is in the checkpoint)
    with pytest.raises(SystemExit, match="--seed"):
        run_recipe([*common, "--output", str(tmp_path / "b"), "--resume", "--seed", "8"])
    with pytest.raises(SystemExit, match="SVB off"):
        run_recipe([*common, "--output", str(tmp_path / "b"), "--resume", "--no-svb"])
    # a save killed half-way leaves a temporary folder, never a checkpoint: resuming ignores it
    junk = tmp_path / "b" / "checkpoints" / ".tmp-epoch_0002"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"half a file")
    resumed = run_recipe([*common, "--output", str(tmp_path / "b"), "--resume"])
    assert not junk.exists()
    # only the remaining epoch trained (retraining from scratch would end with the same weights)
    assert resumed.start_epoch == 1 and resumed.run["resumes"][0]["after_epoch"] == 1
    assert resumed.finished and straight.svb.num_applied == resumed.svb.num_applied == 1  # after step 3
    a = load_weights(tmp_path / "a" / "model_final.safetensors")
    b = load_weights(tmp_path / "b" / "model_final.safetensors")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    rows_a, rows_b = read_summary(tmp_path / "a"), read_summary(tmp_path / "b")
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in rows_a] == [
        {k: v for k, v in r.items() if k not in TIMING} for r in rows_b
    ]


def test_resume_after_a_rewind_follows_the_branch_resumed(
    tmp_path: Path, cifar_like: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Train 3 epochs, resume from epoch 1 with another rate for one epoch, then ``--resume``: it continues
    the rewound branch (from its epoch 2), not the abandoned epoch 3; pruning keeps the checkpoint resumed
    from; what the abandoned branch did is moved aside; ``args.yaml`` is written atomically."""
    args = (
        "--model convnet20_svb --epochs 3 --batch-size 8 --lr 0.05 --seed 7 --svb-every 3 --svb-skip-last 0"
    )
    common = [*args.split(), "--data-dir", str(cifar_like)]
    out = tmp_path / "run"
    run_recipe([*common, "--output", str(out)])
    written: list[str] = []
    real = recipe_rundir.atomic_write_text
    monkeypatch.setattr(
        recipe_trainer,
        "atomic_write_text",
        lambda path, text: written.append(Path(path).name) or real(path, text),
        raising=False,
    )
    rewind = ["--resume", str(out / "checkpoints" / "epoch_0001"), "--lr", "0.01", "--stop-after", "1"]
    rewound = run_recipe([*common, *rewind])
    assert rewound.start_epoch == 1 and not rewound.finished
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0001", "epoch_0002"]
    assert not (out / "model_final.safetensors").exists()
    moved = out / "abandoned" / "after_epoch_0001"
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["epoch_0002", "epoch_0003"]
    assert (moved / "model_final.safetensors").is_file()
    resumed = run_recipe([*common, "--lr", "0.01", "--output", str(out), "--resume"])
    assert resumed.start_epoch == 2 and resumed.finished
    assert resumed.run["resumes"][-1]["checkpoint"] == "epoch_0002"
    final = load_weights(out / "model_final.safetensors")
    assert all(torch.equal(final[k], v) for k, v in resumed.model.state_dict().items())
    assert [int(r["epoch"]) for r in read_summary(out)] == [1, 2, 3]
    assert "args.yaml" in written


@pytest.fixture(scope="module")
def one_epoch_svb_run(tmp_path_factory: pytest.TempPathFactory, cifar_like: Path) -> dict[str, Any]:
    """A 1-epoch run of an SVB model with the default SVB schedule (once an epoch, not in the final one),
    under umask 022; its log."""
    out = tmp_path_factory.mktemp("one_epoch") / "run"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("timm_svb.recipe")
    logger.addHandler(handler)
    mask = os.umask(0o022)
    try:
        args = "--model convnet20_svb --epochs 1 --batch-size 8 --lr 0.05"
        result = run_recipe([*args.split(), "--data-dir", str(cifar_like), "--output", str(out)])
    finally:
        os.umask(mask)
        logger.removeHandler(handler)
    return {"out": out, "result": result, "log": stream.getvalue()}


def test_a_schedule_that_never_applies_svb_says_so_and_why(one_epoch_svb_run: dict[str, Any]) -> None:
    """--epochs 1 with the default schedule applies SVB 0 times: warned, naming every option that caused it,
    and recorded (``svb_applied_total`` 0) for the publisher."""
    log, out = one_epoch_svb_run["log"], one_epoch_svb_run["out"]
    assert one_epoch_svb_run["result"].svb.num_applied == 0
    (warning,) = [line for line in log.splitlines() if "applies it 0 times" in line]
    assert "plain SGD" in warning
    for option in ("--epochs 1", "--svb-every", "--svb-skip-final-epoch"):
        assert option in warning, option
    assert json.loads((out / "run.json").read_text())["svb_applied_total"] == 0


def test_weights_files_have_the_mode_of_every_other_file(one_epoch_svb_run: dict[str, Any]) -> None:
    """model_*.safetensors are readable as the run's other files (safetensors alone writes 0600)."""
    out = one_epoch_svb_run["out"]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()}
    assert {"model_best.safetensors", "model_final.safetensors", "run.json"} <= modes.keys()
    assert set(modes.values()) == {0o644}, modes


def test_bf16_autocast_and_gradient_accumulation(tmp_path: Path, cifar_like: Path) -> None:
    args = "--model convnet20_svb --epochs 1 --batch-size 8 --grad-accum-steps 2 --mixed-precision bf16"
    args += " --svb-every 1 --svb-skip-last 0 --no-svb-skip-final-epoch --checkpoint-hist 0 --lr 0.05"
    result = run_recipe([*args.split(), "--data-dir", str(cifar_like), "--output", str(tmp_path / "run")])
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["recipe"]["mixed_precision"] == "bf16"
    # 2 batches of 8, each 2 accumulated micro-batches of 4: 2 optimizer steps, SVB after each
    assert result.svb.step == 2 and result.svb.num_applied == 2
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # SVB bounds float32 weights


def test_fine_tune_from_initial_checkpoint(tmp_path: Path, cifar_like: Path) -> None:
    first = run_recipe(
        [
            *"--epochs 1 --batch-size 8 --checkpoint-hist 0 --no-svb".split(),
            "--data-dir",
            str(cifar_like),
            "--output",
            str(tmp_path / "a"),
        ]
    )
    assert first.svb is None and json.loads((tmp_path / "a" / "run.json").read_text())["svb_config"] is None
    args = "--epochs 1 --batch-size 8 --checkpoint-hist 0 --num-classes 6 --lr 0 --sched const --no-svb"
    tuned = run_recipe(
        [
            *args.split(),
            "--initial-checkpoint",
            str(tmp_path / "a" / "model_final.safetensors"),
            "--data-dir",
            str(cifar_like),
            "--output",
            str(tmp_path / "b"),
        ]
    )
    assert tuned.model.num_classes == 6
    before = load_weights(tmp_path / "a" / "model_final.safetensors")
    after = tuned.model.state_dict()
    # lr 0: the convolutions are the checkpoint's (BN statistics moved on); the new classifier has 6 outputs
    assert torch.equal(before["stem.conv.weight"], after["stem.conv.weight"].contiguous())
    assert after["fc.weight"].shape[0] == 6


def test_fine_tune_takes_the_model_from_run_json(
    tmp_path: Path, cifar_like: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No --model: the run.json beside --initial-checkpoint names the model and its kwargs (logged); the
    classifier is kept for the same number of classes and replaced for another, and each is logged; weights
    without a run.json, or a --model they do not fit, are refused naming what to pass."""
    common = [*"--epochs 1 --batch-size 8 --checkpoint-hist 0 --no-svb --lr 0 --sched const".split()]
    common += ["--data-dir", str(cifar_like)]
    run_recipe(
        [*common, "--model", "convnet20", "--model-kwargs", "depth_x=1", "--output", str(tmp_path / "a")]
    )
    weights = tmp_path / "a" / "model_final.safetensors"
    record = tmp_path / "a" / "run.json"
    for name, more in (("same", []), ("more", ["--num-classes", "6"])):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="timm_svb.recipe"):
            tuned = run_recipe(
                [*common, *more, "--initial-checkpoint", str(weights), "--output", str(tmp_path / name)]
            )
        run = json.loads((tmp_path / name / "run.json").read_text())
        assert (run["model"], run["model_kwargs"]["depth_x"]) == ("convnet20", 1)
        assert run["args"]["model"] == "convnet20"
        head = load_weights(weights)["fc.weight"]
        logged = f"initial checkpoint {weights} (convnet20, as {record} names): "
        if name == "same":
            assert torch.equal(tuned.model.state_dict()["fc.weight"], head)
            assert logged + "classifier kept (the same number of classes)" in caplog.text
        else:
            assert (
                tuned.model.num_classes == 6 and logged + "new classifier (fc.bias, fc.weight)" in caplog.text
            )
    wrong = [*common, "--initial-checkpoint", str(weights), "--output", str(tmp_path / "wrong")]
    with pytest.raises(
        SystemExit, match=rf"{record} says they are convnet20 with model kwargs .*'depth_x': 1"
    ):
        run_recipe([*wrong, "--model", "convnet20_svb"])
    alone = tmp_path / "elsewhere" / "weights.safetensors"
    alone.parent.mkdir()
    shutil.copy(weights, alone)
    bare = [*common, "--initial-checkpoint", str(alone), "--output", str(tmp_path / "bare")]
    with pytest.raises(SystemExit, match="no run.json beside them names their model: pass the --model"):
        run_recipe(bare)


def test_max_steps_cuts_the_run_and_keeps_the_epochs_schedules(tmp_path: Path, cifar_like: Path) -> None:
    """--epochs 3 --max-steps 6 at 4 steps an epoch: 6 optimizer steps at the LRs of the 3-epoch schedule, SVB
    after each (its schedule is the 3 epochs'), epoch 2 cut, tested and recorded but not checkpointed; status
    stopped_max_steps, no final weights; --resume without the cap finishes from epoch 1's checkpoint. A cap on
    an epoch's end checkpoints it; a cap past the run's steps changes nothing."""
    args = "--epochs 3 --batch-size 4 --lr 0.1 --svb-every 1 --svb-skip-last 0 --no-svb-skip-final-epoch"
    out = tmp_path / "cut"
    with optimizer_groups() as steps:
        cut = run_recipe(
            [*args.split(), "--max-steps", "6", "--data-dir", str(cifar_like), "--output", str(out)]
        )
    lrs = [lr_at_epoch(e, lr=0.1, epochs=3) for e in (0, 1)]
    assert [step[0]["lr"] for step in steps] == pytest.approx([lrs[0]] * 4 + [lrs[1]] * 2, rel=1e-12)
    assert cut.svb_steps == list(range(1, 13)) and cut.svb.num_applied == 6 and not cut.finished
    run = json.loads((out / "run.json").read_text())
    assert (run["status"], run["completed_epochs"], run["svb_applied_total"]) == ("stopped_max_steps", 1, 6)
    assert [r["epoch"] for r in read_summary(out)] == ["1", "2"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0001"]
    assert not (out / "model_final.safetensors").exists() and (out / "model_best.safetensors").exists()
    resumed = run_recipe([*args.split(), "--resume", "--output", str(out), "--data-dir", str(cifar_like)])
    assert (
        resumed.finished
        and resumed.start_epoch == 1
        and [r["epoch"] for r in read_summary(out)] == list("123")
    )
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    for cap, status, done in ((8, "stopped_max_steps", 2), (12, "finished", 3)):
        out = tmp_path / str(cap)
        run_recipe(
            [*args.split(), "--max-steps", str(cap), "--data-dir", str(cifar_like), "--output", str(out)]
        )
        run = json.loads((out / "run.json").read_text())
        assert (run["status"], run["completed_epochs"]) == (status, done)
        assert f"epoch_{done:04d}" in {p.name for p in (out / "checkpoints").iterdir()}
    with pytest.raises(SystemExit):
        parse_args(["--max-steps", "0"])


def test_warmup_rises_every_step(tmp_path: Path, cifar_like: Path) -> None:
    args = (
        "--epochs 2 --batch-size 4 --lr 0.1 --warmup-epochs 1 --warmup-lr 0.01 --no-svb --checkpoint-hist 0"
    )
    with optimizer_groups() as steps:
        run_recipe([*args.split(), "--data-dir", str(cifar_like), "--output", str(tmp_path / "run")])
    seen = [step[0]["lr"] for step in steps]
    # 16 images, batch 4: 4 steps an epoch; step s of the warm-up epoch: 0.01 + (0.1 - 0.01) * s / 4
    warmup = [0.01 + 0.09 * s / 4 for s in range(4)]
    after = float(np.logspace(np.log10(0.1), np.log10(0.001), 80)[1 * 80 // 2])  # epoch 1 of 2, exp
    assert seen == pytest.approx(warmup + [after] * 4, rel=1e-12)


def test_resume_with_more_epochs_follows_the_command_line(
    tmp_path: Path, cifar_like: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--resume --epochs 4 on a 2-epoch run: the LR schedule and SVB's final-epoch rule both use 4."""
    args = "--model convnet20_svb --batch-size 8 --lr 0.05 --svb-every 1ep --svb-skip-last 0"
    common = [*args.split(), "--data-dir", str(cifar_like), "--output", str(tmp_path / "run")]
    first = run_recipe([*common, "--epochs", "2", "--stop-after", "1", "--weight-decay", "0"])
    # 2 steps an epoch, bounding after every 3rd step: step 3 opens epoch 2, the final one of 2 epochs
    assert first.svb_steps == []
    with caplog.at_level(logging.INFO, logger="timm_svb.recipe"), optimizer_groups() as steps:
        resumed = run_recipe(
            [*common, "--epochs", "4", "--stop-after", "1", "--weight-decay", "1e-3", "--resume"]
        )
    assert resumed.start_epoch == 1 and not resumed.finished
    stages = np.logspace(np.log10(0.05), np.log10(0.001), 80)
    assert [s[0]["lr"] for s in steps] == pytest.approx(
        [stages[1 * 80 // 4]] * 2, rel=1e-12
    )  # of 4, not of 2
    assert [s[0]["weight_decay"] for s in steps] == [1e-3, 1e-3]  # not the checkpoint's 0
    assert resumed.svb_steps == [3, 6] and resumed.svb.num_applied == 1  # after step 3: not final of 4
    assert resumed.state.history[-1]["svb_applied"] == 1
    text = caplog.text
    assert "epochs 2 -> 4" in text and "weight_decay 0.0 -> 0.001" in text
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["epochs"] == 4 and run["recipe"]["epochs"] == 4
    assert run["resumes"] == [
        {
            "after_epoch": 1,
            "checkpoint": "epoch_0001",
            "changed": {"epochs": [2, 4], "weight_decay": [0.0, 0.001]},
        }
    ]
    assert [r["lr"] for r in read_summary(tmp_path / "run")] == [f"{0.05:.6g}", f"{stages[20]:.6g}"]


def test_compiled_run_saves_timm_weights_publishes_and_resumes(tmp_path: Path, cifar_like: Path) -> None:
    """--compile (aot_eager: the same wrappers as inductor, compiled in seconds on a CPU) writes plain timm
    state dicts that hub/publish.py takes; the run resumes without compiling."""
    from timm_svb.hub import publish  # noqa: PLC0415

    out = tmp_path / "run"
    tiny = "--model convnet20_svb --model-kwargs depth_x=1 --batch-size 8 --lr 0.05"
    common = [*tiny.split(), "--data-dir", str(cifar_like), "--output", str(out)]
    compiled = run_recipe([*common, "--epochs", "1", "--compile", "aot_eager"])
    run = json.loads((out / "run.json").read_text())
    keys = set(timm.create_model(run["model"], **run["model_kwargs"]).state_dict())
    for name in (
        "model_best.safetensors",
        "model_final.safetensors",
        "checkpoints/epoch_0001/model.safetensors",
    ):
        assert set(load_weights(out / name)) == keys  # no `_orig_mod.` prefix
    model = timm.create_model(run["model"], **run["model_kwargs"])
    model.load_state_dict(load_weights(out / "model_final.safetensors"), strict=True)
    assert (
        publish.main([str(out), "--repo-id", "timm-svb/convnet20_svb.test", "--dry-run", str(tmp_path / "p")])
        == 0
    )
    assert (tmp_path / "p" / "model.safetensors").is_file()
    resumed = run_recipe([*common, "--epochs", "2", "--resume"])
    assert resumed.start_epoch == 1 and resumed.finished
    assert not torch.equal(resumed.model.fc.weight, compiled.model.fc.weight)  # it trained on from there
