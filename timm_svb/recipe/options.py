"""Command line and YAML configuration of the recipe (timm's train.py conventions).

``-c/--config FILE.yaml`` sets defaults (keys are the argument names with underscores, e.g. ``batch_size``);
every other argument on the command line overrides them. With no arguments at all the recipe trains the
embedded default: ``convnet20_svb`` on scikit-learn's digits for a few epochs on the CPU.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DEFAULT_MODEL", "build_parser", "load_config_file", "parse_args", "run_of_weights", "scaled_lr"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_MODEL = "convnet20_svb"  # the embedded default run's


class ParseKwargs(argparse.Action):
    """``--model-kwargs key=value ...``: values are Python literals where they parse, else strings; adds to
    the dict already there (e.g. from the YAML config)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        kwargs = dict(getattr(namespace, self.dest) or {})
        for item in values:
            if "=" not in item:
                parser.error(f"{option_string} takes key=value pairs, got {item!r}")
            key, value = item.split("=", 1)
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The recipe's argument parser; its defaults are the embedded default run."""
    parser = argparse.ArgumentParser(
        prog="recipes/train.py",
        description=(
            "Train a timm model with Singular Value Bounding (SVB) and Bounded Batch Normalization (BBN) "
            "(Jia et al., CVPR 2017) through Accelerate. With no arguments: convnet20_svb on scikit-learn's "
            "digits, a few epochs on the CPU. The paper's recipes: -c NAME "
            "(timm_svb/recipe/configs/NAME.yaml). Multi-GPU / multi-node: "
            "accelerate launch recipes/train.py ..."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "-c",
        "--config",
        default=None,
        metavar="FILE",
        help="YAML file of defaults (keys: the argument names with underscores); a bare name is looked up in "
        "timm_svb/recipe/configs/ (e.g. table2_wrn28_10_cifar10_svb_bbn)",
    )

    group = parser.add_argument_group("Data set")
    group.add_argument(
        "--dataset",
        default="sklearn-digits",
        help="'sklearn-digits' (built in, no download), a Hugging Face Hub id (uoft-cs/cifar10, "
        "uoft-cs/cifar100, ILSVRC/imagenet-1k, ...) or a local folder",
    )
    group.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="local copy of the data set to use instead of the Hub: a save_to_disk folder, an imagefolder "
        "tree "
        "(train/<class>/..., test/<class>/...) or a downloaded Hub dataset repository",
    )
    group.add_argument("--train-split", default="train", help="training split")
    group.add_argument(
        "--train-subset",
        type=int,
        default=None,
        metavar="N",
        help="train on the first N examples of the training split only (smoke runs, short studies; the test "
        "split stays whole)",
    )
    group.add_argument(
        "--val-split",
        default=None,
        help="test split, evaluated every epoch (default: the first labelled of test, validation, valid, "
        "val)",
    )
    group.add_argument(
        "--streaming",
        action="store_true",
        help="stream the training split with datasets (an IterableDataset, its shards split over the "
        "processes by split_dataset_by_node) instead of downloading it: for sets larger than a node's disk. "
        "The test split is downloaded as usual",
    )
    group.add_argument(
        "--shuffle-buffer",
        type=int,
        default=10_000,
        metavar="N",
        help="--streaming: examples in each process's shuffle buffer (reshuffled every epoch)",
    )
    group.add_argument(
        "--in-memory",
        default="auto",
        choices=("auto", "on", "off"),
        help="decode each split once into uint8 pixels on the training device and crop, flip and normalise "
        "whole batches there (auto: when the transforms allow it (--aug cifar or none, no --aa/--reprob, no "
        "--streaming) and both splits fit under --in-memory-cap; on: refuse otherwise; off: the per-image "
        "loader); the log says which path runs and why",
    )
    group.add_argument(
        "--in-memory-cap",
        type=float,
        default=4.0,
        metavar="GIB",
        help="--in-memory auto: the most memory the decoded splits may take (GiB)",
    )
    group.add_argument(
        "--data-cache",
        default=None,
        metavar="DIR",
        help="where --in-memory keeps decoded splits, keyed on the data's fingerprint, for the next run "
        "(default: $TIMM_SVB_CACHE/decoded, else ~/.cache/timm_svb/decoded; 'none': decode every run)",
    )
    group.add_argument("--image-column", default=None, help="image column (default: detected)")
    group.add_argument("--label-column", default=None, help="label column (default: detected)")

    group = parser.add_argument_group("Model")
    group.add_argument(
        "--model",
        default=None,
        help="timm model name (timm's or timm_svb's zoo). Default: with --initial-checkpoint "
        "RUN/model_*.safetensors the model (and --model-kwargs) that RUN/run.json names, else "
        f"{DEFAULT_MODEL}",
    )
    group.add_argument("--pretrained", action="store_true", help="start from the model's pretrained weights")
    group.add_argument(
        "--initial-checkpoint",
        default=None,
        metavar="PATH",
        help="start from these weights (safetensors or torch file); a classifier of another shape is dropped",
    )
    group.add_argument(
        "--num-classes", type=int, default=None, help="classifier outputs (default: the data set's classes)"
    )
    group.add_argument(
        "--drop", type=float, default=None, help="dropout rate before the classifier (drop_rate)"
    )
    group.add_argument(
        "--model-kwargs",
        nargs="*",
        default={},
        action=ParseKwargs,
        metavar="KEY=VALUE",
        help="more timm.create_model keyword arguments",
    )
    group.add_argument(
        "--init",
        default="default",
        choices=("default", "orthogonal"),
        help="weight init of a model not loaded from weights: the model's own (the _svb models are "
        "orthogonal already) or orthogonal (all singular values 1, as the paper's SGD baselines)",
    )
    group.add_argument(
        "--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"), help="input size"
    )
    group.add_argument("--mean", type=float, nargs="+", default=None, help="normalisation mean")
    group.add_argument("--std", type=float, nargs="+", default=None, help="normalisation std")
    group.add_argument("--crop-pct", type=float, default=None, help="test-time center crop fraction")
    group.add_argument("--interpolation", default=None, help="resize interpolation (bilinear, bicubic, ...)")

    group = parser.add_argument_group(
        "Augmentation and regularization",
        "timm's train.py options, through timm's own transforms, Mixup and losses",
    )
    group.add_argument(
        "--aug",
        default="auto",
        choices=("auto", "cifar", "inception", "none"),
        help="training augmentation: cifar = pad + random crop + flip; inception = timm's random-resized "
        "crop "
        "+ flip + colour jitter; auto = cifar for inputs up to 64 pixels, else inception",
    )
    group.add_argument(
        "--hflip",
        type=float,
        default=None,
        help="horizontal flip probability (default: 0.5; 0 for sklearn-digits, digits are not mirror "
        "symmetric)",
    )
    group.add_argument("--crop-padding", type=int, default=4, help="zero padding of the cifar random crop")
    group.add_argument(
        "--scale", type=float, nargs=2, default=None, help="inception crop scale range (0.08 1)"
    )
    group.add_argument(
        "--ratio", type=float, nargs=2, default=None, help="inception crop aspect range (3/4 4/3)"
    )
    group.add_argument("--color-jitter", type=float, default=0.4, help="inception colour jitter")
    group.add_argument(
        "--aa",
        default=None,
        metavar="NAME",
        help="timm's auto-augment policy after the crop and flip: rand-m9-mstd0.5-inc1 (RandAugment), "
        "original / v0 (AutoAugment), augmix-m5-w4-d2 (AugMix); turns the inception colour jitter off",
    )
    group.add_argument(
        "--reprob", type=float, default=0.0, metavar="PCT", help="random erasing probability (timm's)"
    )
    group.add_argument(
        "--remode",
        default="pixel",
        choices=("pixel", "rand", "const"),
        help="random erasing fill: per-pixel normal noise, per-channel noise, or zeros",
    )
    group.add_argument("--recount", type=int, default=1, help="random erasing: up to this many rectangles")
    group.add_argument(
        "--mixup",
        type=float,
        default=0.0,
        metavar="ALPHA",
        help="mixup alpha, on when > 0 (timm's Mixup: soft targets, SoftTargetCrossEntropy; training "
        "error is then not reported)",
    )
    group.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA", help="cutmix alpha, on when > 0")
    group.add_argument(
        "--mixup-prob", type=float, default=1.0, help="probability of mixing a batch (mixup or cutmix)"
    )
    group.add_argument(
        "--mixup-switch-prob",
        type=float,
        default=0.5,
        help="probability of cutmix instead of mixup when both are on",
    )
    group.add_argument(
        "--mixup-mode",
        default="batch",
        choices=("batch", "pair", "elem"),
        help="one mixing per batch, per pair of images or per image",
    )
    group.add_argument(
        "--smoothing",
        type=float,
        default=0.0,
        help="label smoothing (timm's LabelSmoothingCrossEntropy; with --mixup, in the mixed targets)",
    )

    group = parser.add_argument_group("Optimizer and schedule")
    group.add_argument(
        "--opt",
        default="sgd",
        help="optimizer: sgd (torch SGD, the reference) or any timm optimizer name (adamw, lamb, ...)",
    )
    group.add_argument(
        "--lr", type=float, default=0.2, help="initial learning rate (the paper: 0.5; ImageNet 0.045)"
    )
    group.add_argument(
        "--lr-base",
        type=float,
        default=None,
        metavar="LR",
        help="learning rate at a global batch of --lr-base-size: sets --lr = LR x batch / lr-base-size "
        "(timm's rule; --lr-base-scale sqrt takes the square root of the ratio). Replaces --lr from a "
        "config; not with --lr on the command line",
    )
    group.add_argument(
        "--lr-base-size", type=int, default=256, metavar="N", help="global batch of --lr-base (timm: 256)"
    )
    group.add_argument(
        "--lr-base-scale",
        default="",
        choices=("", "linear", "sqrt"),
        help="--lr-base scaling: linear, sqrt, or '' (timm's default: sqrt for optimizers named ada* or "
        "lamb, else linear)",
    )
    group.add_argument("--min-lr", type=float, default=0.001, help="final learning rate of exp / cosine")
    group.add_argument(
        "--sched",
        default="exp",
        choices=("exp", "cosine", "const"),
        help="exp: the reference's stepped exponential decay (--decay-stages log-spaced values from --lr to "
        "--min-lr over the epochs); cosine; const. Held for whole epochs (warm-up rises every step)",
    )
    group.add_argument("--decay-stages", type=int, default=80, help="stages of the exp schedule")
    group.add_argument(
        "--warmup-epochs",
        type=int,
        default=0,
        help="linear warm-up from --warmup-lr to --lr over these epochs, rising every optimizer step",
    )
    group.add_argument("--warmup-lr", type=float, default=1e-4, help="warm-up start learning rate")
    group.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    group.add_argument(
        "--nesterov", action=argparse.BooleanOptionalAction, default=True, help="Nesterov momentum (sgd)"
    )
    group.add_argument(
        "--weight-decay",
        type=float,
        default=1e-4,
        help="weight decay, on all parameters (BN and biases too, as the reference) unless "
        "--filter-bias-and-bn",
    )
    group.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this")
    group.add_argument("--epochs", type=int, default=4, help="epochs to train (the paper: 160)")
    group.add_argument(
        "--max-steps",
        type=int,
        default=None,
        metavar="N",
        help="stop after N optimizer steps of the run in all (a smoke run on real data). The LR and SVB "
        "schedules stay those of --epochs; the epoch in which step N falls is cut there, tested and recorded "
        "(not checkpointed); run.json's status is then stopped_max_steps, and model_final is not written",
    )
    group.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="global batch per optimizer step, over all processes and accumulation steps (the paper: 128)",
    )
    group.add_argument(
        "--validation-batch-size", type=int, default=None, help="global test batch (default: --batch-size)"
    )
    group.add_argument(
        "--grad-accum-steps",
        type=int,
        default=1,
        help="cut every batch into this many micro-batches whose gradients are accumulated",
    )

    group = parser.add_argument_group(
        "Fine-tuning",
        "A run fine-tunes when it starts from trained weights: --pretrained or --initial-checkpoint",
    )
    group.add_argument(
        "--filter-bias-and-bn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="no weight decay on BN scales and shifts and on biases (timm's filter_bias_and_bn: every 1-D "
        "parameter). Default: on when fine-tuning, off otherwise (the paper decays all parameters)",
    )
    group.add_argument(
        "--head-lr-scale",
        type=float,
        default=1.0,
        metavar="S",
        help="learning rate of the classifier (model.get_classifier()) = S x the schedule's; e.g. 10 for a "
        "new head on pretrained features",
    )
    group.add_argument(
        "--freeze-backbone",
        action="store_true",
        help="linear probing: train the classifier only. The backbone's parameters get no gradient, its BN "
        "layers stay in eval mode (running statistics fixed) and SVB/BBN leave its layers alone",
    )

    group = parser.add_argument_group("Model EMA", "timm's ModelEmaV3, evaluated and saved beside the model")
    group.add_argument(
        "--model-ema",
        action="store_true",
        help="keep an exponential moving average of the weights (and BN statistics), updated after every "
        "optimizer step; with SVB, the average is bounded whenever the model is. Saved as "
        "model_{best,final}_ema.safetensors",
    )
    group.add_argument(
        "--model-ema-decay", type=float, default=0.9998, help="EMA decay per optimizer step (timm's default)"
    )
    group.add_argument(
        "--model-ema-warmup",
        action="store_true",
        help="ramp the decay up from 0 over the first steps (timm's warm-up: 1 - (1 + step)^-2/3)",
    )

    group = parser.add_argument_group("SVB / BBN")
    group.add_argument("--no-svb", action="store_true", help="plain SGD: no SVB and no BBN")
    group.add_argument(
        "--svb-epsilon",
        type=float,
        default=None,
        help="SVB band: singular values are clipped to [1/(1+eps), 1+eps] (default: the model's svb_config; "
        "a model without one gets SVB only when this or --bbn-epsilon is given, then 0.5)",
    )
    group.add_argument(
        "--bbn-epsilon", type=float, default=None, help="BBN band (default: the model's svb_config)"
    )
    group.add_argument("--no-bbn", action="store_true", help="SVB with plain BN (no BBN)")
    group.add_argument(
        "--svb-every",
        default="1ep",
        help="bound every N optimizer steps ('391') or N epochs ('1ep' = steps per epoch + 1, the "
        "reference's 391 "
        "for CIFAR at batch 128)",
    )
    group.add_argument(
        "--svb-skip-last",
        type=int,
        default=None,
        help="do not bound in the last N steps of an epoch (the reference: 100; default: 100, at most a "
        "quarter "
        "of an epoch; 0 turns the rule off)",
    )
    group.add_argument(
        "--svb-skip-final-epoch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="do not bound during the final epoch (the reference)",
    )
    group.add_argument(
        "--bbn-mode",
        default="sigma",
        choices=("sigma", "rel"),
        help="BBN: sigma = Algorithm 2 (gamma / sigma), rel = the reference code's gamma / mean(gamma)",
    )
    group.add_argument(
        "--svb-exclude", nargs="*", default=[], metavar="GLOB", help="module names SVB leaves alone (e.g. fc)"
    )

    group = parser.add_argument_group("Performance and distribution")
    group.add_argument(
        "--mixed-precision",
        default=None,
        choices=("no", "fp16", "bf16"),
        help="autocast precision (default: accelerate's config, else no); weights, optimizer and SVB stay "
        "float32",
    )
    group.add_argument(
        "--cpu",
        action="store_true",
        help="train on the CPU even when an accelerator is there (gloo when distributed)",
    )
    group.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="torch.compile the model (alone: the inductor backend; or a backend name, e.g. aot_eager). "
        "Checkpoints and weights stay plain timm state dicts",
    )
    group.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory format (default: on for CPU training, where oneDNN runs it faster)",
    )
    group.add_argument(
        "--workers",
        type=int,
        default=None,
        help="data loader processes per training process (default: 0 on CPU, else min(8, cores per process))",
    )
    group.add_argument(
        "--dist-bn",
        default="reduce",
        choices=("reduce", "broadcast", "none"),
        help="distributed: average (reduce) or copy from rank 0 (broadcast) the BN statistics before testing",
    )
    group.add_argument(
        "--sync-bn",
        action="store_true",
        help="distributed: SyncBatchNorm, BN statistics over all processes' images (GPUs only; worth it when "
        "batch / (processes x --grad-accum-steps) is below 32)",
    )
    group.add_argument("--seed", type=int, default=42, help="random seed")
    group.add_argument(
        "--deterministic", action="store_true", help="deterministic algorithms (slower on GPUs)"
    )

    group = parser.add_argument_group("Output, checkpoints, logging")
    group.add_argument(
        "--output", default=None, metavar="DIR", help="run folder (default: runs/<timestamp>-<model>)"
    )
    group.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="resume: alone, the latest good checkpoint of --output; or a checkpoint folder "
        "(RUN/checkpoints/epoch_NNNN, whose run folder becomes the output)",
    )
    group.add_argument(
        "--checkpoint-hist",
        type=int,
        default=3,
        help="accelerate checkpoints (every epoch) to keep; 0 saves none",
    )
    group.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="stop after N epochs in this invocation (for time-limited jobs); continue with --resume",
    )
    group.add_argument(
        "--log-with",
        default="auto",
        help="Accelerate trackers: auto (tensorboard when installed), none, or names (tensorboard,wandb,...)",
    )
    group.add_argument(
        "--experiment",
        default="timm-svb",
        metavar="NAME",
        help="tracker project (Accelerate's init_trackers project: the W&B / MLflow / trackio project; "
        "TensorBoard logs go to RUN/NAME)",
    )
    group.add_argument(
        "--run-name",
        default=None,
        metavar="NAME",
        help="the run's name in trackers that name runs (W&B, MLflow, trackio, ClearML), and the run folder "
        "runs/NAME when --output is not given (default: the run folder's name, runs/<timestamp>-<model>)",
    )
    group.add_argument("--log-interval", type=int, default=50, help="steps between progress-bar loss updates")
    group.add_argument(
        "--spectrum-every",
        type=int,
        default=10,
        metavar="N",
        help="log singular-value spectrum statistics to the trackers every N epochs (0: never); "
        "the final spectrum plot is saved as RUN/spectra.png",
    )
    group.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars (main process)"
    )

    group = parser.add_argument_group("Evaluation")
    group.add_argument(
        "--eval-only",
        action="store_true",
        help="do not train: evaluate the model that --model / --pretrained / --initial-checkpoint build on "
        "the test split with the model's own preprocessing, print top-1 / top-5 error and write "
        "validate.json into --output (as recipes/validate.py)",
    )
    return parser


def load_config_file(path: str | Path, parser: argparse.ArgumentParser | None = None) -> dict[str, Any]:
    """Read a YAML config and check its keys are argument names; a bare name is looked up in configs/."""
    path = Path(path)
    if not path.is_file():
        candidates = [CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"]
        path = next((c for c in candidates if c.is_file()), path)
    if not path.is_file():
        available = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise SystemExit(f"config {str(path)!r} not found; timm_svb/recipe/configs has {available}")
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise SystemExit(f"{path}: a config is a mapping of argument names to values")
    config = {str(k).replace("-", "_"): v for k, v in config.items()}
    parser = parser or build_parser()
    known = {a.dest for a in parser._actions if a.dest not in ("help", "config")}
    unknown = sorted(set(config) - known)
    if unknown:
        raise SystemExit(f"{path}: unknown key(s) {unknown}; keys are argument names, e.g. batch_size, lr")
    return config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` over the defaults of ``--config`` (timm's two-stage parsing)."""
    parser = build_parser()
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("-c", "--config", default=None)
    pre, remaining = config_parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_config_file(pre.config, parser))
    args = parser.parse_args(remaining)
    args.config = pre.config
    if args.model is None:
        _model_of_checkpoint(args)
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps {args.max_steps}: takes a number of optimizer steps >= 1")
    if args.compile is True:  # `compile: true` in a YAML config
        args.compile = "inductor"
    if args.lr_base is not None:
        if any(a == "--lr" or a.startswith("--lr=") for a in remaining):
            parser.error("--lr and --lr-base both given: --lr-base computes --lr; pass one of them")
        args.lr = scaled_lr(args.lr_base, args.batch_size, args.lr_base_size, args.lr_base_scale, args.opt)
    return args


def run_of_weights(path: str | os.PathLike | None) -> tuple[Path, dict[str, Any]] | None:
    """The ``run.json`` beside weights that a run saved (``RUN/model_best.safetensors``) and what it holds;
    ``None`` without one (weights from elsewhere)."""
    if not path:
        return None
    record = Path(path).expanduser().parent / "run.json"
    try:
        run = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return (record, run) if isinstance(run, dict) and isinstance(run.get("model"), str) else None


def _model_of_checkpoint(args: argparse.Namespace) -> None:
    """No ``--model``: the one the run of ``--initial-checkpoint`` trained (its architecture kwargs under the
    command line's ``--model-kwargs``; the classifier follows the new data set), else the default."""
    named = run_of_weights(args.initial_checkpoint)
    if named is None:
        args.model = DEFAULT_MODEL
        return
    run = named[1]
    recorded = {k: v for k, v in (run.get("model_kwargs") or {}).items() if k != "num_classes"}
    args.model, args.model_kwargs = run["model"], {**recorded, **(args.model_kwargs or {})}


def scaled_lr(lr_base: float, batch_size: int, lr_base_size: int, scale: str, opt: str) -> float:
    """timm's learning-rate scaling: ``lr_base x (batch_size / lr_base_size)``, square-rooted for ``sqrt``
    (and by default for adaptive optimizers, whose names contain ``ada`` or ``lamb``). ``batch_size`` is the
    global batch of one optimizer step."""
    if lr_base_size < 1:
        raise SystemExit(f"--lr-base-size must be >= 1, got {lr_base_size}")
    ratio = batch_size / lr_base_size
    if not scale:
        scale = "sqrt" if any(o in opt.lower() for o in ("ada", "lamb")) else "linear"
    return lr_base * (ratio**0.5 if scale == "sqrt" else ratio)
