#!/usr/bin/env python3
"""Train a timm model with Singular Value Bounding (SVB) and Bounded Batch Normalization (BBN) via Accelerate.

    python recipes/train.py                                   # the embedded default: digits, CPU, minutes
    python recipes/train.py -c table2_wrn28_10_cifar10_svb_bbn --data-dir /data/cifar10
    accelerate launch --multi_gpu --num_processes 8 recipes/train.py -c table4_inception_resnet_v2_svb
    python recipes/train.py --output runs/X --resume          # continue from the latest good checkpoint

``python recipes/train.py --help`` lists every option; a YAML ``--config`` sets defaults that the command line
overrides. The run folder (``--output``) holds ``run.json``, ``model_best.safetensors``,
``model_final.safetensors`` (and ``model_{best,final}_ema.safetensors`` with ``--model-ema``),
``summary.csv``, ``curves.png`` and ``checkpoints/``; ``recipes/validate.py`` evaluates it,
``hub/publish.py`` publishes it.

``--eval-only`` trains nothing: it evaluates the model the options build on the test split, as
``recipes/validate.py`` does.

This file is a thin CLI: the work is in ``options`` (arguments), ``data`` (data sets, transforms, the test
loader of a run), ``engine`` (training epoch, evaluation, schedules, EMA), ``rundir`` (run folder,
checkpoints), ``trainer`` (the run, stage by stage) and ``validate`` (evaluation). With ``recipes/`` on
``sys.path``, ``import train`` gives :func:`evaluate` and :func:`build_test_loader` too.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

from data import DataError, build_test_loader, digits_dataset  # noqa: E402
from engine import evaluate  # noqa: E402
from options import parse_args  # noqa: E402
from trainer import TrainResult, fit  # noqa: E402

__all__ = ["build_test_loader", "digits_dataset", "eval_only", "evaluate", "main", "run_in_process"]


def main(argv: list[str] | None = None) -> TrainResult | dict[str, Any]:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and train (or, with ``--eval-only``, evaluate)."""
    args = parse_args(argv)
    return eval_only(args) if args.eval_only else fit(args)


def eval_only(args: Any) -> dict[str, Any]:
    """``--eval-only``: ``recipes/validate.py`` with this command's model (``--model``, ``--pretrained``,
    ``--initial-checkpoint`` loaded strictly, ``--num-classes``, ``--model-kwargs``), data and preprocessing
    options; the results go to ``--output``/validate.json when ``--output`` is given."""
    import validate  # noqa: PLC0415

    options = validate.build_parser().parse_args([])
    options.__dict__.update(
        model=args.model,
        pretrained=args.pretrained,
        checkpoint=args.initial_checkpoint,
        num_classes=args.num_classes,
        model_kwargs=args.model_kwargs,
        dataset=args.dataset,
        data_dir=args.data_dir,
        split=args.val_split,
        image_column=args.image_column,
        label_column=args.label_column,
        input_size=args.input_size,
        mean=args.mean,
        std=args.std,
        crop_pct=args.crop_pct,
        interpolation=args.interpolation,
        batch_size=args.validation_batch_size or args.batch_size,
        workers=args.workers,
        cpu=args.cpu,
        channels_last=args.channels_last,
        mixed_precision=args.mixed_precision,
        results_file=Path(args.output) / "validate.json" if args.output else None,
    )
    if args.output:
        Path(args.output).mkdir(parents=True, exist_ok=True)
    return validate.validate(options)


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


if __name__ == "__main__":
    try:
        main()
    except DataError as e:  # its message says what to do: one line, without the tracebacks behind it
        raise SystemExit(f"error: {e}") from None
