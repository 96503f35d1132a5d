"""``python -m timm_svb.recipe``: ``recipes/train.py`` without a checkout."""

from .trainer import cli

cli()
