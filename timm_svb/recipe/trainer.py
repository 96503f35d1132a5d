"""The recipe's run, in stages that :func:`fit` calls top to bottom (as Accelerate's complete_cv_example.py):

1. :func:`setup_run`: the processes, the ``Accelerator``, the run folder, what a resumed run recorded, seeds;
2. :func:`load_data`: the data set and the number of classes;
3. :func:`build_model`: ``timm.create_model``, initial weights, SyncBatchNorm, a frozen backbone, memory
   format;
4. :func:`build_loaders`: the model's preprocessing, the training augmentation, the loaders, mixup and the
   loss;
5. :func:`build_optimizer`: parameter groups, optimizer, learning-rate schedule, the SVB plugin;
6. :func:`prepare`: ``accelerator.prepare``, the model EMA, what a checkpoint holds, resuming;
7. :func:`start_record`: ``run.json``, ``args.yaml`` and the trackers;
8. :func:`train_epochs`: every epoch trains, tests the model (and its EMA), records, checkpoints and logs;
9. :func:`finish`: the final weights and plots, the closing lines.

Each stage takes the parsed options and what earlier stages built, and returns what later ones use; where a
setting takes effect is the stage that reads it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import (
    GradientAccumulationPlugin,
    TorchDynamoPlugin,
    broadcast_object_list,
    is_tensorboard_available,
    set_seed,
)
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch import nn
from torch.utils.data import DataLoader

import timm_svb
from timm_svb.curves import plot_curves
from timm_svb.spectrum import model_spectrum, plot_spectra, spectrum_summary

from .data import (
    DIGITS,
    DataError,
    FixedLengthLoader,
    ImageData,
    TorchImageDataset,
    build_transforms,
    check_hub_reachable,
    load_image_dataset,
    loader_kwargs,
    make_train_loader,
    model_data_config,
    resolve_aug,
)
from .loop import (
    BoundedEMA,
    RecipeLR,
    RecordingSVB,
    evaluate,
    freeze_backbone,
    frozen_layer_names,
    param_groups,
    parse_svb_every,
    svb_apply_steps,
    train_one_epoch,
)
from .memory_data import (
    MemoryPlan,
    MemorySplit,
    decode_split,
    default_cache_dir,
    memory_loader,
    plan_memory_path,
    split_nbytes,
)
from .options import build_parser, parse_args, run_of_weights
from .rundir import (
    RunState,
    abandon_later_epochs,
    atomic_write_text,
    find_checkpoint,
    jsonable,
    load_plain_weights,
    plain_state_dict,
    save_checkpoint,
    save_weights,
    write_run_json,
    write_summary,
)
from .validate import eval_only

__all__ = ["TrainResult", "fit", "make_accelerator"]

_logger = logging.getLogger("recipes.train")

# What a resumed run cannot change: its checkpoint's weights, data order and random state depend on them.
RESUME_FIXED = (
    "model",
    "model_kwargs",
    "num_classes",
    "dataset",
    "train_split",
    "train_subset",
    "batch_size",
    "seed",
    "streaming",
    # ... and the optimizer's parameter groups and what the checkpoint holds
    "filter_bias_and_bn",
    "head_lr_scale",
    "freeze_backbone",
    "model_ema",
)
# Options that do not change what is trained: not reported when they differ on resume.
RESUME_QUIET = (
    "config",
    "data_cache",
    "resume",
    "output",
    "stop_after",
    "max_steps",
    "progress",
    "log_interval",
    "log_with",
    "checkpoint_hist",
    "spectrum_every",
    "experiment",
    "run_name",
)
# Where trackers that name runs take --run-name (Accelerate passes init_kwargs[tracker] to each).
RUN_NAME_KWARGS = {"wandb": "name", "mlflow": "run_name", "trackio": "name", "clearml": "task_name"}
# BN and BBN statistics from fewer images per process than this get a warning (and a pointer to --sync-bn).
MIN_BN_BATCH = 32


@dataclass
class TrainResult:
    """What :func:`fit` returns (the run folder holds the same on disk)."""

    run_dir: Path
    model: nn.Module  # the plain timm model, without the compile / DDP wrappers
    svb: RecordingSVB | None
    state: RunState
    finished: bool
    start_epoch: int = 0  # epochs completed before this invocation (a resumed run's checkpoint)
    svb_steps: list[int] = field(default_factory=list)  # steps of the whole run after which SVB bounds
    run: dict[str, Any] = field(default_factory=dict)
    ema: BoundedEMA | None = None  # --model-ema


# ------------------------------------------------------------------------------------- main, fit


def main(argv: list[str] | None = None) -> TrainResult | dict[str, Any]:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and train (or, with ``--eval-only``, evaluate)."""
    args = parse_args(argv)
    return eval_only(args) if args.eval_only else fit(args)


def cli(argv: list[str] | None = None) -> None:
    """The command line (``recipes/train.py``, ``python -m timm_svb.recipe``): :func:`main`, a data error
    said in one line."""
    try:
        main(argv)
    except DataError as e:  # its message says what to do: one line, without the tracebacks behind it
        raise SystemExit(f"error: {e}") from None


def run_in_process(argv: list[str]) -> TrainResult:
    """``main(argv)`` as one of several runs in a process (tests, benchmarks): Accelerate's process-wide state
    is reset before and after, so that each run can take other settings."""
    from accelerate.state import AcceleratorState, GradientState  # noqa: PLC0415

    def reset() -> None:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    try:
        return main(argv)
    finally:
        reset()


def fit(args: Any) -> TrainResult:
    """Train as ``args`` (from :func:`options.parse_args`) says; see ``recipes/train.py --help``."""
    given = dict(vars(args))  # as parsed, before anything is resolved: recorded, and compared on resume
    check_hub_reachable(args.dataset, args.data_dir)  # offline: refused at once, before the run folder exists
    setup = setup_run(args, given)
    data, num_classes = load_data(args, setup.accelerator)
    model, model_kwargs, frozen_bn = build_model(args, setup.accelerator, num_classes)
    loaders = build_loaders(args, setup.accelerator, data, model, num_classes)
    optim = build_optimizer(args, model, loaders.steps_per_epoch, setup)
    run = prepare(args, setup, model, loaders, optim, frozen_bn)
    record = start_record(args, given, setup, data, model_kwargs, loaders, optim, run)
    train_epochs(args, setup.accelerator, run, optim.svb, record)
    return finish(args, setup.accelerator, run, optim.svb, record)


# ------------------------------------------------------------------------------ 1. processes, run folder


@dataclass
class RunSetup:
    """The Accelerator and the run folder; for a resumed run, its checkpoint and record."""

    accelerator: Accelerator
    run_dir: Path
    resume_from: Path | None  # the checkpoint to continue from; None for a new run
    previous: dict[str, Any]  # the resumed run's run.json ({} for a new run)
    changed: dict[str, list[Any]]  # options a resumed run changes: {name: [run's, now]}


def setup_run(args: Any, given: dict[str, Any]) -> RunSetup:
    """Start the processes and the ``Accelerator``, find the run folder (and the checkpoint to resume), seed.

    Settings that can only be refused here (the global batch against the processes, ``--sync-bn`` on CPUs, a
    resumed run's fixed options) are refused before any process waits for another.
    """
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # torchrun / accelerate launch on machines without an accelerator: gloo on the CPU
    cpu = args.cpu or (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available())
    state = PartialState(cpu=cpu)
    _setup_logging(state.is_main_process)
    run_dir, resume_from = _run_dir(args, state)
    record = run_dir / "run.json"
    previous = json.loads(record.read_text(encoding="utf-8")) if resume_from and record.is_file() else {}
    changed = _resume_changes(previous, given, run_dir) if previous else {}
    if resume_from is not None and state.is_main_process:
        _abandon_later_epochs(run_dir, resume_from, previous)
    state.wait_for_everyone()  # every process has looked at the run folder before the main one writes to it

    if args.batch_size % (state.num_processes * args.grad_accum_steps):
        raise SystemExit(
            f"--batch-size {args.batch_size} (global) must be a multiple of processes x --grad-accum-steps "
            f"= {state.num_processes} x {args.grad_accum_steps}"
        )
    if args.sync_bn and state.num_processes > 1 and state.device.type == "cpu":
        raise SystemExit("--sync-bn needs GPUs (torch's SyncBatchNorm has no CPU implementation); drop it")
    accelerator = make_accelerator(
        cpu=cpu,
        mixed_precision=args.mixed_precision,
        grad_accum_steps=args.grad_accum_steps,
        seed=args.seed,
        compile=args.compile,
        log_with=_trackers(args.log_with),
        project_dir=run_dir,
    )
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # seed + rank, as timm's train.py: every process draws its own crops and flips; the loaders' shuffle is
    # seeded apart (data_seed / the stream's seed), the same on every process; DDP copies rank 0's init
    set_seed(args.seed, device_specific=True)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    _logger.info(
        "%s, %d process(es), mixed precision %s, run folder %s",
        accelerator.device,
        accelerator.num_processes,
        accelerator.mixed_precision,
        run_dir,
    )
    return RunSetup(accelerator, run_dir, resume_from, previous, changed)


# ---------------------------------------------------------------------------------------------- 2. data


def load_data(args: Any, accelerator: Accelerator) -> tuple[ImageData, int]:
    """The data set (its training split streamed with ``--streaming``) and the classifier's outputs."""
    with accelerator.local_main_process_first():  # one download / cache per node
        data = load_image_dataset(
            args.dataset,
            args.data_dir,
            train_split=args.train_split,
            val_split=args.val_split,
            image_column=args.image_column,
            label_column=args.label_column,
            streaming=args.streaming,
        )
    if args.train_subset is not None:
        if args.streaming or not 0 < args.train_subset <= data.num_train:
            raise SystemExit(
                f"--train-subset {args.train_subset}: takes 1..{data.num_train} (the training split's size), "
                "not with --streaming"
            )
        data.train, data.num_train = data.train.select(range(args.train_subset)), args.train_subset
    num_classes = args.num_classes or data.num_classes
    if num_classes < data.num_classes:
        raise SystemExit(f"--num-classes {num_classes} < the data set's {data.num_classes} classes")
    _logger.info(
        "data %s: %d train (%s%s), %d test (%s) images, %d classes",
        data.name,
        data.num_train,
        data.train_split,
        ", streamed" if data.streamed else "",
        len(data.test),
        data.test_split,
        data.num_classes,
    )
    return data, num_classes


# --------------------------------------------------------------------------------------------- 3. model


def build_model(
    args: Any, accelerator: Accelerator, num_classes: int
) -> tuple[nn.Module, dict[str, Any], list[nn.Module]]:
    """``timm.create_model`` with its kwargs (recorded in ``run.json``), initialised or loaded, SyncBN when
    asked for, the backbone frozen for ``--freeze-backbone``, in the memory format of the run. Returns the
    model, its kwargs and the frozen backbone's BN layers (kept in eval mode while training)."""
    model_kwargs = _model_kwargs(args, num_classes)
    with accelerator.local_main_process_first():
        model = timm.create_model(args.model, pretrained=args.pretrained, **model_kwargs)
    if args.init == "orthogonal" and not args.pretrained:
        timm_svb.orthogonal_init_(model)
    if args.initial_checkpoint:
        load_initial_checkpoint(model, args.initial_checkpoint, args.model)
    if args.sync_bn and accelerator.num_processes > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        _warn_small_bn_batch(args, accelerator, model)
    frozen_bn = freeze_backbone(model) if args.freeze_backbone else []
    if _channels_last(args, accelerator):
        model = model.to(memory_format=torch.channels_last)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _logger.info(
        "model %s: %.2fM parameters%s",
        args.model,
        sum(p.numel() for p in model.parameters()) / 1e6,
        f", {trainable / 1e6:.4f}M trained (--freeze-backbone)" if args.freeze_backbone else "",
    )
    return model, model_kwargs, frozen_bn


def _channels_last(args: Any, accelerator: Accelerator) -> bool:
    """``--channels-last``, by default on for CPU training (oneDNN runs it faster)."""
    return accelerator.device.type == "cpu" if args.channels_last is None else args.channels_last


def _warn_small_bn_batch(args: Any, accelerator: Accelerator, model: nn.Module) -> None:
    bn_batch = args.batch_size // (accelerator.num_processes * args.grad_accum_steps)
    if (
        bn_batch >= MIN_BN_BATCH
        or not accelerator.is_main_process
        or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    ):
        return
    _logger.warning(
        "BN%s statistics come from %d images per process (--batch-size %d / (%d process(es) x %d "
        "accumulation steps)), fewer than %d: expect noisier training%s",
        " and BBN" if not args.no_bbn else "",
        bn_batch,
        args.batch_size,
        accelerator.num_processes,
        args.grad_accum_steps,
        MIN_BN_BATCH,
        "; --sync-bn computes them over all processes"
        if accelerator.num_processes > 1 and accelerator.device.type != "cpu"
        else "",
    )


# ------------------------------------------------------------------------------------------- 4. loaders


@dataclass
class Loaders:
    """The training and test loaders, the preprocessing they apply, and what a training batch goes through
    next: mixup / cutmix and the loss."""

    train: Any  # a DataLoader, or a FixedLengthLoader over a stream
    test: DataLoader
    steps_per_epoch: int
    data_config: dict[str, Any]  # timm's data config of the model (input size, mean, std, crop)
    resolved: dict[str, Any]  # defaults resolved here, recorded in run.json's recipe (hflip, aug, workers)
    mixup_fn: Mixup | None  # timm's Mixup (soft targets), None without --mixup / --cutmix
    loss_fn: nn.Module  # the training loss (testing uses plain cross-entropy)


def build_loaders(
    args: Any, accelerator: Accelerator, data: ImageData, model: nn.Module, num_classes: int
) -> Loaders:
    """The model's data config (timm's ``resolve_data_config``, overridden by ``--input-size`` & co.), the
    training augmentation (crop and flip, ``--aa``, ``--reprob``) and the test transform, their loaders
    (``--batch-size`` images per optimizer step in all, ``steps_per_epoch`` full batches an epoch), timm's
    ``Mixup`` and the loss it needs: ``SoftTargetCrossEntropy`` for mixed targets, else
    ``LabelSmoothingCrossEntropy`` (``--smoothing``) or cross-entropy."""
    data_config = model_data_config(model, args)
    hflip = args.hflip if args.hflip is not None else (0.0 if data.name == DIGITS else 0.5)
    aug = resolve_aug(args.aug, data_config)
    mode = "L" if data_config["input_size"][0] == 1 else "RGB"
    train_tf = build_transforms(
        data_config,
        True,
        aug=aug,
        hflip=hflip,
        crop_padding=args.crop_padding,
        scale=tuple(args.scale) if args.scale else None,
        ratio=tuple(args.ratio) if args.ratio else None,
        color_jitter=args.color_jitter,
        auto_augment=args.aa,
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
    )
    test_tf = build_transforms(data_config, False)
    workers = args.workers if args.workers is not None else _default_workers(accelerator)
    pin = accelerator.device.type == "cuda"
    steps_per_epoch = data.num_train // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(
            f"--batch-size {args.batch_size} is larger than the {data.num_train} training images"
        )
    val_batch = args.validation_batch_size or args.batch_size
    val_batch = -(-val_batch // accelerator.num_processes) * accelerator.num_processes
    plans = _memory_plans(args, data, train_tf, test_tf, data_config["input_size"])
    if plans is not None:
        train_split, test_split = _decode_splits(args, accelerator, data, mode, plans)
        train_loader = memory_loader(train_split, plans[0], train=True, batch_size=args.batch_size)
        test_loader = memory_loader(test_split, plans[1], train=False, batch_size=val_batch)
        workers = 0
    else:
        train_loader = make_train_loader(
            data,
            train_tf,
            mode,
            batch_size=args.batch_size,
            steps=steps_per_epoch,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            seed=args.seed,
            shuffle_buffer=args.shuffle_buffer,
            **loader_kwargs(workers, pin),
        )
        test_loader = DataLoader(
            TorchImageDataset(data.test, data.image_column, data.label_column, test_tf, mode),
            batch_size=val_batch,
            shuffle=False,
            **loader_kwargs(workers, pin),
        )
    resolved = {"hflip": hflip, "aug": aug, "workers": workers, "data_path": "memory" if plans else "loader"}
    mixup_fn, loss_fn = _mixup_and_loss(args, accelerator, num_classes)
    return Loaders(train_loader, test_loader, steps_per_epoch, data_config, resolved, mixup_fn, loss_fn)


def _memory_plans(
    args: Any, data: ImageData, train_tf: Any, test_tf: Any, input_size: tuple[int, int, int]
) -> tuple[MemoryPlan, MemoryPlan] | None:
    """The in-memory path's plans for the training and test transforms (``--in-memory``), or None for the
    per-image loaders; the log says which path and why."""
    if args.in_memory == "off":
        _logger.info("data path: per-image loader (--in-memory off)")
        return None
    train_plan, why = plan_memory_path(train_tf)
    test_plan, test_why = plan_memory_path(test_tf)
    need = split_nbytes(data.num_train + len(data.test), input_size)
    if data.streamed:
        why = "--streaming reads the training split as it goes"
    elif train_plan is None:
        why = f"training augmentation: {why}"
    elif test_plan is None:
        why = f"test transform: {test_why}"
    elif need > args.in_memory_cap * 2**30:
        why = f"the decoded splits take {need / 2**30:.2f} GiB, over --in-memory-cap {args.in_memory_cap:g}"
    else:
        _logger.info(
            "data path: in memory (%d + %d images decoded once, %.2f GiB of uint8 on the training device; "
            "crops, flips and normalisation a batch at a time)",
            data.num_train,
            len(data.test),
            need / 2**30,
        )
        return train_plan, test_plan
    if args.in_memory == "on":
        raise SystemExit(f"--in-memory on: {why}; drop it (or --in-memory auto) to use the per-image loader")
    _logger.info("data path: per-image loader (%s)", why)
    return None


def _decode_splits(
    args: Any, accelerator: Accelerator, data: ImageData, mode: str, plans: tuple[MemoryPlan, MemoryPlan]
) -> tuple[MemorySplit, MemorySplit]:
    """Both splits decoded (or read from the decode cache: the node's first process writes it) and moved to
    the training device."""
    cache = None if args.data_cache == "none" else (args.data_cache or default_cache_dir())
    splits = []
    with accelerator.local_main_process_first():
        for name, ds, plan in zip(
            (data.train_split, data.test_split), (data.train, data.test), plans, strict=True
        ):
            split = decode_split(
                ds,
                data.image_column,
                data.label_column,
                mode,
                plan,
                cache_dir=cache,
                progress=args.progress and accelerator.is_local_main_process,
                desc=f"decode {name}",
            )
            splits.append(split.to(accelerator.device))
    return splits[0], splits[1]


def _mixup_and_loss(args: Any, accelerator: Accelerator, num_classes: int) -> tuple[Mixup | None, nn.Module]:
    """timm's ``Mixup`` (None without ``--mixup`` / ``--cutmix``) and the training loss its targets need."""
    if not (args.mixup > 0 or args.cutmix > 0):
        loss_fn = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing else nn.CrossEntropyLoss()
        return None, loss_fn.to(accelerator.device)
    if (args.batch_size // accelerator.num_processes) % 2:
        raise SystemExit(
            f"--mixup / --cutmix pair the images of each process's batch: --batch-size {args.batch_size} / "
            f"{accelerator.num_processes} process(es) must be even"
        )
    mixup_fn = Mixup(
        mixup_alpha=args.mixup,
        cutmix_alpha=args.cutmix,
        prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob,
        mode=args.mixup_mode,
        label_smoothing=args.smoothing,
        num_classes=num_classes,
    )
    return mixup_fn, SoftTargetCrossEntropy().to(accelerator.device)  # the smoothing is in the targets


def _default_workers(accelerator: Accelerator) -> int:
    """Loader processes per training process: none on the CPU, else min(8, cores per process)."""
    if accelerator.device.type == "cpu":
        return 0
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    return min(8, max(1, (os.cpu_count() or 1) // max(1, local_processes)))


# ---------------------------------------------------------------------------- 5. optimizer, schedule, SVB


@dataclass
class Optimization:
    """What updates the weights: optimizer, learning-rate schedule and the SVB plugin (None: no SVB)."""

    optimizer: torch.optim.Optimizer
    scheduler: RecipeLR
    svb: RecordingSVB | None
    svb_config: dict[str, Any] | None  # run.json's svb_config: epsilon, bbn_epsilon, every_n_steps
    svb_recipe: dict[str, Any] | None  # ... and the schedule's rules, for run.json's recipe


def build_optimizer(args: Any, model: nn.Module, steps_per_epoch: int, setup: RunSetup) -> Optimization:
    """SGD (the reference) or a timm optimizer over :func:`engine.param_groups` (weight decay off for BN and
    biases when fine-tuning, the classifier's ``--head-lr-scale``, frozen parameters left out); the per-step
    :class:`engine.RecipeLR`; SVB as the model's ``svb_config`` and ``--svb-*`` say, on the schedule of
    ``--svb-every`` and the reference's rules, leaving frozen layers alone."""
    filter_bias_and_bn, scale = _filter_bias_and_bn(args), args.head_lr_scale
    groups = param_groups(
        model, args.weight_decay, filter_bias_and_bn=filter_bias_and_bn, head_lr_scale=scale
    )
    optimizer = (
        torch.optim.SGD(
            groups,
            lr=args.lr,
            momentum=args.momentum,
            nesterov=args.nesterov and args.momentum > 0,
            weight_decay=args.weight_decay,
        )
        if args.opt.lower() == "sgd"
        else create_optimizer_v2(
            groups, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum
        )
    )
    _logger.info(
        "optimizer %s: %s",
        args.opt,
        "; ".join(
            f"{len(g['params'])} tensors weight decay {g['weight_decay']:g}"
            + (f" lr x {g['lr_scale']:g}" if "lr_scale" in g else "")
            for g in groups
        ),
    )
    if args.lr_base is not None:
        _logger.info(
            "lr %g = --lr-base %g x batch %d / --lr-base-size %d (%s)",
            args.lr,
            args.lr_base,
            args.batch_size,
            args.lr_base_size,
            args.lr_base_scale or "timm's default scaling",
        )
    scheduler = RecipeLR(
        optimizer,
        steps_per_epoch,
        sched=args.sched,
        lr=args.lr,
        min_lr=args.min_lr,
        epochs=args.epochs,
        decay_stages=args.decay_stages,
        warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr,
    )
    settings = _svb_settings(args, model)
    if setup.previous and (setup.previous.get("svb_config") is None) != (settings is None):
        raise SystemExit(
            f"cannot resume {setup.run_dir} with SVB {'on' if settings else 'off'}: the run trained with it "
            f"{'off' if settings else 'on'} (its checkpoint holds {'no' if settings else 'the'} SVB "
            "schedule); resume with the run's SVB options, or start a new run with --initial-checkpoint"
        )
    if settings is None:
        return Optimization(optimizer, scheduler, None, None, None)
    return Optimization(optimizer, scheduler, *_make_svb(args, model, settings, steps_per_epoch))


def _make_svb(
    args: Any, model: nn.Module, settings: dict[str, Any], steps_per_epoch: int
) -> tuple[RecordingSVB, dict[str, Any], dict[str, Any]]:
    """The SVB plugin on the schedule of ``--svb-every`` and the reference's two rules, leaving frozen layers
    alone; with run.json's ``svb_config`` and the recipe's ``svb`` entry."""
    every = parse_svb_every(args.svb_every, steps_per_epoch)
    skip_last = args.svb_skip_last if args.svb_skip_last is not None else min(100, steps_per_epoch // 4)
    svb = RecordingSVB(
        model,
        settings["epsilon"],
        settings["bbn_epsilon"],
        every,
        steps_per_epoch=steps_per_epoch,
        skip_last_steps=skip_last,
        num_epochs=args.epochs,
        skip_final_epoch=args.svb_skip_final_epoch,
        exclude=_svb_exclude(args, model),
        bbn_mode=args.bbn_mode,
    )
    svb_config = {**settings, "every_n_steps": every}
    return (
        svb,
        svb_config,
        {**svb_config, "skip_last_steps": skip_last, "skip_final_epoch": svb.skip_final_epoch},
    )


def _filter_bias_and_bn(args: Any) -> bool:
    """``--filter-bias-and-bn``; by default on when fine-tuning (from ``--pretrained`` weights or an
    ``--initial-checkpoint``)."""
    if args.filter_bias_and_bn is not None:
        return args.filter_bias_and_bn
    return bool(args.pretrained or args.initial_checkpoint)


def _svb_exclude(args: Any, model: nn.Module) -> tuple[str, ...]:
    """What SVB leaves alone: ``--svb-exclude`` and the frozen layers (bounding them would change weights
    that training does not: a frozen backbone must stay as loaded)."""
    return (*(args.svb_exclude or ()), *frozen_layer_names(model))


# ------------------------------------------------------------------------------------ 6. prepare, resume


@dataclass
class PreparedRun:
    """The prepared objects and the run's progress."""

    model: nn.Module  # as prepared: inside the DDP / compile wrappers
    plain: nn.Module  # the timm model inside them: what is saved, bounded, measured and returned
    optimizer: torch.optim.Optimizer
    train_loader: Any
    test_loader: Any
    scheduler: Any
    state: RunState
    run_dir: Path
    steps_per_epoch: int
    start_epoch: int  # epochs completed before this invocation
    svb_steps: list[int]  # steps of the whole run after which SVB bounds
    ema: BoundedEMA | None  # --model-ema
    loaders: Loaders  # mixup and the loss of a training batch
    frozen_bn: list[nn.Module]  # a frozen backbone's BN layers, in eval mode while training
    max_steps_hit: bool = False  # --max-steps stopped the run (train_epochs sets it)
    cut_epoch: bool = False  # ... within an epoch: the last row is of a part of an epoch


def prepare(
    args: Any,
    setup: RunSetup,
    model: nn.Module,
    loaders: Loaders,
    optim: Optimization,
    frozen_bn: list[nn.Module],
) -> PreparedRun:
    """``accelerator.prepare`` (device, DDP, compile), the model EMA (of the prepared model, on its device),
    the checkpoint's contents (plain timm weights, the run's progress, SVB's position, the EMA) and, for
    ``--resume``, loading it: the command line's optimizer settings win."""
    accelerator, svb = setup.accelerator, optim.svb
    optimizer, scheduler, train_loader = optim.optimizer, optim.scheduler, loaders.train
    if isinstance(train_loader, FixedLengthLoader):  # a stream: each process reads its own shards
        model, optimizer, test_loader, scheduler = accelerator.prepare(
            model, optimizer, loaders.test, scheduler
        )
    else:
        model, optimizer, train_loader, test_loader, scheduler = accelerator.prepare(
            model, optimizer, train_loader, loaders.test, scheduler
        )
        if len(train_loader) != loaders.steps_per_epoch:
            raise RuntimeError(
                f"prepared loader has {len(train_loader)} batches, expected {loaders.steps_per_epoch}"
            )
    # (unwrap_model with keep_torch_compile=True would put the plain model inside the compiled one and drop
    # DDP's no_sync)
    plain = accelerator.unwrap_model(model, keep_torch_compile=False)
    _checkpoint_plain_weights(accelerator, plain)
    run_state = RunState()
    accelerator.register_for_checkpointing(run_state)
    svb_steps: list[int] = []
    if svb is not None:
        svb.attach(optimizer)
        accelerator.register_for_checkpointing(svb)
        svb_steps = svb_apply_steps(svb, loaders.steps_per_epoch * args.epochs)
        _log_svb_schedule(svb, loaders.steps_per_epoch, svb_steps, args.epochs)
    ema = _make_ema(args, plain, svb) if args.model_ema else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    if setup.resume_from is not None:
        _resume(setup, optimizer, run_state, args.epochs)
    return PreparedRun(
        model,
        plain,
        optimizer,
        train_loader,
        test_loader,
        scheduler,
        run_state,
        setup.run_dir,
        loaders.steps_per_epoch,
        run_state.epoch,
        svb_steps,
        ema,
        loaders,
        frozen_bn,
    )


def _make_ema(args: Any, plain: nn.Module, svb: RecordingSVB | None) -> BoundedEMA:
    """``--model-ema`` of the prepared timm model (on its device), bounded by an SVB of its own with the
    model SVB's bands and layer selection whenever that one bounds."""
    return BoundedEMA(
        plain,
        args.model_ema_decay,
        warmup=args.model_ema_warmup,
        model_svb=svb,
        svb=lambda copy: RecordingSVB(
            copy, svb.epsilon, svb.bbn_epsilon, exclude=_svb_exclude(args, copy), bbn_mode=svb.bbn_mode
        ),
    )


def _resume(setup: RunSetup, optimizer: torch.optim.Optimizer, run_state: RunState, epochs: int) -> None:
    """Load the checkpoint into everything registered; the command line's optimizer settings (weight decay,
    momentum, ...; not the scheduled rate) win over the checkpoint's, which ``load_state_dict`` restores."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    setup.accelerator.load_state(str(setup.resume_from))
    for group, own in zip(optimizer.param_groups, settings, strict=True):
        group.update({k: v for k, v in own.items() if k != "lr"})
    _logger.info(
        "resumed %s after epoch %d of %d from %s%s",
        setup.run_dir,
        run_state.epoch,
        epochs,
        setup.resume_from.name,
        (
            "; changed on the command line, in effect from epoch "
            f"{run_state.epoch + 1} on (LR schedule, SVB schedule, optimizer, ...): "
            + "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in setup.changed.items())
        )
        if setup.changed
        else "",
    )


def _abandon_later_epochs(run_dir: Path, resume_from: Path, previous: dict[str, Any]) -> None:
    """A rewind (``--resume`` of an earlier checkpoint than the run's newest) continues on the branch resumed:
    what the run did after it is moved aside (:func:`rundir.abandon_later_epochs`), and said so."""
    epoch = int(resume_from.name.split("_")[-1])
    moved = abandon_later_epochs(run_dir, epoch, previous.get("metrics") or {})
    if moved is not None:
        _logger.warning(
            "resuming %s from epoch %d, before its newest checkpoint: what it did after epoch %d (%s) "
            "moved to %s; --resume now continues this branch",
            run_dir,
            epoch,
            epoch,
            ", ".join(sorted(p.name for p in [*moved.iterdir(), *(moved / "checkpoints").iterdir()])),
            moved,
        )


def _log_svb_schedule(svb: RecordingSVB, steps_per_epoch: int, svb_steps: list[int], epochs: int) -> None:
    _logger.info(
        "SVB eps %g, BBN %s: every %d steps (epoch = %d steps), not in the last %d steps of an epoch%s: "
        "%d times in %d epochs",
        svb.epsilon,
        "off" if svb.bbn_epsilon is None else f"eps {svb.bbn_epsilon:g} ({svb.bbn_mode})",
        svb.every_n_steps,
        steps_per_epoch,
        svb.skip_last_steps,
        ", not in the final epoch" if svb.skip_final_epoch else "",
        len(svb_steps),
        epochs,
    )
    if not svb_steps:
        causes = [
            f"--epochs {epochs} ({steps_per_epoch} steps each)",
            f"--svb-every ({svb.every_n_steps} steps)",
        ]
        if svb.skip_last_steps:
            causes.append(f"--svb-skip-last {svb.skip_last_steps}")
        if svb.skip_final_epoch:
            causes.append("--svb-skip-final-epoch (on by default; --no-svb-skip-final-epoch)")
        _logger.warning(
            "SVB is on but its schedule applies it 0 times: this run is plain SGD. The schedule comes from "
            "%s; train more epochs or change those options",
            ", ".join(causes),
        )


# ---------------------------------------------------------------------------------------- 7. run record


class RunRecord:
    """``run.json``, ``summary.csv`` and ``curves.png`` of the run, rewritten by the main process as the run
    goes."""

    def __init__(self, run_dir: Path, run: dict[str, Any], state: RunState, is_main: bool) -> None:
        self.run_dir, self.run, self.state, self.is_main = run_dir, run, state, is_main

    def write(self, status: str, completed_epochs: int | None = None) -> None:
        """Record the run's progress with ``status`` (``running``, ``stopped``, ``stopped_max_steps``,
        ``finished``) and its whole epochs (default: those of its rows)."""
        if not self.is_main:
            return
        self.run["status"] = status
        self.run["completed_epochs"] = self.state.epoch if completed_epochs is None else completed_epochs
        # SVB applications so far, which the publisher's model card states (None: no SVB)
        last = self.state.history[-1] if self.state.history else {}
        self.run["svb_applied_total"] = (
            None if self.run["svb_config"] is None else last.get("svb_applied_total", 0)
        )
        self.run["metrics"] = self.state.metrics()
        write_run_json(self.run_dir / "run.json", self.run)
        write_summary(self.run_dir / "summary.csv", self.state.history)
        if self.state.history:  # from the files just written, as timm-svb-curves draws any run
            plot_curves([self.run_dir], self.run_dir / "curves.png", title=f"{self.run_dir.name} ({status})")


def start_record(
    args: Any,
    given: dict[str, Any],
    setup: RunSetup,
    data: ImageData,
    model_kwargs: dict[str, Any],
    loaders: Loaders,
    optim: Optimization,
    run: PreparedRun,
) -> RunRecord:
    """Write ``run.json`` (what ``hub/publish.py`` and ``--resume`` read) and ``args.yaml``; start the
    trackers (``--log-with``)."""
    accelerator = setup.accelerator
    pretrained_cfg = dict(getattr(run.plain, "pretrained_cfg", {}) or {})
    pretrained_cfg.update(loaders.data_config)
    pretrained_cfg["num_classes"] = model_kwargs["num_classes"]
    recipe = dict(vars(args))
    recipe.update(
        **loaders.resolved,
        channels_last=_channels_last(args, accelerator),
        num_processes=accelerator.num_processes,
        mixed_precision=str(accelerator.mixed_precision),
        steps_per_epoch=run.steps_per_epoch,
        svb=optim.svb_recipe,
        filter_bias_and_bn=_filter_bias_and_bn(args),
    )
    resumes = list(setup.previous.get("resumes", []))
    if setup.resume_from is not None:
        resumes.append(
            {"after_epoch": run.start_epoch, "checkpoint": setup.resume_from.name, "changed": setup.changed}
        )
    record = RunRecord(
        run.run_dir,
        {
            "model": args.model,
            "model_kwargs": model_kwargs,
            "num_classes": model_kwargs["num_classes"],
            "svb_config": optim.svb_config,
            "dataset": data.describe(),
            "recipe": recipe,
            "args": given,
            "resumes": resumes,
            "metrics": {"best": None, "final": None},
            "pretrained_cfg": pretrained_cfg,
            "timm_svb_version": timm_svb.__version__,
            "status": "running",
            "epochs": args.epochs,
            "completed_epochs": run.start_epoch,
        },
        run.state,
        accelerator.is_main_process,
    )
    if accelerator.is_main_process:
        resolved = {**vars(args), "channels_last": recipe["channels_last"]}
        atomic_write_text(
            run.run_dir / "args.yaml",
            yaml.safe_dump(
                {k: v for k, v in resolved.items() if k not in ("config", "resume")}, sort_keys=False
            ),
        )
        for name in ("best", "best_ema") if setup.resume_from is not None else ():
            best = getattr(run.state, name)
            if best is not None and best["epoch"] == run.state.epoch:  # the save may have been cut short
                save_weights(_weights_of(run, name), run.run_dir / f"model_{name}.safetensors")
        record.write("running")
    if _trackers(args.log_with):
        run_name = args.run_name or run.run_dir.name
        accelerator.init_trackers(
            args.experiment,
            config=_flat_hparams(recipe),
            init_kwargs={tracker: {key: run_name} for tracker, key in RUN_NAME_KWARGS.items()},
        )
    return record


def _weights_of(run: PreparedRun, name: str) -> nn.Module:
    """The model whose weights ``model_NAME.safetensors`` holds: the EMA copy for ``*_ema``."""
    return run.ema.module if name.endswith("_ema") else run.plain


# -------------------------------------------------------------------------------------------- 8. epochs


def train_epochs(
    args: Any, accelerator: Accelerator, run: PreparedRun, svb: RecordingSVB | None, record: RunRecord
) -> None:
    """Every epoch (up to ``--epochs``, or ``--stop-after`` in this invocation): train (mixup, loss, the EMA
    updated and SVB applied after optimizer steps), average the BN statistics over the processes, test the
    model and its EMA, record a ``summary.csv`` row, checkpoint, save the best weights, log to the trackers
    and the console."""
    stop_at = args.epochs if args.stop_after is None else min(args.epochs, run.start_epoch + args.stop_after)
    channels_last = _channels_last(args, accelerator)
    ema_svb = run.ema.svb if run.ema is not None else None
    if args.max_steps is not None and args.max_steps < args.epochs * run.steps_per_epoch:
        _logger.info(
            "--max-steps %d: stops in epoch %d of %d (%d steps an epoch); the LR and SVB schedules stay "
            "those of %d epochs",
            args.max_steps,
            math.ceil(args.max_steps / run.steps_per_epoch),
            args.epochs,
            run.steps_per_epoch,
            args.epochs,
        )
    for epoch in range(run.start_epoch, stop_at):
        left = None if args.max_steps is None else args.max_steps - epoch * run.steps_per_epoch
        if left is not None and left <= 0:
            run.max_steps_hit = True
            break
        cut = left is not None and left < run.steps_per_epoch
        run.train_loader.set_epoch(epoch)
        lr = getattr(run.scheduler, "scheduler", run.scheduler).base_lr  # inside Accelerate's wrapper
        applied_before = svb.num_applied if svb is not None else 0
        for plugin in (svb, ema_svb):
            if plugin is not None:
                plugin.last_stats, plugin.seconds = None, 0.0
        train = train_one_epoch(
            run.model,
            run.train_loader,
            run.optimizer,
            accelerator,
            scheduler=run.scheduler,
            epoch=epoch,
            grad_accum_steps=args.grad_accum_steps,
            loss_fn=run.loaders.loss_fn,
            mixup_fn=run.loaders.mixup_fn,
            ema=run.ema,
            eval_modules=run.frozen_bn,
            clip_grad=args.clip_grad,
            channels_last=channels_last,
            progress=args.progress,
            log_interval=args.log_interval,
            max_steps=left if cut else None,
        )
        tested = {"": run.model} if run.ema is None else {"": run.model, "ema_": run.ema.module}
        if accelerator.num_processes > 1 and args.dist_bn != "none":
            for model in (run.plain, *(() if run.ema is None else (run.ema.module,))):
                timm.utils.distribute_bn(model, accelerator.num_processes, reduce=args.dist_bn == "reduce")
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": train.loss,
            "train_top1_err": train.top1_err,
            "images_per_s": train.images_per_s,
            "epoch_s": train.seconds,
        }
        for prefix, model in tested.items():
            # a pass over a loader draws its workers' base seed from the global generator: the EMA's pass must
            # not, or --model-ema would change the augmentation, and so the training, of the model
            with torch.random.fork_rng(devices=[]) if prefix else contextlib.nullcontext():
                metrics = evaluate(model, run.test_loader, accelerator, channels_last=channels_last)
            row.update({f"{prefix}test_loss": metrics["loss"]})
            row.update({f"{prefix}{k}": metrics[k] for k in ("top1_err", "top5_err")})
        if svb is not None:
            row.update(_svb_row(svb, applied_before))
        if ema_svb is not None:
            stats = ema_svb.last_stats
            row.update(
                ema_svb_clipped=stats.clipped if stats else None,
                ema_svb_sv_min=_solved_extreme(stats.sv_min) if stats else None,
                ema_svb_sv_max=_solved_extreme(stats.sv_max) if stats else None,
            )
        new_best = run.state.record(row)
        if not cut:  # a resumed run starts at an epoch's beginning: a cut epoch is not checkpointed
            save_checkpoint(accelerator, run.run_dir, epoch + 1, args.checkpoint_hist)
        if accelerator.is_main_process:
            for name in new_best:
                save_weights(_weights_of(run, name), run.run_dir / f"model_{name}.safetensors")
        _log_epoch(args, accelerator, run, svb, row, epoch)
        if cut:
            run.max_steps_hit = run.cut_epoch = True
            break
        record.write("running")


def _svb_row(svb: RecordingSVB, applied_before: int) -> dict[str, Any]:
    """The SVB columns of an epoch's ``summary.csv`` row: its applications and what the last one saw."""
    stats = svb.last_stats
    return {
        "svb_applied": svb.num_applied - applied_before,
        "svb_applied_total": svb.num_applied,
        "svb_s": svb.seconds,
        "svb_clipped": stats.clipped if stats else None,
        "svb_sv_min": _solved_extreme(stats.sv_min) if stats else None,
        "svb_sv_max": _solved_extreme(stats.sv_max) if stats else None,
        "bbn_clipped": stats.bn_clipped if stats else None,
    }


def _log_epoch(
    args: Any,
    accelerator: Accelerator,
    run: PreparedRun,
    svb: RecordingSVB | None,
    row: dict[str, Any],
    epoch: int,
) -> None:
    """An epoch's row to the trackers (with spectrum statistics every ``--spectrum-every`` epochs) and the
    console."""
    spectrum = {}
    # main process only: the other processes hold the same weights and the trackers live on the main one
    if accelerator.is_main_process and args.spectrum_every and (epoch + 1) % args.spectrum_every == 0:
        spectrum = spectrum_summary(model_spectrum(run.plain), epsilon=_band_epsilon(svb))
    extra = {}
    if svb is not None:
        last = svb.last_stats.to_dict() if svb.last_stats else {}
        extra = {"svb/applied": row["svb_applied"], **last}
    if row["train_top1_err"] is not None:  # not with mixed targets
        extra["train/top1_err"] = row["train_top1_err"]
    if run.ema is not None:
        extra.update({f"test_ema/{k}": row[f"ema_{k}"] for k in ("top1_err", "top5_err")})
        extra["test_ema/loss"] = row["ema_test_loss"]
    accelerator.log(
        {
            **spectrum,
            "train/loss": row["train_loss"],
            "train/lr": row["lr"],
            "train/images_per_s": row["images_per_s"],
            "test/top1_err": row["top1_err"],
            "test/top5_err": row["top5_err"],
            "test/loss": row["test_loss"],
            **extra,
        },
        step=epoch + 1,
    )
    text = ""
    if run.ema is not None:
        text += f"  EMA top-1 err {row['ema_top1_err']:.2f}%"
    if svb is not None and row["svb_applied"]:
        text += f"  SVB x{row['svb_applied']} ({_describe_svb(svb.last_stats)}, {svb.seconds:.2f}s)"
    _logger.info(
        "epoch %d/%d  lr %.4g  train loss %.4f  test top-1 err %.2f%%  top-5 err %.2f%%  %.0f img/s%s",
        epoch + 1,
        args.epochs,
        row["lr"],
        row["train_loss"],
        row["top1_err"],
        row["top5_err"],
        row["images_per_s"],
        text,
    )


# -------------------------------------------------------------------------------------------- 9. finish


def finish(
    args: Any, accelerator: Accelerator, run: PreparedRun, svb: RecordingSVB | None, record: RunRecord
) -> TrainResult:
    """After the last epoch: ``model_final.safetensors`` (and ``model_final_ema``) and ``spectra.png``; the
    record's final status; the trackers closed; the test error and the run folder printed."""
    state = run.state
    finished = state.epoch >= args.epochs and not run.max_steps_hit
    if accelerator.is_main_process and finished:
        for name in ("final", "final_ema") if run.ema is not None else ("final",):
            save_weights(_weights_of(run, name), run.run_dir / f"model_{name}.safetensors")
        plot_spectra({args.model: model_spectrum(run.plain)}, run.run_dir / "spectra.png", _band_epsilon(svb))
    status = "finished" if finished else "stopped_max_steps" if run.max_steps_hit else "stopped"
    record.write(status, completed_epochs=state.epoch - run.cut_epoch)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if finished and state.history:
        final, best = state.history[-1], state.best
        accelerator.print(
            f"test error after {args.epochs} epochs: top-1 {final['top1_err']:.2f}%, "
            f"top-5 {final['top5_err']:.2f}% "
            f"(best: top-1 {best['top1_err']:.2f}% at epoch {best['epoch']})"
            + (
                f"; EMA: top-1 {final['ema_top1_err']:.2f}%, top-5 {final['ema_top5_err']:.2f}%"
                if run.ema
                else ""
            )
        )
    elif run.max_steps_hit:
        where = f"{'in' if run.cut_epoch else 'after'} epoch {state.epoch} of {args.epochs}"
        accelerator.print(f"stopped by --max-steps {args.max_steps} {where}")
    elif not finished:
        accelerator.print(f"stopped after epoch {state.epoch} of {args.epochs}; continue with --resume")
    accelerator.print(f"run folder: {run.run_dir}")
    sys.stdout.flush()
    return TrainResult(
        run_dir=run.run_dir,
        model=run.plain,
        svb=svb,
        state=state,
        finished=finished,
        start_epoch=run.start_epoch,
        svb_steps=run.svb_steps,
        run=record.run,
        ema=run.ema,
    )


# ----------------------------------------------------------------------------------------------- helpers


def _setup_logging(is_main: bool) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    level = logging.INFO if is_main else logging.WARNING
    for name in ("recipes.train", "recipes.data"):
        logging.getLogger(name).setLevel(level)


def _trackers(value: str) -> list[str]:
    value = (value or "none").strip().lower()
    if value == "auto":
        return ["tensorboard"] if is_tensorboard_available() else []
    if value in ("none", "", "no"):
        return []
    return [v.strip() for v in value.split(",") if v.strip()]


def _run_dir(args: Any, state: PartialState) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to resume (None for a new run); the same on every process."""
    if args.resume:
        checkpoint, run_dir = find_checkpoint(args.resume, args.output)
        return run_dir, checkpoint
    if args.output:
        run_dir = Path(args.output)
    elif args.run_name:
        run_dir = Path("runs") / args.run_name
    else:
        stamp = [datetime.now().strftime("%Y%m%d-%H%M%S")]
        if state.num_processes > 1:
            broadcast_object_list(stamp)
        run_dir = Path("runs") / f"{stamp[0]}-{args.model.replace('/', '_')}"
    if (run_dir / "run.json").exists():
        raise SystemExit(
            f"{run_dir} already holds a run: continue it with --resume --output {run_dir}, or choose another "
            "--output"
        )
    return run_dir, None


def _is_svb_variant(name: str) -> bool:
    return name.split(".")[0].split(":")[-1].endswith("_svb")


def _model_kwargs(args: Any, num_classes: int) -> dict[str, Any]:
    kwargs = dict(args.model_kwargs or {})
    kwargs["num_classes"] = num_classes
    if args.drop is not None:
        kwargs["drop_rate"] = args.drop
    if args.input_size is not None and args.input_size[0] != 3:
        kwargs["in_chans"] = args.input_size[0]
    if _is_svb_variant(args.model) and not args.no_svb:
        if args.svb_epsilon is not None:
            kwargs["svb_epsilon"] = args.svb_epsilon
        if args.bbn_epsilon is not None and not args.no_bbn:
            kwargs["bbn_epsilon"] = args.bbn_epsilon
    return kwargs


def load_initial_checkpoint(model: nn.Module, path: str, name: str) -> None:
    """Load weights for fine-tuning into ``model`` (timm's ``name``); classifier tensors of another shape are
    dropped (a new head). Logs whether the classifier was kept; a refusal names the model that ``run.json``
    beside the weights says they are (or asks for ``--model``)."""
    state = plain_state_dict(timm.models.load_state_dict(path, weights_only=True))
    own = model.state_dict()
    classifier = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    prefixes = (
        tuple(classifier) if isinstance(classifier, (list, tuple)) else ((classifier,) if classifier else ())
    )
    named = run_of_weights(path)
    if named is None:
        hint = "no run.json beside them names their model: pass the --model (and --model-kwargs) they were "
        hint += "trained with"
    else:
        record, run = named
        kwargs = {k: v for k, v in (run.get("model_kwargs") or {}).items() if k != "num_classes"}
        hint = (
            f"{record} says they are {run['model']} with model kwargs {kwargs}: leave --model out to take "
            "both from there, or pass them"
        )
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    wrong = [k for k in mismatched if not k.startswith(prefixes)]
    if wrong:
        raise SystemExit(
            f"--initial-checkpoint {path} does not fit {name}: shapes differ for {wrong[:5]}; {hint}"
        )
    for k in mismatched:
        del state[k]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in mismatched]
    if missing or unexpected:
        raise SystemExit(
            f"--initial-checkpoint {path} does not fit {name}: missing keys {missing[:5]}, unexpected keys "
            f"{unexpected[:5]}; {hint}"
        )
    source = f" ({name}, as {named[0]} names)" if named is not None and named[1]["model"] == name else ""
    if mismatched:
        _logger.info("initial checkpoint %s%s: new classifier (%s)", path, source, ", ".join(mismatched))
    else:
        _logger.info("initial checkpoint %s%s: classifier kept (the same number of classes)", path, source)


def _svb_settings(args: Any, model: nn.Module) -> dict[str, Any] | None:
    """epsilon / bbn_epsilon of the SVB plugin, or None for no SVB."""
    config = getattr(model, "svb_config", None)
    if args.no_svb:
        return None
    if config is None and args.svb_epsilon is None and args.bbn_epsilon is None:
        _logger.info("%s has no svb_config: plain SGD (pass --svb-epsilon to bound it)", args.model)
        return None
    config = config or {}
    epsilon = args.svb_epsilon if args.svb_epsilon is not None else config.get("epsilon", 0.5)
    bbn = (
        None
        if args.no_bbn
        else (args.bbn_epsilon if args.bbn_epsilon is not None else config.get("bbn_epsilon"))
    )
    return {"epsilon": float(epsilon), "bbn_epsilon": None if bbn is None else float(bbn)}


def _resume_changes(record: dict[str, Any], args: dict[str, Any], run_dir: Path) -> dict[str, list[Any]]:
    """The options of a resumed run that differ from its record (``run.json``): ``{name: [run's, now]}``.

    One rule: the command line wins (the LR schedule, SVB's schedule, the optimizer and everything else take
    the new values from the resumed epoch on), except for :data:`RESUME_FIXED`, which are refused.
    """
    before = record.get("args")
    if before is None:  # a run of an earlier version: its recipe, less the options it holds resolved
        resolved = ("hflip", "aug", "workers", "mixed_precision", "channels_last")
        before = {k: v for k, v in record.get("recipe", {}).items() if k not in resolved}
    # a fixed option the run's version did not have yet: that run had what its default does now
    parser = build_parser()
    before = {**{k: parser.get_default(k) for k in RESUME_FIXED if k not in before}, **before}
    now = jsonable(args)
    changed = {
        k: [before[k], v] for k, v in now.items() if k in before and before[k] != v and k not in RESUME_QUIET
    }
    fixed = [k for k in RESUME_FIXED if k in changed]
    if fixed:
        raise SystemExit(
            "cannot resume with another "
            + ", ".join(
                f"--{k.replace('_', '-')} ({changed[k][0]!r} in the run, {changed[k][1]!r} now)"
                for k in fixed
            )
            + ": the checkpoint's weights, data order, random state and optimizer state depend on it. Resume "
            f"{run_dir} without changing it, or start a new run from its weights with --initial-checkpoint "
            f"{run_dir / 'model_final.safetensors'} (or model_best)"
        )
    return changed


def _checkpoint_plain_weights(accelerator: Accelerator, plain: nn.Module) -> None:
    """Make ``accelerator.save_state`` / ``load_state`` use the timm model's own state dict.

    Accelerate saves the prepared model through its wrappers (``_orig_mod.`` keys under torch.compile,
    ``module.`` under DDP), so a checkpoint would only resume under the same wrappers. With these hooks (the
    pattern of Accelerate's ``register_*_state_pre_hook``) the checkpoint holds plain keys and loads into the
    plain module: a run resumes with or without ``--compile``, and under DDP or not.
    """

    def ours(model: nn.Module) -> bool:
        return accelerator.unwrap_model(model, keep_torch_compile=False) is plain

    def save_hook(models: list[nn.Module], weights: list[dict[str, Any]], output_dir: str) -> None:
        for i, model in enumerate(models):
            if ours(model):
                weights[i] = plain.state_dict()

    def load_hook(models: list[nn.Module], input_dir: str) -> None:
        if [ours(m) for m in models] != [True]:
            raise RuntimeError("the recipe checkpoints exactly one model")
        models.clear()  # loaded here, not by Accelerate
        load_plain_weights(plain, Path(input_dir) / "model.safetensors")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _flat_hparams(config: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in config.items():
        out[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _band_epsilon(svb: Any) -> float:
    """The SVB band drawn in spectrum plots: the run's epsilon, or the paper's 0.5 without SVB."""
    return svb.epsilon if svb is not None else 0.5


def _solved_extreme(value: float) -> float | None:
    """``SVBStats.sv_min`` / ``sv_max`` for summary.csv: None (an empty cell) when the certificate proved
    every layer in band, so no solver computed singular values."""
    return None if math.isnan(value) else value


def _describe_svb(stats: Any) -> str:
    if stats is None:
        return ""
    text = f"{stats.certified}/{stats.layers} layers certified in band"
    if stats.certified < stats.layers:
        text += f", sv {stats.sv_min:.3f}..{stats.sv_max:.3f} in the others"
    text += f", {stats.clipped} clipped"
    if stats.bn_layers:
        text += f", {stats.bn_clipped} BN scales bounded"
    return text


def make_accelerator(
    *,
    cpu: bool = False,
    mixed_precision: str | None = None,
    grad_accum_steps: int = 1,
    seed: int = 42,
    compile: str | None = None,
    log_with: list[str] | None = None,
    project_dir: Path | None = None,
) -> Accelerator:
    """The recipe's Accelerator: the loaders yield global batches (``split_batches``) shuffled by a seeded
    sampler (the same order on every process and after a resume), gradient accumulation is driven by
    :func:`engine.train_one_epoch` (``sync_with_dataloader=False``), which also steps the scheduler after
    every optimizer step. ``compile`` is a torch.compile backend (``inductor``) or None."""
    return Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=grad_accum_steps, sync_with_dataloader=False
        ),
        dataloader_config=DataLoaderConfiguration(
            split_batches=True, use_seedable_sampler=True, data_seed=seed, non_blocking=True
        ),
        step_scheduler_with_optimizer=False,
        dynamo_plugin=TorchDynamoPlugin(backend=compile) if compile else None,
        log_with=log_with or None,
        project_dir=None if project_dir is None else str(project_dir),
    )
