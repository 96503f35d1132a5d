"""The model card (``README.md``) of a published SVB/BBN model: metadata with ``model-index`` eval results,
the SVB settings, the training recipe, how to load and fine-tune, and the paper's citation."""

from __future__ import annotations

import json
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

PAPER_URL = "https://arxiv.org/abs/1611.06013"
CITATION = """@inproceedings{jia2017improving,
  title     = {Improving Training of Deep Neural Networks via Singular Value Bounding},
  author    = {Jia, Kui and Tao, Dacheng and Gao, Shenghua and Xu, Xiangmin},
  booktitle = {Proceedings of the IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2017},
  eprint    = {1611.06013},
  archivePrefix = {arXiv}
}"""

# (error key in the run record, k): the model-index reports the Hub metric "accuracy" (higher is better),
# top-k accuracy = 100 - top-k error, in percent
_TOPK = (("top1_err", 1), ("top5_err", 5))


# What a local copy known to the project is, by folder name: how every result from it must be labelled.
DATA_LABELS = {
    "cifar10-jpeg": "CIFAR-10 (JPEG q75 copy): CIFAR-10's 60,000 images, labels and split, stored as JPEG "
    "quality 75, so not bit-identical to CIFAR-10; errors are not comparable with published CIFAR-10 figures",
}


def _eval_results(dataset: dict[str, Any], metrics: dict[str, Any]) -> list[EvalResult]:
    """``model-index`` entries: top-1 / top-5 accuracy (percent) on the run's test split (the data as given:
    a local folder, not the Hub id it was given as; a known copy by its label, :data:`DATA_LABELS`)."""
    local = PureWindowsPath(str(dataset.get("data_dir") or "")).name
    return [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=local or dataset["name"],
            dataset_name=data_label(dataset),
            dataset_split=dataset.get("test_split") or None,
            metric_type="accuracy",
            metric_name=f"Top-{k} accuracy (%)",
            metric_args={"top_k": k},
            metric_value=round(100.0 - float(metrics[key]), 4),
        )
        for key, k in _TOPK
        if metrics.get(key) is not None
    ]


def _portable(value: Any) -> Any:
    """``value`` without machine-local paths: an absolute path becomes its last component."""
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_portable(v) for v in value]
    if isinstance(value, str) and (
        PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute()
    ):
        return f"<local>/{PureWindowsPath(value).name}"
    return value


def data_source(dataset: dict[str, Any]) -> str:
    """The data a run read, as given: its local folder (``--data-dir``; an absolute path shortened), else
    the ``--dataset`` name (a Hub id, ``sklearn-digits``)."""
    return _portable(dataset.get("data_dir") or dataset["name"])


def data_label(dataset: dict[str, Any]) -> str:
    """How results on a run's data (``run.json``'s ``dataset``) are labelled: a known copy by its name in
    :data:`DATA_LABELS` (``CIFAR-10 (JPEG q75 copy)``), any other data as given (:func:`data_source`)."""
    label = DATA_LABELS.get(PureWindowsPath(str(dataset.get("data_dir") or "")).name, "")
    return label.split(":")[0] or data_source(dataset)


def _data_description(dataset: dict[str, Any], train_subset: int | None = None) -> str:
    """``source`` and, for a local folder, the name it was given as and what it is (:data:`DATA_LABELS`);
    the training images used when the run took a subset."""
    source = data_source(dataset)
    if dataset.get("data_dir") and dataset["name"] != dataset["data_dir"]:
        text = f"`{source}` (a local folder, given as `{_portable(dataset['name'])}`)"
    else:
        text = f"`{source}`" + (" (a local folder)" if dataset.get("data_dir") else "")
    label = DATA_LABELS.get(PureWindowsPath(str(dataset.get("data_dir") or "")).name)
    if label:
        text += f", that is {label}"
    if train_subset:
        text += f"; trained on the first {train_subset} images of its training split (`--train-subset`)"
    return text


def _what_it_did(facts: dict[str, Any], allowed_mismatch: str | None) -> str:
    """The run's schedule and SVB applications, as recorded, and a stated override of the tag's claim."""
    config, config_epochs = facts.get("config"), facts.get("config_epochs")
    of_config = f" (recipe config `{_portable(config)}`" if config else ""
    if config:
        of_config += f": {config_epochs} epochs)" if config_epochs is not None else ")"
    applied = facts.get("svb_applied_total")
    svb = "" if applied is None else f" SVB/BBN applied {applied} times (`svb_applied_total`)."
    text = (
        f"Trained {facts.get('completed_epochs', '?')} epochs of the run's {facts.get('epochs', '?')}"
        f"{of_config}.{svb}\n"
    )
    if allowed_mismatch:
        text += f"\n**Recorded with a stated override** (`--allow-mismatch`): {allowed_mismatch}.\n"
    return text


def base_model(run: dict[str, Any]) -> str | None:
    """The Hub repo a fine-tuned run started from (``--pretrained`` with Hub weights), None otherwise."""
    hub_id = (run.get("pretrained_cfg") or {}).get("hf_hub_id")
    if not (run.get("recipe") or {}).get("pretrained") or not hub_id:
        return None
    return hub_id.split("@")[0]


def _json_block(obj: Any) -> str:
    """A fenced JSON code block."""
    return "```json\n" + json.dumps(obj, indent=2, sort_keys=True) + "\n```"


def _svb_section(svb_config: dict[str, Any] | None, svb_override: str | None, applied: int | None) -> str:
    """What SVB/BBN settings trained these weights (or that they were trained without SVB, and why)."""
    why = f" Recorded under an SVB model's name on purpose: {svb_override}\n" if svb_override else ""
    if svb_config and applied == 0:
        return (
            "SVB/BBN was configured (`svb_config` in `config.json`) but its schedule applied it **0 times**: "
            "these weights were trained by plain SGD.\n" + why
        )
    if not svb_config:
        return (
            "These weights were trained **without** SVB/BBN (plain SGD, like the paper's baselines).\n" + why
        )
    what = "Singular Value Bounding (SVB)"
    if svb_config.get("bbn_epsilon") is not None:
        what += " and Bounded Batch Normalization (BBN)"
    return (
        f"Trained with {what} ([Jia et al., CVPR 2017]({PAPER_URL})), with these settings "
        "(`svb_config` in `config.json`):\n\n" + _json_block(svb_config) + "\n"
    )


def weights_description(weights: str, run: dict[str, Any]) -> str:
    """Which of a run's weights are published (``best``, ``final``, ``best_ema``, ``final_ema``), in words."""
    final = weights.startswith("final")
    when = "after the last epoch" if final else "of the epoch with the lowest top-1 test error"
    if not weights.endswith("_ema"):
        return f"the trained weights {when}"
    recipe = run.get("recipe") or {}
    decay = recipe.get("model_ema_decay")
    bounded = ", bounded by SVB whenever the model was" if run.get("svb_config") else ""
    return (
        f"the exponential moving average of the weights (timm's ModelEmaV3, `--model-ema`"
        f"{f', decay {decay:g}' if decay is not None else ''}{bounded}) {when}"
    )


def _results_table(dataset: dict[str, Any], metrics: dict[str, Any], checked: dict[str, Any] | None) -> str:
    """Markdown table of the run's recorded errors and, if done, the re-evaluation of the published file."""
    split, name = dataset.get("test_split") or "-", data_source(dataset)
    rows = [
        "Errors, lower is better (the model-index above reports accuracy = 100 - error).\n",
        "| data set | split | top-1 error (%) | top-5 error (%) | source |",
        "|---|---|---|---|---|",
        f"| {name} | {split} | {metrics['top1_err']:.2f} "
        f"| {metrics['top5_err']:.2f} | training run, `{metrics.get('weights', 'best')}` weights "
        f"(epoch {metrics.get('epoch', '?')}) |",
    ]
    if checked:
        rows.append(
            f"| {name} | {split} | {checked['top1_err']:.2f} "
            f"| {checked['top5_err']:.2f} | re-evaluation of this repository's `model.safetensors` |"
        )
    else:
        rows.append("\nThe published file was not re-evaluated before publishing (test data not reachable).")
    return "\n".join(rows) + "\n"


def _usage(repo_id: str, record_name: str | None, num_classes: int, shipped: bool = False) -> str:
    """How to load, predict with and fine-tune the published weights."""
    zoo = ""
    if record_name and shipped:
        zoo = (
            f"\nThese weights ship inside the `timm-svb` package as `{record_name}` (recorded with their "
            "sha256, checked on every load): they load by name with no download, and from the Hub once this "
            "folder is pushed there:\n\n"
            "```python\nimport timm\nimport timm_svb  # registers the SVB/BBN models\n\n"
            f"model = timm.create_model('{record_name}', pretrained=True).eval()\n```\n"
        )
    elif record_name:
        zoo = (
            f"\nThese weights are recorded for the timm-svb model zoo as `{record_name}`. From the first "
            f"`timm-svb` release that ships the record (`'{record_name}' in timm.list_pretrained()`), they "
            "load by name, pinned to the published revision and checked against their sha256:\n\n"
            "```python\nimport timm\nimport timm_svb  # registers the SVB/BBN models\n\n"
            f"model = timm.create_model('{record_name}', pretrained=True).eval()\n```\n"
        )
    return (
        "```python\nimport timm\nimport timm_svb  # registers the SVB/BBN architectures with timm\n\n"
        f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()\n"
        "data_config = timm.data.resolve_model_data_config(model)\n"
        "transform = timm.data.create_transform(**data_config, is_training=False)\n"
        "logits = model(transform(image).unsqueeze(0))  # image: a PIL image\n```\n"
        + zoo
        + "\n### Fine-tuning\n\n"
        "Pass another `num_classes`: timm loads every weight but the classifier, which is freshly "
        "initialised for the new classes.\n\n"
        "```python\n"
        f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True, num_classes=5)\n"
        "```\n\n"
        f"This checkpoint has {num_classes} classes. To keep training with SVB/BBN, attach the plugin "
        "(`timm_svb.SVB`) to the optimizer as in the repository's training recipe (`--pretrained`).\n"
    )


def _fine_tuned(run: dict[str, Any]) -> str:
    """Where a fine-tuned run started from (empty for a run from scratch)."""
    recipe = run.get("recipe") or {}
    if base_model(run):
        return f"Fine-tuned from [`{base_model(run)}`](https://huggingface.co/{base_model(run)}).\n\n"
    if recipe.get("initial_checkpoint"):
        return "Fine-tuned from a local checkpoint (`--initial-checkpoint`), not on the Hub.\n\n"
    return ""


def build_model_card(
    *,
    repo_id: str,
    run: dict[str, Any],
    metrics: dict[str, Any],
    checked: dict[str, Any] | None,
    record_name: str | None,
    num_params: int,
    spectrum_png: str | None = None,
    svb_override: str | None = None,
    facts: dict[str, Any] | None = None,
    allowed_mismatch: str | None = None,
    shipped: bool = False,
) -> ModelCard:
    """The model card of a published run.

    Args:
        repo_id: Hub repository ``ORG/NAME``.
        run: The run's ``run.json``.
        metrics: The run's recorded metrics of the published weights (``top1_err``, ``top5_err`` in percent,
            ``epoch``, ``weights``).
        checked: Metrics of the re-evaluation of the published file, None if not re-evaluated.
        record_name: ``model.tag`` under which the zoo lists these weights, None if not recorded.
        num_params: Number of parameters of the model.
        spectrum_png: File name (in the repository) of the singular-value spectrum plot, if any.
        svb_override: Why an SVB model's name holds weights trained without SVB, if it does.
        facts: What the run did (``hub/publish.py``'s ``run_facts``: epochs completed, the run's and its
            config's epochs, ``svb_applied_total``), stated on the card.
        allowed_mismatch: Why the weights are recorded under a tag whose data or schedule the run does not
            meet, and how it differs (``--allow-mismatch``), if they are.
        shipped: The weights ship inside the package (``hub/publish.py --in-package``), not yet on the Hub.
    """
    facts = facts or {}
    dataset, train_subset = run["dataset"], (run.get("recipe") or {}).get("train_subset")
    card_data = ModelCardData(
        library_name="timm",
        license="apache-2.0",
        pipeline_tag="image-classification",
        tags=["image-classification", "timm", "timm-svb", "singular-value-bounding", "safetensors"],
        model_name=repo_id.split("/")[-1],
        eval_results=_eval_results(dataset, metrics),
        metrics=["accuracy"],
        base_model=base_model(run),
    )
    if "/" in dataset["name"] and not dataset.get("data_dir"):  # read from the Hub
        card_data.datasets = [dataset["name"]]
    spectrum = ""
    if spectrum_png:
        spectrum = (
            f"\n## Singular-value spectrum\n\n![Singular values of every weight layer]({spectrum_png})\n"
        )
    body = (
        f"# {repo_id.split('/')[-1]}\n\n"
        f"`{run['model']}` image classifier ({num_params / 1e6:.2f} M parameters, "
        f"{run['num_classes']} classes) "
        f"trained on {_data_description(dataset, train_subset)} with the `timm-svb` recipe. "
        "`model.safetensors` holds "
        f"{weights_description(metrics.get('weights', 'best'), run)}.\n\n"
        + _what_it_did(facts, allowed_mismatch)
        + "\n"
        "## Results\n\n"
        + _results_table(dataset, metrics, checked)
        + "\n## SVB / BBN\n\n"
        + _svb_section(run.get("svb_config"), svb_override, facts.get("svb_applied_total"))
        + "\n## Usage\n\n"
        + _usage(repo_id, record_name, run["num_classes"], shipped)
        + spectrum
        + "\n## Training recipe\n\n"
        + _fine_tuned(run)
        + f"Model kwargs: `{json.dumps(run.get('model_kwargs', {}), sort_keys=True)}`, "
        f"timm-svb {run.get('timm_svb_version', '?')}. Full recipe config (local paths shortened):\n\n"
        + _json_block(_portable(run.get("recipe", {})))
        + "\n\n## Citation\n\n```bibtex\n"
        + CITATION
        + "\n```\n"
    )
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")
