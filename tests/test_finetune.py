"""Fine-tuning and regularisation options of recipes/train.py, each checked for what it changes: timm's
augmentations, mixup targets, the model EMA bounded by SVB (and resumed), a frozen backbone that SVB leaves
alone, weight decay and learning rates per parameter group, tracker names, --help."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import accelerate
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from recipe_helpers import (
    FAST,
    make_data,
    one_thread,  # noqa: F401  (autouse fixture)
    optimizer_groups,
    recipe_checkpoint,
    recipe_data,
    recipe_loop,
    recipe_options,
    recipe_trainer,
    run_recipe,
)
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T

import timm_svb  # noqa: F401  (registers the zoo)

TINY = ["--model", "convnet20_svb", "--model-kwargs", "depth_x=1", "--batch-size", "8"]
# bound after every step, in a tight band: the bounding changes weights, of the model and of its EMA
EPS = 0.01
EVERY_STEP = (
    f"--svb-every 1 --svb-skip-last 0 --no-svb-skip-final-epoch --svb-epsilon {EPS} --bbn-epsilon 0.2"
)
EMA = [*TINY, *EVERY_STEP.split(), "--epochs", "2", "--lr", "0.2", "--model-ema", "--model-ema-decay", "0.5"]
MIXUP = ["--mixup", "0.4", "--cutmix", "1.0", "--smoothing", "0.1"]


@pytest.fixture(scope="module")
def data4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("d") / "d4", num_train=16, num_test=8, num_classes=4)


@pytest.fixture(scope="module")
def data6(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("d") / "d6", num_train=16, num_test=12, num_classes=6, seed=5)


def read_summary(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "summary.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def singular_values(weight: torch.Tensor, groups: int = 1) -> np.ndarray:
    """All singular values of a conv/linear weight, per group, by numpy's float64 SVD (the reference)."""
    w = weight.detach().double().numpy()
    mats = w.reshape(groups, w.shape[0] // groups, -1)
    return np.concatenate([np.linalg.svd(m, compute_uv=False) for m in mats])


def assert_in_band(model: torch.nn.Module, epsilon: float, names: set[str] | None = None) -> None:
    lo, hi = 1 / (1 + epsilon), 1 + epsilon
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and (names is None or name in names):
            sv = singular_values(module.weight, getattr(module, "groups", 1))
            # float32 weights: the rebuilt matrices hold the band to ~1e-5 relative
            assert sv.min() >= lo * (1 - 1e-4) and sv.max() <= hi * (1 + 1e-4), (name, sv.min(), sv.max())


# ------------------------------------------------------------------------------------------ augmentation


@pytest.mark.slow
def test_augmentation_options_are_timms_transforms() -> None:
    """--aa and --reprob add timm's RandAugment and RandomErasing after the cifar crop and flip (the default
    pipeline is unchanged); inception drops its colour jitter under --aa, as timm does."""
    config = timm.data.resolve_data_config({}, model=timm.create_model("convnet20"))
    image = recipe_data.make_synthetic_dataset(None, num_train=1, num_test=1)["train"][0]["image"]
    plain = recipe_data.build_transforms(config, True, aug="cifar", hflip=0.5)
    torch.manual_seed(3)
    reference = T.Compose(
        [
            T.Resize((32, 32)),
            T.RandomCrop((32, 32), padding=4),
            T.RandomHorizontalFlip(0.5),
            T.ToTensor(),
            T.Normalize(config["mean"], config["std"]),
        ]
    )(image)
    torch.manual_seed(3)
    assert torch.equal(plain(image), reference)  # the recipe's CIFAR augmentation, as before
    augmented = recipe_data.build_transforms(
        config,
        True,
        aug="cifar",
        auto_augment="rand-m9-mstd0.5-inc1",
        re_prob=1.0,
        re_mode="pixel",
        re_count=2,
    )
    kinds = [type(t) for t in augmented.transforms]
    assert kinds[:3] == [T.Resize, T.RandomCrop, T.RandomHorizontalFlip]
    assert RandAugment in kinds and kinds[-1] is RandomErasing
    erasing = augmented.transforms[-1]
    assert (erasing.probability, erasing.mode, erasing.max_count) == (1.0, "pixel", 2)
    torch.manual_seed(3)
    assert not torch.equal(augmented(image), reference)
    inception = recipe_data.build_transforms(config, True, aug="inception", auto_augment="original")
    assert not any(isinstance(t, T.ColorJitter) for t in inception.transforms)
    assert any(
        isinstance(t, T.ColorJitter)
        for t in recipe_data.build_transforms(config, True, aug="inception").transforms
    )
    with pytest.raises(ValueError, match="--aug none"):
        recipe_data.build_transforms(config, True, aug="none", auto_augment="rand-m9")


# ------------------------------------------------------------------------------ EMA, mixup, and resuming


@pytest.fixture(scope="module")
def ema_runs(tmp_path_factory: pytest.TempPathFactory, data4: Path) -> dict:
    """An EMA run with mixup + cutmix (the soft targets the loss saw recorded), the same run stopped after
    one epoch and resumed, and one without mixup."""
    root = tmp_path_factory.mktemp("ema")
    common = [*EMA, *MIXUP, "--data-dir", str(data4)]
    targets: list[torch.Tensor] = []
    loss_forward = timm.loss.SoftTargetCrossEntropy.forward

    def recording_forward(self, x, target):  # noqa: ANN001, ANN202
        targets.append(target.detach().clone())
        return loss_forward(self, x, target)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(timm.loss.SoftTargetCrossEntropy, "forward", recording_forward)
        straight = run_recipe([*common, "--output", str(root / "straight")])
    no_ema = [a for a in common if a not in ("--model-ema", "--model-ema-decay", "0.5")]
    without = run_recipe([*no_ema, "--output", str(root / "without")])
    run_recipe([*common, "--output", str(root / "resumed"), "--stop-after", "1"])
    resumed = run_recipe([*common, "--output", str(root / "resumed"), "--resume"])
    hard = run_recipe(
        [*TINY, "--epochs", "1", "--no-svb", "--data-dir", str(data4), "--output", str(root / "hard")]
    )
    return {
        "root": root,
        "straight": straight,
        "without": without,
        "resumed": resumed,
        "hard": hard,
        "targets": targets,
    }


@pytest.mark.slow
def test_mixup_targets_are_soft_and_sum_to_one(ema_runs: dict) -> None:
    targets = ema_runs["targets"]
    assert len(targets) == 4  # 2 epochs of 2 steps
    for t in targets:
        assert t.shape == (8, 4)  # one soft target per image over the 4 classes
        assert torch.allclose(t.sum(dim=1), torch.ones(8), atol=1e-6)
        assert t.min() >= 0.1 / 4 - 1e-7  # label smoothing: every class keeps smoothing / classes
    # a one-hot target smoothed has 1 - 0.1 + 0.1 / 4 on its class: mixed ones share it between two classes
    assert all((t.max(dim=1).values < 0.925 - 1e-4).any() for t in targets)
    # training error is not reported for mixed targets, but is without them
    assert [r["train_top1_err"] for r in read_summary(ema_runs["straight"].run_dir)] == ["", ""]
    assert ema_runs["straight"].state.history[0]["train_top1_err"] is None
    (row,) = read_summary(ema_runs["hard"].run_dir)
    assert 0 <= float(row["train_top1_err"]) <= 100


@pytest.mark.slow
def test_ema_is_bounded_with_the_model_saved_and_evaluated(ema_runs: dict) -> None:
    result = ema_runs["straight"]
    ema, model = result.ema, result.model
    assert ema is not None and ema.svb is not None
    # every step bounded the model (hook) and then the updated average (4 steps)
    assert result.svb.num_applied == ema.num_applied == 4
    assert {layer.name for layer in ema.svb.layers} == {layer.name for layer in result.svb.layers}
    differing = [k for k, v in model.state_dict().items() if not torch.equal(v, ema.module.state_dict()[k])]
    assert "fc.weight" in differing and len(differing) > 5
    assert_in_band(model, EPS)
    assert_in_band(ema.module, EPS)  # the average of bounded weights, bounded in turn
    rows = read_summary(result.run_dir)
    # the average left the band (clipped values) before its bounding pulled it back
    assert sum(int(r["ema_svb_clipped"]) for r in rows) > 0
    assert float(rows[0]["ema_svb_sv_min"]) < 1 / (1 + EPS)  # averages shrink: below the band's floor
    run = json.loads((result.run_dir / "run.json").read_text())
    assert set(run["metrics"]) == {"best", "final", "best_ema", "final_ema"}
    assert run["metrics"]["final_ema"]["top1_err"] == float(rows[-1]["ema_top1_err"])
    final_ema = weights(result.run_dir / "model_final_ema.safetensors")
    assert all(torch.equal(final_ema[k], v.contiguous()) for k, v in ema.module.state_dict().items())
    best = run["metrics"]["best_ema"]["epoch"]
    assert (result.run_dir / "model_best_ema.safetensors").is_file() and best in (1, 2)
    assert (result.run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_ema_leaves_the_models_training_alone(ema_runs: dict) -> None:
    """The same run without --model-ema ends with the same model, bit for bit (the EMA's test pass draws no
    random numbers that the augmentation would then miss)."""
    a, b = ema_runs["straight"].model.state_dict(), ema_runs["without"].model.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_resume_cannot_add_or_drop_the_ema(tmp_path: Path) -> None:
    """The checkpoint holds the EMA or not: --model-ema cannot change on resume, also for a run recorded by
    a version before the option (it had no EMA, as the default now)."""
    earlier = {"args": {"model": "convnet20_svb", "batch_size": 8}}
    with pytest.raises(SystemExit, match="--model-ema .False in the run, True now"):
        recipe_checkpoint.resume_changes(earlier, {**earlier["args"], "model_ema": True}, tmp_path)
    assert recipe_checkpoint.resume_changes(earlier, {**earlier["args"], "model_ema": False}, tmp_path) == {}
    with pytest.raises(SystemExit, match="--head-lr-scale"):
        recipe_checkpoint.resume_changes(earlier, {**earlier["args"], "head_lr_scale": 10.0}, tmp_path)


@pytest.mark.slow
def test_ema_of_decay_zero_is_the_model(data4: Path, tmp_path: Path) -> None:
    """Decay 0: the average is the last model, so its weights and test errors are the model's (the EMA is
    updated from the trained model, bounded consistently and evaluated on the same split)."""
    argv = [*TINY, "--epochs", "1", "--svb-every", "1", "--svb-skip-last", "0", "--no-svb-skip-final-epoch"]
    argv += [
        "--model-ema",
        "--model-ema-decay",
        "0",
        "--data-dir",
        str(data4),
        "--output",
        str(tmp_path / "r"),
    ]
    result = run_recipe(argv)
    a, b = result.model.state_dict(), result.ema.module.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    (row,) = read_summary(result.run_dir)
    assert [row[k] for k in ("test_loss", "top1_err", "top5_err")] == [
        row[f"ema_{k}"] for k in ("test_loss", "top1_err", "top5_err")
    ]
    assert row["ema_svb_clipped"] == "0"  # a copy of the bounded model is in the band already


@pytest.mark.slow
def test_resume_restores_the_ema(ema_runs: dict) -> None:
    straight, resumed = ema_runs["straight"], ema_runs["resumed"]
    assert resumed.start_epoch == 1 and resumed.ema.num_applied == straight.ema.num_applied
    for a, b in ((straight.model, resumed.model), (straight.ema.module, resumed.ema.module)):
        sa, sb = a.state_dict(), b.state_dict()
        assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []


# --------------------------------------------------------------------------------- fine-tuning options


@pytest.mark.slow
def test_frozen_backbone_is_left_alone_by_training_and_svb(
    ema_runs: dict, data6: Path, tmp_path: Path
) -> None:
    """Linear probing from a checkpoint: every backbone tensor (BN statistics too) is the checkpoint's after
    an epoch of steps each followed by SVB + BBN; only the new 6-class head trained, and it is bounded."""
    checkpoint = ema_runs["straight"].run_dir / "model_final.safetensors"
    args = [*TINY, *EVERY_STEP.split(), "--epochs", "1", "--lr", "0.05", "--weight-decay", "0.1"]
    args += ["--freeze-backbone", "--head-lr-scale", "10", "--num-classes", "6", "--initial-checkpoint"]
    with optimizer_groups() as steps:
        result = run_recipe(
            [*args, str(checkpoint), "--data-dir", str(data6), "--output", str(tmp_path / "p")]
        )
    before, after = weights(checkpoint), result.model.state_dict()
    backbone = [k for k in after if not k.startswith("fc.")]
    assert backbone and [k for k in backbone if not torch.equal(before[k], after[k].contiguous())] == []
    assert after["fc.weight"].shape == (6, before["fc.weight"].shape[1])
    assert [layer.name for layer in result.svb.layers] == ["fc"]  # no frozen conv, no frozen BN
    assert result.svb.num_applied == 2
    assert_in_band(result.model, EPS, names={"fc"})
    # the head's groups only: lr x 10, no weight decay on its bias (fine-tuning default)
    assert len(steps) == 2
    width = after["fc.weight"].shape[1]
    for groups in steps:
        got = sorted((g["shapes"], g["weight_decay"], round(g["lr"], 12)) for g in groups)
        assert got == [([(6,)], 0.0, 0.5), ([(6, width)], 0.1, 0.5)]  # 10 x the constant 0.05 of one epoch
    run = json.loads((tmp_path / "p" / "run.json").read_text())
    assert run["recipe"]["filter_bias_and_bn"] is True and run["recipe"]["freeze_backbone"] is True


def test_param_groups() -> None:
    """Weight decay on everything (the paper) or not on 1-D tensors (timm's filter_bias_and_bn); the head in
    groups of its own with lr_scale, which RecipeLR applies; frozen tensors left out."""
    model = timm.create_model("convnet20", num_classes=3)
    tensors = dict(model.named_parameters())
    (one,) = recipe_loop.param_groups(model, 1e-4)
    assert one["weight_decay"] == 1e-4 and len(one["params"]) == len(tensors)
    groups = recipe_loop.param_groups(model, 1e-4, filter_bias_and_bn=True, head_lr_scale=5.0)
    for g in groups:
        names = {n for n, p in tensors.items() if any(p is q for q in g["params"])}
        assert all((tensors[n].ndim <= 1) == (g["weight_decay"] == 0) for n in names)
        assert all(n.startswith("fc.") for n in names) == ("lr_scale" in g)
    assert sum(len(g["params"]) for g in groups) == len(tensors)
    optimizer = torch.optim.SGD(groups, lr=1.0)
    scheduler = recipe_loop.RecipeLR(optimizer, 4, sched="const", lr=0.2)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([0.2, 1.0])
    assert scheduler.base_lr == 0.2
    frozen = recipe_loop.freeze_backbone(model)
    assert frozen and all(isinstance(m, torch.nn.BatchNorm2d) for m in frozen)
    assert {len(g["params"]) for g in recipe_loop.param_groups(model, 1e-4)} == {2}
    assert recipe_loop.frozen_layer_names(model)[:1] == ["stem.conv"]


@pytest.mark.slow
def test_tracker_project_and_run_name(data4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--experiment is the trackers' project, --run-name the run's name in them and the run folder's."""
    calls = []
    monkeypatch.setattr(
        accelerate.Accelerator,
        "init_trackers",
        lambda self, project, config=None, init_kwargs=None: calls.append((project, init_kwargs)),
    )
    monkeypatch.chdir(tmp_path)
    argv = [*TINY, "--epochs", "1", "--no-svb", "--checkpoint-hist", "0", "--data-dir", str(data4)]
    argv += [*FAST[:3], "--log-with", "tensorboard", "--experiment", "svb-cifar", "--run-name", "first-try"]
    result = recipe_trainer.run_in_process(argv)
    assert (
        result.run_dir == Path("runs") / "first-try"
        and (tmp_path / "runs" / "first-try" / "run.json").is_file()
    )
    ((project, init_kwargs),) = calls
    assert project == "svb-cifar" and init_kwargs["wandb"] == {"name": "first-try"}
    assert init_kwargs["mlflow"] == {"run_name": "first-try"}


def test_help_lists_the_new_options_in_groups(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        recipe_options.parse_args(["--help"])
    text = capsys.readouterr().out
    groups = {
        "Augmentation and regularization:": (
            "--aa NAME",
            "--reprob PCT",
            "--remode",
            "--recount",
            "--mixup ALPHA",
            "--cutmix ALPHA",
            "--mixup-prob",
            "--mixup-switch-prob",
            "--mixup-mode",
            "--smoothing",
        ),
        "Fine-tuning:": ("--filter-bias-and-bn", "--head-lr-scale S", "--freeze-backbone"),
        "Model EMA:": ("--model-ema ", "--model-ema-decay", "--model-ema-warmup"),
        "Output, checkpoints, logging:": ("--experiment NAME", "--run-name NAME"),
        "Evaluation:": ("--eval-only",),
    }
    starts = {title: text.index(title) for title in groups}
    for title, options in groups.items():
        following = [s for s in starts.values() if s > starts[title]] + [len(text)]
        section = text[starts[title] : min(following)]
        for option in options:
            assert option in section, (title, option)


def test_randaugment_at_full_magnitude_runs_with_the_installed_pillow() -> None:
    """``--aa rand-m9-mstd0.5-inc1`` draws magnitudes up to 10, where timm's posterize keeps 0 bits: the
    Pillow the package pins must take it (Pillow 13 raises mid-epoch), for every op of the policy."""
    from PIL import Image  # noqa: PLC0415
    from timm.data.auto_augment import posterize, rand_augment_transform  # noqa: PLC0415

    image = Image.new("RGB", (32, 32), (200, 100, 50))
    assert posterize(image, 0).getpixel((0, 0)) == (0, 0, 0)
    transform = rand_augment_transform("rand-m10-n15-inc1", {})  # every op at the top magnitude
    for op in transform.ops:
        op.prob = 1.0
    transform(image)
