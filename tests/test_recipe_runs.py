"""recipes/train.py on the CPU without network: generated data, the run-folder contract, resume, schedules."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import shutil
import stat
import sys
from pathlib import Path
from types import SimpleNamespace
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
from torch import nn

import timm_svb  # noqa: F401  (registers the zoo)

DIGITS, DataError = recipe_data.DIGITS, recipe_data.DataError
build_test_loader, digits_dataset = recipe_data.build_test_loader, recipe_data.digits_dataset
load_image_dataset = recipe_data.load_image_dataset
RecipeLR, evaluate, lr_at_epoch = recipe_loop.RecipeLR, recipe_loop.evaluate, recipe_loop.lr_at_epoch
parse_svb_every, parse_args = recipe_loop.parse_svb_every, recipe_options.parse_args

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


# ------------------------------------------------------------------------------------------- schedules


def reference_lr(epoch: int) -> float:
    """The reference's exp regime, written out: 80 log-spaced rates 0.5 -> 0.001, each for 2 of 160 epochs."""
    return float(np.logspace(np.log10(0.5), np.log10(0.001), 80)[epoch // 2])


@pytest.mark.parametrize("epoch", [0, 1, 2, 3, 17, 40, 79, 80, 121, 158, 159])
def test_lr_schedule_matches_reference(epoch: int) -> None:
    assert lr_at_epoch(
        epoch, sched="exp", lr=0.5, min_lr=0.001, epochs=160, decay_stages=80
    ) == pytest.approx(reference_lr(epoch), rel=1e-12)


def test_scheduler_holds_each_rate_for_whole_epochs() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    scheduler = RecipeLR(optimizer, 3, sched="exp", lr=0.5, min_lr=0.001, epochs=160, decay_stages=80)
    seen = []
    for _ in range(160 * 3):  # stepped after every optimizer step, 3 steps an epoch
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([reference_lr(s // 3) for s in range(160 * 3)], rel=1e-12)
    seen = seen[::3]
    assert seen[0] == 0.5 and seen[-1] == pytest.approx(0.001)
    # ImageNet (Table 4): the same shape from 0.045
    assert lr_at_epoch(0, lr=0.045, epochs=160) == 0.045
    assert lr_at_epoch(159, lr=0.045, epochs=160) == pytest.approx(0.001)


def test_scheduler_checkpoint_holds_the_step_only() -> None:
    """A resumed run takes the schedule's settings from its command line: the state is the step count."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    old = RecipeLR(optimizer, 4, sched="exp", lr=0.5, min_lr=0.001, epochs=2, decay_stages=80)
    for _ in range(5):
        optimizer.step()
        old.step()
    new = RecipeLR(optimizer, 4, sched="exp", lr=0.5, min_lr=0.001, epochs=4, decay_stages=80)
    new.load_state_dict(old.state_dict())
    assert old.state_dict() == {"step": 5} and new.last_epoch == 5
    stage_20 = np.logspace(np.log10(0.5), np.log10(0.001), 80)[20]  # epoch 1 of 4: stage 1 * 80 // 4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(stage_20, rel=1e-12)
    new.load_state_dict({"last_epoch": 3})  # the per-epoch scheduler of earlier versions: epochs done
    assert new.last_epoch == 12


def test_lr_base_scales_with_the_global_batch() -> None:
    """timm's --lr-base rule: lr = lr_base x batch / lr_base_size, square-rooted for adaptive optimizers."""
    args = parse_args(["-c", "table4_inception_resnet_v2_svb", "--batch-size", "1024", "--lr-base", "0.045"])
    assert args.lr == pytest.approx(0.045 * 1024 / 256)  # timm's default size 256 replaces the config's lr
    args = parse_args([*"--batch-size 1024 --lr-base 0.045 --lr-base-size 128".split()])
    assert args.lr == pytest.approx(0.36)
    args = parse_args([*"--batch-size 512 --lr-base 1e-3 --opt adamw".split()])
    assert args.lr == pytest.approx(1e-3 * 2**0.5)
    args = parse_args([*"--batch-size 512 --lr-base 1e-3 --opt adamw --lr-base-scale linear".split()])
    assert args.lr == pytest.approx(2e-3)
    assert parse_args(["--batch-size", "64"]).lr == 0.2  # no --lr-base: --lr as given
    with pytest.raises(SystemExit):
        parse_args(["--lr", "0.1", "--lr-base", "0.1"])


def test_help_lists_the_scale_out_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        parse_args(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--compile [BACKEND]", "--lr-base LR", "--lr-base-size N", "--streaming", "--sync-bn"):
        assert option in text
    assert "rising every optimizer step" in text


def test_plain_state_dict_drops_wrapper_prefixes() -> None:
    """Weights saved through torch.compile(DDP(model)) by earlier versions load into the timm model."""
    plain_state_dict = recipe_rundir.plain_state_dict
    assert plain_state_dict({"_orig_mod.module.a.w": 1, "_orig_mod.module.b": 2}) == {"a.w": 1, "b": 2}
    assert plain_state_dict({"module.a": 1}) == {"a": 1}
    # DDP around a compiled model: the prefixes in the other order
    assert plain_state_dict({"module._orig_mod.a.w": 1, "module._orig_mod.b": 2}) == {"a.w": 1, "b": 2}
    assert plain_state_dict({"module.a": 1, "b": 2}) == {"module.a": 1, "b": 2}  # not a wrapper's prefix


def test_cosine_schedule_starts_at_the_peak_after_warmup() -> None:
    """After warm-up the cosine anneals over the remaining epochs: the peak rate at the end of warm-up, the
    midpoint half-way through the remaining epochs, and --min-lr at --epochs."""
    schedule = {"sched": "cosine", "lr": 0.1, "min_lr": 0.001, "epochs": 25, "warmup_epochs": 5}
    assert lr_at_epoch(5, **schedule) == pytest.approx(0.1)
    assert lr_at_epoch(15, **schedule) == pytest.approx(0.0505)
    assert lr_at_epoch(25, **schedule) == pytest.approx(0.001)
    assert lr_at_epoch(2.5, **schedule) == pytest.approx(1e-4 + (0.1 - 1e-4) / 2)


def test_run_state_keeps_the_best_ema_across_a_checkpoint() -> None:
    """A resumed run's state (from a checkpoint) still knows the EMA's best epoch: a worse EMA epoch after the
    resume is not its new best (model_best_ema.safetensors is not overwritten)."""
    state = recipe_rundir.RunState()
    errors = {1: (50.0, 40.0), 2: (45.0, 60.0)}  # epoch: (model top-1, EMA top-1)
    for epoch, (top1, ema) in errors.items():
        state.record(
            {"epoch": epoch, "top1_err": top1, "top5_err": 9.0, "ema_top1_err": ema, "ema_top5_err": 9.0}
        )
    restored = recipe_rundir.RunState()
    restored.load_state_dict(state.state_dict())
    assert restored.best_ema == state.best_ema == {"epoch": 1, "top1_err": 40.0, "top5_err": 9.0}
    new = restored.record(
        {"epoch": 3, "top1_err": 44.0, "top5_err": 9.0, "ema_top1_err": 55.0, "ema_top5_err": 9.0}
    )
    assert new == ["best"] and restored.metrics()["best_ema"]["epoch"] == 1


def test_the_ema_counts_steps_over_the_whole_run() -> None:
    """The EMA is updated with the run's step number, not the epoch's: its decay warm-up does not restart."""
    accelerator = recipe_trainer.make_accelerator(cpu=True)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = [(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(3)]
    steps: list[int] = []
    ema = SimpleNamespace(update=lambda step: steps.append(step))
    recipe_loop.train_one_epoch(model, loader, optimizer, accelerator, epoch=2, ema=ema, progress=False)
    assert steps == [7, 8, 9]


def test_the_emas_svb_leaves_excluded_and_frozen_layers_alone() -> None:
    """The EMA copy is bounded on the model SVB's layer selection: without --svb-exclude's layers and the
    frozen ones (bounding them would change weights that training does not)."""
    model = timm.create_model("convnet20_svb", num_classes=4)
    for p in model.stem.parameters():
        p.requires_grad_(False)
    args = SimpleNamespace(model_ema_decay=0.9, model_ema_warmup=False, svb_exclude=["fc"])
    svb = recipe_loop.RecordingSVB(model, 0.5, 1.0, exclude=recipe_trainer._svb_exclude(args, model))
    ema = recipe_trainer._make_ema(args, model, svb)
    names = [layer.name for layer in ema.svb.layers]
    assert names == [layer.name for layer in svb.layers]
    assert "fc" not in names and not any(n.startswith("stem") for n in names)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_mixup_mode_is_used(mode: str) -> None:
    args = SimpleNamespace(
        mixup=0.8,
        cutmix=1.0,
        mixup_prob=1.0,
        mixup_switch_prob=0.5,
        mixup_mode=mode,
        smoothing=0.1,
        batch_size=8,
    )
    accelerator = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    mixup_fn, _ = recipe_trainer._mixup_and_loss(args, accelerator, 4)
    assert mixup_fn.mode == mode


def test_svb_every_parsing() -> None:
    assert parse_svb_every("1ep", 390) == 391  # the reference's svb_iter for CIFAR at batch 128
    assert parse_svb_every("2ep", 390) == 782
    assert parse_svb_every("391", 390) == 391
    assert parse_svb_every(50, 390) == 50
    for bad in ("0", "-3ep", "often"):
        with pytest.raises(ValueError):
            parse_svb_every(bad, 390)


# ------------------------------------------------------------------------------------------- configs


CONFIGS = sorted(recipe_options.CONFIG_DIR.glob("*.yaml"))


def test_every_paper_recipe_is_there() -> None:
    names = {p.stem for p in CONFIGS}
    for prefix in ("fig2_convnet20", "fig2_convnet38"):
        assert {f"{prefix}_sgd", f"{prefix}_svb", f"{prefix}_svb_bbn"} <= names
    assert {f"table1_preact_resnet68_{s}" for s in ("sgd_bn", "svb_bn", "svb_bbn")} <= names
    assert {
        f"table2_wrn28_10_{d}_{s}" for d in ("cifar10", "cifar100") for s in ("sgd_bn", "svb_bbn")
    } <= names
    assert {f"table3_wrn28_{w}_{d}" for w in (10, 16) for d in ("cifar10", "cifar100")} <= names
    assert {"table4_inception_resnet_v2_sgd", "table4_inception_resnet_v2_svb"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_with_reference_settings(config: Path) -> None:
    args = parse_args(["-c", str(config)])
    assert timm.is_model(args.model), args.model
    assert (args.opt, args.momentum, args.nesterov, args.weight_decay) == ("sgd", 0.9, True, 1e-4)
    assert (args.aug, args.crop_padding, args.hflip) == ("cifar", 4, 0.5) or config.stem.startswith("table4")
    if config.stem.startswith("cpu_"):
        # the CPU-scale studies: the paper's recipe, its 160 epochs over 50,000 images compressed to 30 over
        # the first 10,000; each rate still held two epochs, SVB still skips the same share of an epoch
        assert (args.lr, args.min_lr, args.sched, args.batch_size) == (0.5, 0.001, "exp", 128)
        assert (args.epochs, args.train_subset, args.decay_stages) == (30, 10_000, 15)
        assert args.dataset == "uoft-cs/cifar10"
        if args.no_svb:
            assert not args.model.endswith("_svb") and args.init == "orthogonal"
        else:
            steps = args.train_subset // args.batch_size
            assert args.svb_skip_last == round(100 / 391 * steps) and args.svb_every == "1ep"
            assert args.svb_epsilon == 0.5 and args.svb_skip_final_epoch
            assert args.no_bbn or (args.bbn_epsilon, args.bbn_mode) == (1.0, "sigma")
        return
    assert (args.sched, args.min_lr, args.decay_stages) == ("exp", 0.001, 80)
    if config.stem.startswith("table4"):
        assert (args.lr, args.epochs, args.batch_size, args.dataset) == (
            0.045,
            160,
            128,
            "ILSVRC/imagenet-1k",
        )
    elif config.stem.startswith("table3"):
        assert (args.lr, args.epochs, args.bbn_epsilon) == (0.5, 300, 0.2)
        assert args.batch_size == (
            64 if "cifar10_" in config.stem + "_" and "cifar100" not in config.stem else 128
        )
    else:
        assert (args.lr, args.epochs, args.batch_size) == (0.5, 160, 128)
    if args.no_svb:
        assert not args.model.endswith("_svb") and args.init == "orthogonal"
    else:
        assert args.model.endswith("_svb") and (args.svb_every, args.svb_skip_last) == ("1ep", 100)
    # every field is overridable from the command line
    override = parse_args(["-c", str(config), "--lr", "0.1", "--epochs", "3", "--svb-epsilon", "0.2"])
    assert (override.lr, override.epochs, override.svb_epsilon) == (0.1, 3, 0.2)


def test_config_rejects_unknown_keys(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nlearning_rate: 0.2\n")
    with pytest.raises(SystemExit, match="learning_rate"):
        parse_args(["-c", str(bad)])


# ------------------------------------------------------------------------------------------------ data


def test_digits_dataset_is_fixed() -> None:
    """The split and the images, against scikit-learn's digits and the documented recipe written out."""
    from PIL import Image
    from sklearn.datasets import load_digits

    dsd = digits_dataset()
    assert (len(dsd["train"]), len(dsd["test"])) == (1437, 360)
    assert dsd["train"].features["label"].names == [str(i) for i in range(10)]
    digits = load_digits()
    order = np.random.RandomState(0).permutation(1797)  # the first 360 are the test set
    assert dsd["test"]["label"] == digits.target[order[:360]].tolist()
    assert dsd["train"]["label"] == digits.target[order[360:]].tolist()
    for split, position, index in (("test", 5, order[5]), ("train", 1000, order[1360])):
        pixels = np.clip(np.round(digits.images[index] * 255 / 16), 0, 255).astype(np.uint8)
        expected = Image.fromarray(pixels, mode="L").resize((32, 32), Image.BILINEAR).convert("RGB")
        image = dsd[split][position]["image"]
        assert image.size == (32, 32) and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_unreachable_hub_dataset_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="--data-dir"):
        load_image_dataset("uoft-cs/cifar10")


@pytest.fixture
def no_hub_requests(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fails the test on any Hub request or backoff sleep (datasets retries an unreachable Hub with sleeps);
    returns the hosts that the reachability check tried to connect to (each connection refused)."""
    import time

    tried: list[str] = []

    def refuse(address: tuple[str, int], timeout: float | None = None) -> Any:
        tried.append(address[0])
        raise OSError("Name or service not known")

    def no_request(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr("socket.create_connection", refuse)
    monkeypatch.setattr(time, "sleep", lambda *a: pytest.fail("a retry backed off"))
    monkeypatch.setattr("datasets.load_dataset_builder", no_request)
    monkeypatch.setattr("datasets.load_dataset", no_request)
    return tried


@pytest.mark.parametrize("offline", [False, True])
def test_unreachable_hub_fails_at_once_without_a_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_hub_requests: list[str], offline: bool
) -> None:
    """Hub unreachable (one connection refused) or offline mode (the set not cached): one DataError saying
    what to do, before the run folder exists and without a request or a retry."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", offline)

    def not_cached(name: str) -> Any:
        no_hub_requests.append("cache")
        raise FileNotFoundError(name)

    if offline:  # offline, only the cache is read: an empty one
        monkeypatch.setattr(recipe_data, "_split_files", not_cached)
    run = tmp_path / "run"
    expected = "not in the Hugging Face cache and offline" if offline else "Hub, which is unreachable"
    says = f"'uoft-cs/cifar10' .*{expected}.* Pass --data-dir DIR with a local copy"
    with pytest.raises(DataError, match=says):
        run_recipe(["--dataset", "uoft-cs/cifar10", "--output", str(run)])
    assert not run.exists()
    assert no_hub_requests == (["cache"] if offline else ["huggingface.co"])
    # local data needs no Hub
    recipe_data.check_hub_reachable("uoft-cs/cifar10", data_dir=str(tmp_path))
    recipe_data.check_hub_reachable(DIGITS)


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


def test_malformed_datasets_are_explained(tmp_path: Path) -> None:
    import datasets

    no_label = datasets.DatasetDict(
        {
            s: datasets.Dataset.from_dict(
                {"image": [np.zeros((4, 4, 3), np.uint8)] * 2, "note": ["a", "b"]},
                features=datasets.Features({"image": datasets.Image(), "note": datasets.Value("string")}),
            )
            for s in ("train", "test")
        }
    )
    no_label.save_to_disk(str(tmp_path / "no_label"))
    with pytest.raises(DataError, match="--label-column"):
        load_image_dataset("x", tmp_path / "no_label")
    only_train = datasets.DatasetDict({"train": no_label["train"]})
    only_train.save_to_disk(str(tmp_path / "only_train"))
    with pytest.raises(DataError, match="--val-split"):
        load_image_dataset("x", tmp_path / "only_train")
    with pytest.raises(DataError, match="does not exist"):
        load_image_dataset("x", tmp_path / "missing")


def _parquet_repo(root: Path, splits: dict[str, int], broken: str | None = None) -> Path:
    """A local copy of a Hub dataset repository: ``data/SPLIT-00000-of-00001.parquet`` (labels -1 for
    splits of size < 0: unlabelled), and a corrupt file for split ``broken``."""
    (root / "data").mkdir(parents=True)
    dsd = recipe_data.make_synthetic_dataset(None, num_train=8, num_test=4)
    for split, size in splits.items():
        ds = dsd["train"].select(range(abs(size)))
        if size < 0:
            ds = ds.map(lambda row: {"label": -1})
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    if broken:
        (root / "data" / f"{broken}-00000-of-00001.parquet").write_bytes(b"not parquet")
    return root


def test_only_the_splits_used_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ImageNet's layout: train, an unlabelled test split and validation. The test split is only peeked at
    (its first rows, streamed) and found unlabelled; a split nobody uses is never read."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    repo = _parquet_repo(tmp_path / "repo", {"train": 8, "test": -4, "validation": 4}, broken="extra")
    with pytest.raises(DataError, match="extra"):  # the broken split is there, and unreadable
        load_image_dataset("x", repo, val_split="extra")
    data = load_image_dataset("x", repo)
    assert (data.test_split, len(data.test), len(data.train), data.num_train) == ("validation", 4, 8, 8)
    prepared = {p.stem.rsplit("-", 1)[-1] for p in (tmp_path / "cache").rglob("*.arrow")}
    assert prepared <= {"train", "validation"}, prepared  # the unlabelled test split was not prepared
    streamed = load_image_dataset("x", repo, streaming=True)
    assert streamed.streamed and streamed.num_train == 8 and not hasattr(streamed.train, "__len__")
    assert streamed.describe()["num_train_images"] == 8


@pytest.mark.parametrize("num_shards", [4, 3])
def test_streamed_split_is_shared_out_over_two_ranks(tmp_path: Path, num_shards: int) -> None:
    """In every epoch each rank's share of the stream (whole shards when they divide the ranks, else every
    other example) is disjoint from the other's and together they cover the split; epochs reshuffle."""
    split = recipe_data.make_synthetic_dataset(None, num_train=32)["train"]
    stream = split.to_iterable_dataset(num_shards=num_shards)
    fingerprint = lambda x: hashlib.sha1(x.numpy().tobytes()).hexdigest()  # noqa: E731
    to_tensor = recipe_data.build_transforms(timm.create_model("convnet20").pretrained_cfg, False)
    everything = {fingerprint(to_tensor(row["image"])) for row in split}
    seen = {}  # (rank, epoch): the images in the order read
    for rank in (0, 1):
        images = recipe_data.StreamingImages(
            stream, "image", "label", to_tensor, rank=rank, world_size=2, seed=3, buffer_size=8
        )
        loader = recipe_data.FixedLengthLoader(torch.utils.data.DataLoader(images, batch_size=4), 4)
        for epoch in range(2):
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader) == 4
            seen[rank, epoch] = [fingerprint(x) for xs, _ in batches for x in xs]
    for epoch in range(2):
        mine, theirs = set(seen[0, epoch]), set(seen[1, epoch])
        assert len(mine) == len(theirs) == 16 and not mine & theirs and mine | theirs == everything
    assert seen[0, 0] != seen[0, 1]


def test_short_stream_is_read_again_not_waited_for() -> None:
    """A rank whose shards hold fewer examples than the others still takes every step of the epoch."""
    split = recipe_data.make_synthetic_dataset(None, num_train=6)["train"]
    images = recipe_data.StreamingImages(
        split.to_iterable_dataset(num_shards=2), "image", "label", lambda im: torch.zeros(1), rank=0
    )
    loader = recipe_data.FixedLengthLoader(
        torch.utils.data.DataLoader(images, batch_size=4, drop_last=True), 3
    )
    assert len(list(loader)) == 3  # 6 examples give 1 batch of 4 a pass: the stream was read 3 times


def test_imagefolder_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config
    from PIL import Image

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            folder = tmp_path / "tree" / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (12, 10), (i * 50, 80, 160)).save(folder / f"{i}.png")
    data = load_image_dataset("my-pets", tmp_path / "tree")
    assert (data.image_column, data.label_column, data.label_names) == ("image", "label", ["cat", "dog"])
    assert (len(data.train), len(data.test), data.test_split) == (4, 4, "test")


def _image_tree(root: Path, classes: dict[str, str]) -> Path:
    """An imagefolder tree ``root/SPLIT/<class>/<i>.png``: two images per class, each class its colour."""
    from PIL import Image

    for split, names in classes.items():
        for name in names:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (ord(name), 40 * i, 0)).save(folder / f"{i}.png")
    return root


def test_imagefolder_labels_mean_the_training_splits_classes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train/{a,b,c}``, ``test/{a,c}``: test's ``c`` images get ``c``'s label (2), not the second label of
    their own split; a class the training split lacks is refused, naming the split and the class."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data = load_image_dataset("x", _image_tree(tmp_path / "fewer", {"train": "abc", "test": "ac"}))
    assert data.label_names == ["a", "b", "c"]
    colours = [np.asarray(image)[0, 0, 0] for image in data.test["image"]]
    assert [data.label_names[label] for label in data.test["label"]] == [chr(c) for c in colours]
    assert sorted(data.test["label"]) == [0, 0, 2, 2]
    test_only = load_image_dataset("x", tmp_path / "fewer", need_train=False)  # as the publisher reloads it
    assert sorted(test_only.test["label"]) == [0, 0, 2, 2] and test_only.label_names == ["a", "b", "c"]
    with pytest.raises(DataError, match=r"split 'test' .* \['d'\] .* 'train' lacks"):
        load_image_dataset("x", _image_tree(tmp_path / "more", {"train": "abc", "test": "abd"}))


def test_labels_outside_the_classes_are_refused_before_training(tmp_path: Path) -> None:
    """A ClassLabel -1 or an integer 5 of 3 classes would fail mid-epoch (IndexError, a device-side assert on
    a GPU): refused on loading, naming the split, the label and the fix; so are splits whose ClassLabel
    names differ."""
    import datasets

    def saved(name: str, labels: dict[str, list[int]], features: dict[str, Any]) -> Path:
        splits = {
            split: datasets.Dataset.from_dict(
                {"image": [np.zeros((4, 4, 3), np.uint8)] * len(values), "label": values},
                features=datasets.Features({"image": datasets.Image(), "label": features[split]}),
            )
            for split, values in labels.items()
        }
        datasets.DatasetDict(splits).save_to_disk(str(tmp_path / name))
        return tmp_path / name

    three = datasets.ClassLabel(names=["a", "b", "c"])
    folder = saved("minus_one", {"train": [0, 1, -1, 2], "test": [0, 1]}, {"train": three, "test": three})
    with pytest.raises(DataError, match=r"split 'train' .* label\(s\) \[-1\] .* \[0, 3\).*filter"):
        load_image_dataset("x", folder)
    ints = datasets.Value("int64")
    folder = saved("five", {"train": [0, 1, 2, 0], "test": [0, 5]}, {"train": ints, "test": ints})
    with pytest.raises(DataError, match=r"split 'test' .* label\(s\) \[5\] .* \[0, 3\)"):
        load_image_dataset("x", folder)
    other = datasets.ClassLabel(names=["a", "c", "b"])
    folder = saved("renamed", {"train": [0, 1, 2], "test": [0, 1]}, {"train": three, "test": other})
    with pytest.raises(DataError, match="split 'test' .* names its classes"):
        load_image_dataset("x", folder)


def test_damaged_save_to_disk_folder_raises_a_data_error(tmp_path: Path) -> None:
    """An empty split (saved without a shard) or a truncated .arrow shard: the documented DataError naming
    the folder, not the libraries' IndexError / OSError."""
    import datasets

    ok = make_data(tmp_path / "ok", num_train=8, num_test=4)
    dsd = datasets.load_from_disk(str(ok))
    datasets.DatasetDict({"train": dsd["train"], "test": dsd["test"].select([])}).save_to_disk(
        str(tmp_path / "empty")
    )
    shutil.copytree(ok, tmp_path / "truncated")
    (shard,) = (tmp_path / "truncated" / "train").glob("*.arrow")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    for name in ("empty", "truncated"):
        with pytest.raises(DataError, match=f"{tmp_path / name} is a damaged save_to_disk folder"):
            load_image_dataset("x", tmp_path / name)


# ------------------------------------------------------------------------------------------- training


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


class _SavingAccelerator:
    """What ``save_checkpoint`` uses of an Accelerator, one process: ``save_state`` writes three files."""

    is_main_process = True

    def __init__(self) -> None:
        self.tag = "old"

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, path: str, safe_serialization: bool = True) -> None:
        Path(path).mkdir(parents=True)
        for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl"):
            (Path(path) / name).write_text(self.tag)


def test_overwriting_a_checkpoint_never_leaves_half_of_one_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill while a checkpoint folder of the same epoch is replaced leaves a whole one listed (the old or
    the new), never a partly deleted folder."""
    accelerator = _SavingAccelerator()
    recipe_rundir.save_checkpoint(accelerator, tmp_path, 2, keep=3)
    accelerator.tag = "new"
    real_rmtree, real_replace = shutil.rmtree, recipe_rundir.os.replace

    def killed_while_deleting(path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path).name == "epoch_0002":  # deleting the listed folder in place: killed half-way
            next(Path(path).iterdir()).unlink()
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    def complete() -> dict[str, str]:
        listed = recipe_rundir.list_checkpoints(tmp_path)
        assert all(len(list(folder.iterdir())) == 3 for _, folder in listed), listed
        return {folder.name: (folder / "model.safetensors").read_text() for _, folder in listed}

    monkeypatch.setattr(recipe_rundir.shutil, "rmtree", killed_while_deleting)
    with contextlib.suppress(KeyboardInterrupt):
        recipe_rundir.save_checkpoint(accelerator, tmp_path, 2, keep=3)
    assert complete() == {"epoch_0002": "new"}
    monkeypatch.setattr(recipe_rundir.shutil, "rmtree", real_rmtree)

    def killed_between_renames(src: Any, dst: Any) -> None:
        if Path(src).name.startswith(".tmp-"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(recipe_rundir.os, "replace", killed_between_renames)
    accelerator.tag = "newer"
    with contextlib.suppress(KeyboardInterrupt):
        recipe_rundir.save_checkpoint(accelerator, tmp_path, 2, keep=3)
    assert complete() == {}  # the old one is aside, whole ...
    monkeypatch.setattr(recipe_rundir.os, "replace", real_replace)
    recipe_rundir.save_checkpoint(accelerator, tmp_path, 3, keep=3)
    assert complete() == {"epoch_0002": "new", "epoch_0003": "newer"}  # ... and back on the next save


@pytest.fixture(scope="module")
def one_epoch_svb_run(tmp_path_factory: pytest.TempPathFactory, cifar_like: Path) -> dict[str, Any]:
    """A 1-epoch run of an SVB model with the default SVB schedule (once an epoch, not in the final one),
    under umask 022; its log."""
    out = tmp_path_factory.mktemp("one_epoch") / "run"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("recipes.train")
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


def test_data_set_name_is_recorded_for_the_digits(tmp_path: Path) -> None:
    """The digits need no data dir: the publisher rebuilds the test loader from the name alone."""
    run = {
        "dataset": {
            "name": DIGITS,
            "test_split": "test",
            "num_test_images": 360,
            "label_names": [str(i) for i in range(10)],
        },
        "pretrained_cfg": timm.create_model("convnet20_svb").pretrained_cfg,
    }
    loader = build_test_loader(run, batch_size=360)
    x, y = next(iter(loader))
    assert tuple(x.shape) == (360, 3, 32, 32) and sorted(set(y.tolist())) == list(range(10))


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
        with caplog.at_level(logging.INFO, logger="recipes.train"):
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
    with caplog.at_level(logging.INFO, logger="recipes.train"), optimizer_groups() as steps:
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


def test_svb_log_and_summary_when_the_certificate_proves_every_layer_in_band():
    # certified layers get no solver, so no singular values: the log says so and summary.csv leaves the cells
    # empty instead of writing NaN
    model = timm.create_model("convnet20_svb", num_classes=10)  # orthogonal init: every layer in band
    svb = recipe_loop.RecordingSVB(model, epsilon=0.5)
    stats = svb.apply()
    assert stats.certified == stats.layers == 20
    assert recipe_trainer._describe_svb(stats) == "20/20 layers certified in band, 0 clipped"
    row = recipe_trainer._svb_row(svb, applied_before=0)
    assert row["svb_sv_min"] is None and row["svb_sv_max"] is None and row["svb_clipped"] == 0
    with torch.no_grad():
        model.get_classifier().weight.mul_(3.0)  # the head leaves the band: the solver sees it alone
    stats = svb.apply()
    described = recipe_trainer._describe_svb(stats)
    assert described.startswith("19/20 layers certified in band, sv ") and "nan" not in described
    row = recipe_trainer._svb_row(svb, applied_before=0)
    assert row["svb_sv_max"] > 1.5 and row["svb_clipped"] > 0
