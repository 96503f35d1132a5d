"""The paper's training recipe, behind the command lines in ``recipes/`` (as ``timm.data``, ``timm.optim``
and ``timm.scheduler`` are behind timm's ``train.py``). Imported on demand, never by ``import timm_svb``.

- :mod:`~timm_svb.recipe.options`: the command line and its YAML configs (``configs/``);
- :mod:`~timm_svb.recipe.data`, :mod:`~timm_svb.recipe.memory_data`: data sets, transforms, loaders;
- :mod:`~timm_svb.recipe.loop`: the training epoch, evaluation, schedules, EMA;
- :mod:`~timm_svb.recipe.rundir`: the run folder's files;
- :mod:`~timm_svb.recipe.checkpoint`: checkpoints, resuming, loading weights into a model;
- :mod:`~timm_svb.recipe.reporting`: logs, ``run.json``, ``summary.csv``, trackers;
- :mod:`~timm_svb.recipe.trainer`: the run, stage by stage (``main``, ``fit``);
- :mod:`~timm_svb.recipe.validate`: evaluation of a run, a weights file or a zoo model;
- :mod:`~timm_svb.recipe.study`: every arm and seed of a study, and its report.
"""
