"""The training command lines (``python -m recipes.train``, ``recipes.validate``, ``recipes.study`` from a
checkout); their work is in :mod:`timm_svb.recipe`. Not installed: only ``timm_svb`` is."""
