#!/usr/bin/env python3
"""Evaluate a run folder, a weights file or a zoo model on a test split (timm's ``validate.py`` for
timm-svb); ``python recipes/validate.py --help`` lists the options, :mod:`timm_svb.recipe.validate` has
the work.

    python recipes/validate.py runs/X                                # a run folder: its best weights
    python recipes/validate.py --model wrn28_10_svb.cifar10 --pretrained --dataset uoft-cs/cifar10
"""

from timm_svb.recipe.validate import main

if __name__ == "__main__":
    main()
