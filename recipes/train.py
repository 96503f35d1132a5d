#!/usr/bin/env python3
"""Train a timm model with Singular Value Bounding (SVB) and Bounded Batch Normalization (BBN) via Accelerate.

    python recipes/train.py                                   # the embedded default: digits, CPU, minutes
    python recipes/train.py -c table2_wrn28_10_cifar10_svb_bbn --data-dir /data/cifar10
    accelerate launch --multi_gpu --num_processes 8 recipes/train.py -c table4_inception_resnet_v2_svb
    python recipes/train.py --output runs/X --resume          # continue from the latest good checkpoint
    python -m recipes.train ...                               # the same, as a module of the checkout

``python recipes/train.py --help`` lists every option; a YAML ``--config`` (a path, or a name in
``timm_svb/recipe/configs/``) sets defaults that the command line overrides. The run folder (``--output``)
holds ``run.json``, ``model_best.safetensors``, ``model_final.safetensors`` (and
``model_{best,final}_ema.safetensors`` with ``--model-ema``), ``summary.csv``, ``curves.png`` and
``checkpoints/``; ``recipes/validate.py`` evaluates it, ``hub/publish.py`` publishes it. ``--eval-only``
trains nothing: it evaluates the model the options build on the test split, as ``recipes/validate.py`` does.

This file is the command line only, as timm's ``train.py`` is over ``timm``: the recipe is
:mod:`timm_svb.recipe` (``trainer``: the run, stage by stage).
"""

from timm_svb.recipe.data import build_test_loader, digits_dataset
from timm_svb.recipe.loop import evaluate
from timm_svb.recipe.trainer import cli, main, run_in_process

__all__ = ["build_test_loader", "digits_dataset", "evaluate", "main", "run_in_process"]

if __name__ == "__main__":
    cli()
