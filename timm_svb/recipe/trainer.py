"""The recipe's run, in stages that :func:`fit` calls top to bottom (as Accelerate's complete_cv_example.py):

1. :func:`setup_run`: the processes, the ``Accelerator``, the run folder, what a resumed run recorded, seeds;
2. :func:`load_data`: the data set and the number of classes;
3. :func:`build_model`: ``timm.create_model``, initial weights, SyncBatchNorm, a frozen backbone, memory
   format;
4. :func:`build_loaders`: the model's preprocessing, the training augmentation, the loaders, mixup and the
   loss;
5. :func:`build_optimizer`: parameter groups, optimizer, learning-rate schedule, the SVB plugin;
6. :func:`prepare`: ``accelerator.prepare``, the model EMA, what a checkpoint holds, resuming
   (:mod:`.checkpoint`);
7. :func:`start_report`: ``run.json``, ``args.yaml`` and the trackers (:mod:`.reporting`);
8. :func:`train_epochs`: every epoch trains, tests the model (and its EMA), records, checkpoints and logs;
9. :func:`finish`: the final weights and plots, the closing lines.

Each stage takes the parsed options and what earlier stages built (small typed objects: :class:`RunSetup`,
:class:`RunData`, :class:`BuiltModel`, :class:`Loaders`, :class:`Optimization`, then :class:`PreparedRun`,
which holds them all), and returns what later ones use; where a setting takes effect is the stage that reads
it. :func:`main` parses the command line and runs :func:`fit` (or, with ``--eval-only``,
:func:`validate.eval_only`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import (
    GradientAccumulationPlugin,
    TorchDynamoPlugin,
    set_seed,
)
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch import nn
from torch.utils.data import DataLoader

import timm_svb
from timm_svb.spectrum import model_spectrum, plot_spectra

from .checkpoint import (
    checkpoint_plain_weights,
    load_weights,
    resume,
    resume_changes,
    rewind,
    run_folder,
    save_checkpoint,
)
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
    decode_splits,
    memory_loader,
    memory_plans,
)
from .options import parse_args, run_of_weights
from .reporting import (
    RUN_NAME_KWARGS,
    RunReport,
    band_epsilon,
    flat_hparams,
    log_epoch,
    log_svb_schedule,
    setup_logging,
    solved_extreme,
    svb_row,
    trackers,
)
from .rundir import (
    RunState,
    atomic_write_text,
    save_weights,
)
from .validate import eval_only

__all__ = ["TrainResult", "cli", "fit", "main", "make_accelerator", "run_in_process"]

_logger = logging.getLogger(__name__)

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


def fit(args: argparse.Namespace) -> TrainResult:
    """Train as ``args`` (from :func:`options.parse_args`) says; see ``recipes/train.py --help``."""
    given = dict(vars(args))  # as parsed, before anything is resolved: recorded, and compared on resume
    check_hub_reachable(args.dataset, args.data_dir)  # offline: refused at once, before the run folder exists
    setup = setup_run(args, given)
    data = load_data(args, setup)
    model = build_model(args, setup, data)
    loaders = build_loaders(args, setup, data, model)
    optim = build_optimizer(args, setup, model, loaders)
    run = prepare(args, setup=setup, data=data, model=model, loaders=loaders, optim=optim)
    report = start_report(args, given, run)
    train_epochs(args, run, report)
    return finish(args, run, report)


# ------------------------------------------------------------------------------ 1. processes, run folder


@dataclass
class RunSetup:
    """The Accelerator and the run folder; for a resumed run, its checkpoint and record."""

    accelerator: Accelerator
    run_dir: Path
    resume_from: Path | None  # the checkpoint to continue from; None for a new run
    previous: dict[str, Any]  # the resumed run's run.json ({} for a new run)
    changed: dict[str, list[Any]]  # options a resumed run changes: {name: [run's, now]}


def setup_run(args: argparse.Namespace, given: dict[str, Any]) -> RunSetup:
    """Start the processes and the ``Accelerator``, find the run folder (and the checkpoint to resume), seed.

    Settings that can only be refused here (the global batch against the processes, ``--sync-bn`` on CPUs, a
    resumed run's fixed options) are refused before any process waits for another.
    """
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # torchrun / accelerate launch on machines without an accelerator: gloo on the CPU
    cpu = args.cpu or (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available())
    state = PartialState(cpu=cpu)
    setup_logging(state.is_main_process)
    run_dir, resume_from = run_folder(args, state)
    record = run_dir / "run.json"
    previous = json.loads(record.read_text(encoding="utf-8")) if resume_from and record.is_file() else {}
    changed = resume_changes(previous, given, run_dir) if previous else {}
    if resume_from is not None and state.is_main_process:
        rewind(run_dir, resume_from, previous)
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
        log_with=trackers(args.log_with),
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
    :func:`.loop.train_one_epoch` (``sync_with_dataloader=False``), which also steps the scheduler after
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


# ---------------------------------------------------------------------------------------------- 2. data


@dataclass(frozen=True, kw_only=True)
class RunData:
    """The data set and the classifier's outputs (``--num-classes``, by default the data set's classes)."""

    images: ImageData
    num_classes: int


def load_data(args: argparse.Namespace, setup: RunSetup) -> RunData:
    """The data set (its training split streamed with ``--streaming``) and the classifier's outputs."""
    with setup.accelerator.local_main_process_first():  # one download / cache per node
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
    return RunData(images=data, num_classes=num_classes)


# --------------------------------------------------------------------------------------------- 3. model


@dataclass(frozen=True, kw_only=True)
class BuiltModel:
    """The timm model, the kwargs it was created with (``run.json``'s ``model_kwargs``) and a frozen
    backbone's BN layers (kept in eval mode while training)."""

    module: nn.Module
    kwargs: dict[str, Any]
    frozen_bn: list[nn.Module]


def build_model(args: argparse.Namespace, setup: RunSetup, data: RunData) -> BuiltModel:
    """``timm.create_model`` with its kwargs (recorded in ``run.json``), initialised or loaded, SyncBN when
    asked for, the backbone frozen for ``--freeze-backbone``, in the memory format of the run."""
    accelerator = setup.accelerator
    model_kwargs = _model_kwargs(args, data.num_classes)
    with accelerator.local_main_process_first():
        model = timm.create_model(args.model, pretrained=args.pretrained, **model_kwargs)
    if args.init == "orthogonal" and not args.pretrained:
        timm_svb.orthogonal_init_(model)
    if args.initial_checkpoint:
        _load_initial_checkpoint(model, args.initial_checkpoint, args.model)
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
    return BuiltModel(module=model, kwargs=model_kwargs, frozen_bn=frozen_bn)


def _model_kwargs(args: argparse.Namespace, num_classes: int) -> dict[str, Any]:
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


def _is_svb_variant(name: str) -> bool:
    return name.split(".")[0].split(":")[-1].endswith("_svb")


def _load_initial_checkpoint(model: nn.Module, path: str, name: str) -> None:
    """``--initial-checkpoint``: weights for fine-tuning (a classifier of another size is a new one), and a
    log line saying whether the classifier was kept."""
    new = load_weights(model, path, name=name, new_head=True)
    named = run_of_weights(path)
    source = f" ({name}, as {named[0]} names)" if named is not None and named[1]["model"] == name else ""
    if new:
        _logger.info("initial checkpoint %s%s: new classifier (%s)", path, source, ", ".join(new))
    else:
        _logger.info("initial checkpoint %s%s: classifier kept (the same number of classes)", path, source)


def _channels_last(args: argparse.Namespace, accelerator: Accelerator) -> bool:
    """``--channels-last``, by default on for CPU training (oneDNN runs it faster)."""
    return accelerator.device.type == "cpu" if args.channels_last is None else args.channels_last


def _warn_small_bn_batch(args: argparse.Namespace, accelerator: Accelerator, model: nn.Module) -> None:
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


def build_loaders(args: argparse.Namespace, setup: RunSetup, data: RunData, model: BuiltModel) -> Loaders:
    """The model's data config (timm's ``resolve_data_config``, overridden by ``--input-size`` & co.), the
    training augmentation (crop and flip, ``--aa``, ``--reprob``) and the test transform, their loaders
    (``--batch-size`` images per optimizer step in all, ``steps_per_epoch`` full batches an epoch), timm's
    ``Mixup`` and the loss it needs: ``SoftTargetCrossEntropy`` for mixed targets, else
    ``LabelSmoothingCrossEntropy`` (``--smoothing``) or cross-entropy."""
    accelerator, num_classes, data = setup.accelerator, data.num_classes, data.images
    data_config = model_data_config(model.module, args)
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
    plans = memory_plans(args, data, train_tf, test_tf, data_config["input_size"])
    if plans is not None:
        train_split, test_split = decode_splits(args, accelerator, data, mode, plans)
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


def _mixup_and_loss(
    args: argparse.Namespace, accelerator: Accelerator, num_classes: int
) -> tuple[Mixup | None, nn.Module]:
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


def build_optimizer(
    args: argparse.Namespace, setup: RunSetup, built: BuiltModel, loaders: Loaders
) -> Optimization:
    """SGD (the reference) or a timm optimizer over :func:`.loop.param_groups` (weight decay off for BN and
    biases when fine-tuning, the classifier's ``--head-lr-scale``, frozen parameters left out); the per-step
    :class:`.loop.RecipeLR`; SVB as the model's ``svb_config`` and ``--svb-*`` say, on the schedule of
    ``--svb-every`` and the reference's rules, leaving frozen layers alone."""
    model, steps_per_epoch = built.module, loaders.steps_per_epoch
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


def _svb_settings(args: argparse.Namespace, model: nn.Module) -> dict[str, Any] | None:
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


def _make_svb(
    args: argparse.Namespace, model: nn.Module, settings: dict[str, Any], steps_per_epoch: int
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


def _filter_bias_and_bn(args: argparse.Namespace) -> bool:
    """``--filter-bias-and-bn``; by default on when fine-tuning (from ``--pretrained`` weights or an
    ``--initial-checkpoint``)."""
    if args.filter_bias_and_bn is not None:
        return args.filter_bias_and_bn
    return bool(args.pretrained or args.initial_checkpoint)


def _svb_exclude(args: argparse.Namespace, model: nn.Module) -> tuple[str, ...]:
    """What SVB leaves alone: ``--svb-exclude`` and the frozen layers (bounding them would change weights
    that training does not: a frozen backbone must stay as loaded)."""
    return (*(args.svb_exclude or ()), *frozen_layer_names(model))


# ------------------------------------------------------------------------------------ 6. prepare, resume


@dataclass(kw_only=True)
class PreparedRun:
    """Everything the epochs need: the earlier stages' results, the prepared objects and the run's
    progress."""

    setup: RunSetup
    data: RunData
    built: BuiltModel
    optim: Optimization
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
    max_steps_hit: bool = False  # --max-steps stopped the run (train_epochs sets it)
    cut_epoch: bool = False  # ... within an epoch: the last row is of a part of an epoch


def prepare(
    args: argparse.Namespace,
    *,
    setup: RunSetup,
    data: RunData,
    model: BuiltModel,
    loaders: Loaders,
    optim: Optimization,
) -> PreparedRun:
    """``accelerator.prepare`` (device, DDP, compile), the model EMA (of the prepared model, on its device),
    the checkpoint's contents (plain timm weights, the run's progress, SVB's position, the EMA) and, for
    ``--resume``, loading it: the command line's optimizer settings win."""
    accelerator, svb = setup.accelerator, optim.svb
    built, model = model, model.module  # the prepared model replaces the timm one below
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
    checkpoint_plain_weights(accelerator, plain)
    run_state = RunState()
    accelerator.register_for_checkpointing(run_state)
    svb_steps: list[int] = []
    if svb is not None:
        svb.attach(optimizer)
        accelerator.register_for_checkpointing(svb)
        svb_steps = svb_apply_steps(svb, loaders.steps_per_epoch * args.epochs)
        log_svb_schedule(svb, loaders.steps_per_epoch, svb_steps, args.epochs)
    ema = _make_ema(args, plain, svb) if args.model_ema else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    if setup.resume_from is not None:
        resume(setup.accelerator, setup.resume_from, setup.changed, optimizer, run_state, args.epochs)
    return PreparedRun(
        setup=setup,
        data=data,
        built=built,
        optim=optim,
        model=model,
        plain=plain,
        optimizer=optimizer,
        train_loader=train_loader,
        test_loader=test_loader,
        scheduler=scheduler,
        state=run_state,
        run_dir=setup.run_dir,
        steps_per_epoch=loaders.steps_per_epoch,
        start_epoch=run_state.epoch,
        svb_steps=svb_steps,
        ema=ema,
        loaders=loaders,
    )


def _make_ema(args: argparse.Namespace, plain: nn.Module, svb: RecordingSVB | None) -> BoundedEMA:
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


# ---------------------------------------------------------------------------------------- 7. run report


def start_report(args: argparse.Namespace, given: dict[str, Any], run: PreparedRun) -> RunReport:
    """Write ``run.json`` (what ``hub/publish.py`` and ``--resume`` read) and ``args.yaml``; start the
    trackers (``--log-with``)."""
    setup, loaders, optim, model_kwargs = run.setup, run.loaders, run.optim, run.built.kwargs
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
    report = RunReport(
        run.run_dir,
        {
            "model": args.model,
            "model_kwargs": model_kwargs,
            "num_classes": model_kwargs["num_classes"],
            "svb_config": optim.svb_config,
            "dataset": run.data.images.describe(),
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
        report.write("running")
    if trackers(args.log_with):
        run_name = args.run_name or run.run_dir.name
        accelerator.init_trackers(
            args.experiment,
            config=flat_hparams(recipe),
            init_kwargs={tracker: {key: run_name} for tracker, key in RUN_NAME_KWARGS.items()},
        )
    return report


def _weights_of(run: PreparedRun, name: str) -> nn.Module:
    """The model whose weights ``model_NAME.safetensors`` holds: the EMA copy for ``*_ema``."""
    return run.ema.module if name.endswith("_ema") else run.plain


# -------------------------------------------------------------------------------------------- 8. epochs


def train_epochs(args: argparse.Namespace, run: PreparedRun, report: RunReport) -> None:
    """Every epoch (up to ``--epochs``, or ``--stop-after`` in this invocation): train (mixup, loss, the EMA
    updated and SVB applied after optimizer steps), average the BN statistics over the processes, test the
    model and its EMA, record a ``summary.csv`` row, checkpoint, save the best weights, log to the trackers
    and the console."""
    accelerator, svb = run.setup.accelerator, run.optim.svb
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
            eval_modules=run.built.frozen_bn,
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
            row.update(svb_row(svb, applied_before))
        if ema_svb is not None:
            stats = ema_svb.last_stats
            row.update(
                ema_svb_clipped=stats.clipped if stats else None,
                ema_svb_sv_min=solved_extreme(stats.sv_min) if stats else None,
                ema_svb_sv_max=solved_extreme(stats.sv_max) if stats else None,
            )
        new_best = run.state.add_epoch(row)
        if not cut:  # a resumed run starts at an epoch's beginning: a cut epoch is not checkpointed
            save_checkpoint(accelerator, run.run_dir, epoch + 1, args.checkpoint_hist)
        if accelerator.is_main_process:
            for name in new_best:
                save_weights(_weights_of(run, name), run.run_dir / f"model_{name}.safetensors")
        log_epoch(args, accelerator, run.plain, svb, row, epoch)
        if cut:
            run.max_steps_hit = run.cut_epoch = True
            break
        report.write("running")


# -------------------------------------------------------------------------------------------- 9. finish


def finish(args: argparse.Namespace, run: PreparedRun, report: RunReport) -> TrainResult:
    """After the last epoch: ``model_final.safetensors`` (and ``model_final_ema``) and ``spectra.png``; the
    record's final status; the trackers closed; the test error and the run folder printed."""
    accelerator, svb = run.setup.accelerator, run.optim.svb
    state = run.state
    finished = state.epoch >= args.epochs and not run.max_steps_hit
    if accelerator.is_main_process and finished:
        for name in ("final", "final_ema") if run.ema is not None else ("final",):
            save_weights(_weights_of(run, name), run.run_dir / f"model_{name}.safetensors")
        plot_spectra({args.model: model_spectrum(run.plain)}, run.run_dir / "spectra.png", band_epsilon(svb))
    status = "finished" if finished else "stopped_max_steps" if run.max_steps_hit else "stopped"
    report.write(status, completed_epochs=state.epoch - run.cut_epoch)
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
        run=report.run,
        ema=run.ema,
    )
