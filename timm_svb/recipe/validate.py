#!/usr/bin/env python3
"""Evaluate a model on the test split of an image-classification data set: top-1 / top-5 error (percent) and
cross-entropy, printed and written as JSON (timm's ``validate.py`` for this repository's runs and models).

    python recipes/validate.py runs/X                                # a run folder: its best weights
    python recipes/validate.py runs/X --weights final_ema            # ... or another of its weights files
    python recipes/validate.py runs/X/model_final.safetensors        # a weights file in a run folder
    python recipes/validate.py --model convnet20_svb --checkpoint W.safetensors --dataset sklearn-digits
    python recipes/validate.py --model wrn28_10_svb.cifar10 --pretrained --dataset uoft-cs/cifar10
    python recipes/validate.py --model hf-hub:timm-svb/wrn28_10_svb.cifar10 --data-dir cifar10
    python recipes/validate.py --model local-dir:runs/digits-hub --dataset sklearn-digits

A run folder is evaluated as its run tested every epoch: the run's model kwargs and weights, its data set and
test split, its preprocessing (``run.json``'s ``pretrained_cfg``), test batch, memory format and precision;
on the same machine the errors equal the ones recorded in ``run.json`` (printed beside them). Any other model
is evaluated with its own preprocessing (timm's ``resolve_data_config``, ``--input-size`` & co. override it)
on ``--dataset`` (``--data-dir``, ``--split`` as in ``recipes/train.py``). ``hub/publish.py`` re-evaluates
the model zoo users get with :func:`evaluate_run_model`; ``python recipes/train.py --eval-only`` runs
:func:`validate` with the training command's model and data options.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

import timm_svb  # noqa: F401  (registers the zoo)

from .checkpoint import load_weights
from .data import (
    DIGITS,
    DataError,
    TorchImageDataset,
    build_test_loader,
    build_transforms,
    load_image_dataset,
    loader_kwargs,
    model_data_config,
)
from .loop import evaluate
from .options import ParseKwargs
from .rundir import WEIGHTS, atomic_write_text, jsonable

__all__ = ["build_parser", "eval_only", "evaluate_run_model", "main", "validate"]

_logger = logging.getLogger(__name__)


def _device(cpu: bool = False) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")


def _evaluate_on(
    device: torch.device, model: nn.Module, loader: Any, channels_last: bool, mixed_precision: str | None
) -> dict[str, float]:
    """:func:`.loop.evaluate` (the recipe's one evaluation, also of every training epoch) of ``model`` on
    ``device`` in the memory format and precision given."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return evaluate(model.to(device), loader, channels_last=channels_last, mixed_precision=mixed_precision)


# -------------------------------------------------------------------------------------------- run folders


def _run_weights(source: Path, weights: str) -> tuple[Path, dict[str, Any], str]:
    """A run folder or one of its ``model_*.safetensors`` to (weights file, run.json, which weights)."""
    if source.is_file():
        run_dir = source.parent
        name = source.stem.removeprefix("model_")
        weights = name if name in WEIGHTS else source.name
    else:
        run_dir, source = source, source / f"model_{weights}.safetensors"
    record = run_dir / "run.json"
    if not record.is_file():
        raise SystemExit(
            f"{record} not found: RUN is a run folder of recipes/train.py or a weights file in one; "
            "for other weights use --model NAME --checkpoint FILE"
        )
    if not source.is_file():
        kept = sorted(p.name for p in run_dir.glob("model_*.safetensors"))
        raise SystemExit(
            f"{source} not found (the run holds {kept or 'no weights yet'}; --weights picks one)"
        )
    return source, json.loads(record.read_text(encoding="utf-8")), weights


def evaluate_run_model(
    model: nn.Module,
    run: dict[str, Any],
    *,
    data_dir: str | Path | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on a run's test split as the run tested: its data set (``data_dir``: a local copy),
    preprocessing, test batch, memory format and precision (from ``run.json``). Raises ``DataError`` when the
    data is not reachable or differs from the run's."""
    recipe = run.get("recipe") or {}
    device = device or _device()
    batch = batch_size or recipe.get("validation_batch_size") or recipe.get("batch_size") or 128
    workers = workers if workers is not None else (4 if device.type == "cuda" else 0)
    loader = build_test_loader(run, batch_size=batch, workers=workers, data_dir=data_dir)
    try:
        metrics = _evaluate_on(
            device, model, loader, bool(recipe.get("channels_last")), recipe.get("mixed_precision")
        )
    finally:
        model.to("cpu")
    dataset = run["dataset"]
    return {**metrics, "dataset": dataset["name"], "split": dataset.get("test_split")}


# -------------------------------------------------------------------------------------------- any model


def _build_model(args: argparse.Namespace, num_classes: int | None) -> nn.Module:
    """``--model`` (``hf-hub:`` / ``local-dir:`` ids load their weights), then ``--checkpoint``."""
    pretrained = args.pretrained or args.model.startswith(("hf-hub:", "local-dir:"))
    kwargs = dict(args.model_kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if args.input_size is not None and args.input_size[0] != 3:
        kwargs["in_chans"] = args.input_size[0]
    if args.pretrained and args.checkpoint:
        raise SystemExit("--pretrained and --checkpoint both give weights: pass one of them")
    model = timm.create_model(args.model, pretrained=pretrained, **kwargs)
    if args.checkpoint:
        load_weights(model, args.checkpoint, name=args.model)
    elif not pretrained:
        raise SystemExit(f"{args.model}: no weights to evaluate (--pretrained, --checkpoint FILE)")
    return model.eval()


def _evaluate_model(args: argparse.Namespace) -> dict[str, Any]:
    data = load_image_dataset(
        args.dataset,
        args.data_dir,
        val_split=args.split,
        image_column=args.image_column,
        label_column=args.label_column,
        need_train=False,
    )
    # a checkpoint is a fine-tuned head, as recipes/train.py sets it: the data set's classes by default
    num_classes = args.num_classes or (data.num_classes if args.checkpoint else None)
    model = _build_model(args, num_classes)
    if model.num_classes < data.num_classes:
        raise SystemExit(
            f"{args.model} has {model.num_classes} outputs, the data set {data.num_classes} classes "
            "(--num-classes?)"
        )
    data_config = model_data_config(model, args)
    mode = "L" if data_config["input_size"][0] == 1 else "RGB"
    dataset = TorchImageDataset(
        data.test, data.image_column, data.label_column, build_transforms(data_config, False), mode
    )
    device = _device(args.cpu)
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    loader = DataLoader(
        dataset, batch_size=args.batch_size, shuffle=False, **loader_kwargs(workers, device.type == "cuda")
    )
    channels_last = args.channels_last if args.channels_last is not None else device.type == "cpu"
    metrics = _evaluate_on(device, model, loader, channels_last, args.mixed_precision)
    return {
        **metrics,
        "dataset": data.name,
        "split": data.test_split,
        "weights": args.checkpoint or ("pretrained" if args.pretrained else args.model),
        "data_config": data_config,
    }


# ------------------------------------------------------------------------------------------------ the CLI


def build_parser() -> argparse.ArgumentParser:
    """Command line of ``recipes/validate.py`` (timm's ``validate.py`` names where they exist)."""
    parser = argparse.ArgumentParser(
        prog="recipes/validate.py",
        description=(
            "Top-1 / top-5 error of a model on a test split, printed and written as JSON: a run folder of "
            "recipes/train.py (as the run tested it), a weights file in one, or --model (a timm name with "
            "--pretrained or --checkpoint, an hf-hub: or local-dir: id) on --dataset with the model's own "
            "preprocessing."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "run", nargs="?", type=Path, metavar="RUN", help="a run folder, or a model_*.safetensors in one"
    )
    parser.add_argument(
        "--weights",
        default="best",
        choices=(*WEIGHTS, "ema"),
        help="RUN's weights: model_WEIGHTS.safetensors (ema = best_ema, the EMA's best epoch)",
    )
    group = parser.add_argument_group("Model (without RUN)")
    group.add_argument("--model", default=None, help="timm name, hf-hub:ORG/NAME or local-dir:PATH")
    group.add_argument("--pretrained", action="store_true", help="the model's pretrained weights")
    group.add_argument("--checkpoint", default=None, metavar="PATH", help="weights file (strict load)")
    group.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classifier outputs (default: the model's; with --checkpoint, the data set's classes)",
    )
    group.add_argument(
        "--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE", help="create_model"
    )
    group = parser.add_argument_group("Data (without RUN; with RUN, --data-dir is a local copy of its set)")
    group.add_argument("--dataset", default=DIGITS, help="as recipes/train.py --dataset")
    group.add_argument("--data-dir", default=None, metavar="DIR", help="local copy of the data set")
    group.add_argument("--split", default=None, help="test split (default: test, validation, valid, val)")
    group.add_argument("--image-column", default=None, help="image column (default: detected)")
    group.add_argument("--label-column", default=None, help="label column (default: detected)")
    group.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"))
    group.add_argument("--mean", type=float, nargs="+", default=None, help="normalisation mean")
    group.add_argument("--std", type=float, nargs="+", default=None, help="normalisation std")
    group.add_argument("--crop-pct", type=float, default=None, help="center crop fraction")
    group.add_argument("--interpolation", default=None, help="resize interpolation")
    group = parser.add_argument_group("Evaluation")
    group.add_argument(
        "-b", "--batch-size", type=int, default=None, help="test batch (default: RUN's, else 128)"
    )
    group.add_argument("-j", "--workers", type=int, default=None, help="loader processes (default: 0 on CPU)")
    group.add_argument("--cpu", action="store_true", help="evaluate on the CPU even with a GPU")
    group.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last (default: RUN's; else on for the CPU)",
    )
    group.add_argument(
        "--mixed-precision", default=None, choices=("no", "fp16", "bf16"), help="autocast (default: RUN's)"
    )
    group.add_argument(
        "--results-file", type=Path, default=None, metavar="JSON", help="write the results here"
    )
    return parser


def validate(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate what ``args`` names (see :func:`build_parser`); print the errors and the results as JSON,
    write them to ``args.results_file`` when given; returns them."""
    if args.run is not None:
        if args.model or args.checkpoint or args.pretrained:
            raise SystemExit("RUN names the model and weights: drop --model / --checkpoint / --pretrained")
        weights = "best_ema" if args.weights == "ema" else args.weights
        path, run, weights = _run_weights(args.run, weights)
        model = timm.create_model(run["model"], **run["model_kwargs"])
        load_weights(model, path, name=run["model"])
        run = {**run, "recipe": {**run.get("recipe", {})}}
        if args.channels_last is not None:
            run["recipe"]["channels_last"] = args.channels_last
        if args.mixed_precision is not None:
            run["recipe"]["mixed_precision"] = args.mixed_precision
        try:
            results = evaluate_run_model(
                model.eval(),
                run,
                data_dir=args.data_dir,
                batch_size=args.batch_size,
                workers=args.workers,
                device=_device(args.cpu),
            )
        except DataError as e:
            raise SystemExit(f"{e} (a local copy: --data-dir DIR)") from e
        recorded = (run.get("metrics") or {}).get(weights)
        results.update(model=run["model"], weights=str(path), recorded=recorded)
    elif args.model:
        args.batch_size = args.batch_size or 128
        try:
            results = _evaluate_model(args)
        except DataError as e:
            raise SystemExit(str(e)) from e
        results["model"] = args.model
    else:
        raise SystemExit("nothing to evaluate: give a run folder (RUN) or --model NAME (see --help)")
    _report(results)
    if args.results_file is not None:
        atomic_write_text(args.results_file, json.dumps(jsonable(results), indent=2) + "\n")
    return results


# validate's options that recipes/train.py names otherwise; every other one has the same name in both
TRAIN_NAMES = {"checkpoint": "initial_checkpoint", "split": "val_split"}


def eval_only(args: argparse.Namespace) -> dict[str, Any]:
    """``--eval-only``: :func:`validate` with the training command's model (``--model``, ``--pretrained``,
    ``--initial-checkpoint`` loaded strictly, ``--num-classes``, ``--model-kwargs``), data and preprocessing
    options; the results go to ``--output``/validate.json when ``--output`` is given."""
    options = build_parser().parse_args([])
    for name in vars(options).keys() - {"run", "weights", "batch_size", "results_file"}:
        setattr(options, name, getattr(args, TRAIN_NAMES.get(name, name)))
    options.batch_size = args.validation_batch_size or args.batch_size
    if args.output:
        Path(args.output).mkdir(parents=True, exist_ok=True)
        options.results_file = Path(args.output) / "validate.json"
    return validate(options)


def _report(results: dict[str, Any]) -> None:
    text = (
        f"{results['model']} ({results['weights']}) on {results['dataset']} [{results['split']}], "
        f"{results['num_images']} images: top-1 error {results['top1_err']:.2f}%, top-5 error "
        f"{results['top5_err']:.2f}%"
    )
    recorded = results.get("recorded")
    if recorded:
        same = all(recorded[k] == results[k] for k in ("top1_err", "top5_err"))
        text += (
            f" (the run recorded {recorded['top1_err']:.2f}% / {recorded['top5_err']:.2f}% at epoch "
            f"{recorded['epoch']}{'' if same else ': differs'})"
        )
    print(text)
    print(json.dumps(jsonable(results), indent=2))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and evaluate."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    return validate(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
