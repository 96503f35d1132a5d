#!/usr/bin/env python3
"""Run a study (every arm x seed of a family of configs) resumably and report it; see
``python recipes/study.py --help`` and :mod:`timm_svb.recipe.study`.

    python recipes/study.py cpu_table1_preact_resnet20 --data-dir ../shared/data/cifar10-jpeg --seeds 0 1
"""

import sys

from timm_svb.recipe.study import main

if __name__ == "__main__":
    sys.exit(main())
