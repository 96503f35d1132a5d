"""timm_svb.recipe.options: the command line (timm's --lr-base rule, the help) and the paper's recipe
configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
from recipe_helpers import (
    one_thread,  # noqa: F401  (autouse fixture)
    recipe_options,
)

import timm_svb  # noqa: F401  (registers the zoo)

parse_args = recipe_options.parse_args


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
