"""Publish a training run's weights as a Hugging Face Hub model repository.

From ``RUN_DIR`` (written by ``recipes/train.py``: ``run.json`` and ``model_{best,final}.safetensors``) it
builds the repository folder with timm's ``save_for_hf`` (``model.safetensors``, ``config.json``) and a model
card (``README.md``), loads the folder back through timm (``local-dir:``) and checks that its outputs equal
the run's model. For a zoo entry ``MODEL.TAG`` it also requires ``timm.create_model(MODEL.TAG)`` with the
folder's weights (what ``pretrained=True`` users get) to give the same outputs, and evaluates that model: the
re-evaluation on the test split, when the data is reachable, must match the run's record within
``--tolerance``; and the run must have done what the tag claims (its data and schedule, see :data:`DATA_TAGS`;
``--allow-mismatch REASON`` states an override), which the card states. Then it either leaves the folder in
``--dry-run OUT_DIR`` or uploads it with ``huggingface_hub`` (one commit holding exactly the checked files)
and records the pinned commit and the sha256 of the weights in the record of published weights (see
:mod:`.record` for where it is written).

    python hub/publish.py RUN_DIR --repo-id timm-svb/MODEL.TAG --dry-run OUT_DIR  # build and check only
    python hub/publish.py RUN_DIR --repo-id timm-svb/MODEL.TAG --require-eval     # ... push, record

``hub/publish.py`` (and ``python -m hub.publish``) is this module's command line in a checkout.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import logging
import math
import os
import re
import shlex
import stat
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePath
from typing import Any

import timm
import torch
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from timm.models import PretrainedCfg, filter_pretrained_cfg, save_for_hf
from torch import nn

import timm_svb  # registers the zoo
from timm_svb.models._pretrained import HUB_ORG

from ..recipe.checkpoint import load_weights
from ..recipe.data import DataError
from ..recipe.options import load_config_file
from ..recipe.validate import evaluate_run_model
from .card import build_model_card, data_source
from .record import (
    WEIGHTS_FILENAME,
    RecordError,
    file_sha256,
    read_record,
    record_entry,
    record_path,
    ship_weights,
    write_record,
)

_logger = logging.getLogger(__name__)

RUN_KEYS = (
    "model",
    "model_kwargs",
    "num_classes",
    "svb_config",
    "dataset",
    "recipe",
    "metrics",
    "pretrained_cfg",
)
SPECTRUM_PNG = "spectrum.png"
# Files a published folder may hold; anything else (a pickle above all) makes the check fail.
ALLOWED_FILES = frozenset({WEIGHTS_FILENAME, "config.json", "README.md", SPECTRUM_PNG})
# Pretrained cfg entries that must agree between the run and the zoo cfg it is recorded under.
_CFG_KEYS = ("num_classes", "input_size", "mean", "std", "interpolation", "crop_pct")
_TAG_ALIASES = {"imagenet": "in1k", "imagenet_1k": "in1k", "imagenet1k": "in1k", "ilsvrc2012": "in1k"}
# What a zoo tag claims, checked against what the run did before it is recorded. A tag is DATA (the full
# schedule of the recipe config the run named, -c) or DATA_eN (N epochs completed). DATA names the data
# sources below: a Hub id (the run read that set from the Hub) or the folder name of a local copy (the run's
# --data-dir). A local copy of a Hub set is another source: record it under a tag of its own, or with
# --allow-mismatch REASON (stated on the card and in the record).
DATA_TAGS: dict[str, tuple[str, ...]] = {
    "cifar10": ("uoft-cs/cifar10",),
    "cifar100": ("uoft-cs/cifar100",),
    "in1k": ("ILSVRC/imagenet-1k",),
    "c10jpeg": ("cifar10-jpeg",),  # a local JPEG (quality 75) copy of CIFAR-10
}
_EPOCHS_TAG = re.compile(r"(?P<data>.+)_e(?P<epochs>[0-9]+)")

# An evaluator re-evaluates a model on a run's test split: {"top1_err", "top5_err"} (percent), or None when
# the test data is not reachable.
Evaluator = Callable[[nn.Module, dict[str, Any]], dict[str, float] | None]


class PublishError(RuntimeError):
    """The folder cannot be published: a failed check or a missing precondition."""


class PushedNotRecordedError(PublishError):
    """The folder was pushed, but its record entry could not be written."""

    def __init__(self, repo_id: str, revision: str, reason: str) -> None:
        self.repo_id, self.revision = repo_id, revision
        super().__init__(
            f"pushed {repo_id} at revision {revision}, but the record was not written: {reason}. Fix that "
            "and re-run the same command: the upload of the unchanged folder makes no new commit and the "
            f"record then pins {revision}"
        )


# ----------------------------------------------------------------------------------------------- the run


def load_run(run_dir: Path) -> dict[str, Any]:
    """Read and validate ``run.json`` of a run folder."""
    path = run_dir / "run.json"
    if not path.is_file():
        raise PublishError(f"{path} not found: RUN_DIR must be a folder written by recipes/train.py")
    run = json.loads(path.read_text(encoding="utf-8"))
    missing = [k for k in RUN_KEYS if k not in run]
    if missing:
        raise PublishError(f"{path} lacks {missing}")
    return run


def load_run_model(run: dict[str, Any], weights: Path) -> nn.Module:
    """``timm.create_model(run["model"], **run["model_kwargs"])`` with the run's weights (strict), in eval."""
    if weights.suffix != ".safetensors" or not weights.is_file():
        raise PublishError(f"{weights}: no safetensors file (only safetensors are loaded)")
    model = timm.create_model(run["model"], **run["model_kwargs"])
    try:
        load_weights(model, weights, name=run["model"])
    except SystemExit as e:  # the recipe's loader says what does not fit; here it is the publisher's refusal
        raise PublishError(str(e)) from None
    if model.num_classes != run["num_classes"]:
        raise PublishError(f"model has {model.num_classes} classes, run.json says {run['num_classes']}")
    return model.eval()


def run_facts(run: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """What the run did, as the card states it and the tag's claim is checked against: the data source as
    given (``--data-dir``, else ``--dataset``), epochs completed, the run's and its recipe config's epochs,
    and SVB's applications (``svb_applied_total``; None without SVB or when not recorded)."""
    dataset, recipe = run["dataset"], run.get("recipe") or {}
    completed = run.get("completed_epochs", (run["metrics"].get("final") or {}).get("epoch"))
    applied = run.get("svb_applied_total")
    if applied is None and run.get("svb_config") and (run_dir / "summary.csv").is_file():
        with open(run_dir / "summary.csv", encoding="utf-8") as f:  # runs written before run.json had it
            rows = list(csv.DictReader(f))
        applied = int(rows[-1]["svb_applied_total"]) if rows and rows[-1].get("svb_applied_total") else None
    return {
        "data_source": dataset.get("data_dir") or dataset["name"],
        "local_data": bool(dataset.get("data_dir")),
        "completed_epochs": completed,
        "epochs": run.get("epochs", recipe.get("epochs")),
        "config": recipe.get("config"),
        "config_epochs": config_epochs(recipe.get("config")),
        "svb_applied_total": applied,
    }


def config_epochs(config: str | None) -> int | None:
    """The epochs of the recipe config a run named (``-c``: a path, else a name in
    ``timm_svb/recipe/configs``)."""
    if not config:
        return None
    for candidate in dict.fromkeys((config, Path(config).stem)):  # a path of the training machine: its name
        try:
            epochs = load_config_file(candidate).get("epochs")
        except SystemExit:
            continue
        return None if epochs is None else int(epochs)
    return None


def claim_mismatch(tag: str, facts: dict[str, Any]) -> str | None:
    """How the run's data or schedule differs from what ``tag`` claims (see :data:`DATA_TAGS`); None if
    they agree."""
    match = _EPOCHS_TAG.fullmatch(tag)
    data, claimed = (match["data"], int(match["epochs"])) if match else (tag, None)
    if data not in DATA_TAGS:
        return f"the tag {tag!r} names no known data (DATA_TAGS of hub/publish.py: {sorted(DATA_TAGS)})"
    source, named = str(facts["data_source"]), DATA_TAGS[data]
    if facts["local_data"]:
        matches = PurePath(source).name in [n for n in named if "/" not in n]
    else:
        matches = source in [n for n in named if "/" in n]
    if not matches:
        return (
            f"the tag {tag!r} claims the data {list(named)}, the run read {source!r}"
            " (a Hub id means the set read from the Hub, a folder name a local copy of that name)"
        )
    done = facts["completed_epochs"]
    if claimed is not None and done != claimed:
        return f"the tag {tag!r} claims {claimed} epochs, the run completed {done}"
    if claimed is None and (facts["config_epochs"] is None or done != facts["config_epochs"]):
        config = (
            f"its config {facts['config']!r} has {facts['config_epochs']}" if facts["config"] else "no -c"
        )
        return (
            f"the tag {tag!r} claims the full schedule of a recipe config, the run completed {done} epochs "
            f"({config}): name its schedule in the tag ({data}_e{done})"
        )
    return None


def default_tag(dataset_name: str) -> str:
    """Pretrained tag for a data set name: ``uoft-cs/cifar10`` -> ``cifar10``, ``imagenet-1k`` -> ``in1k``."""
    base = re.split(r"[/\\]", dataset_name.rstrip("/\\"))[-1].lower()
    tag = re.sub(r"[^0-9a-z]+", "_", base).strip("_")
    return _TAG_ALIASES.get(tag, tag)


def export_pretrained_cfg(run: dict[str, Any], tag: str) -> dict[str, Any]:
    """The run's preprocessing cfg as timm ``PretrainedCfg`` entries; as weight source only the file name
    ``model.safetensors`` (timm would otherwise try ``pytorch_model.bin`` first on ``hf-hub:``)."""
    fields = {f.name for f in dataclasses.fields(PretrainedCfg)}
    cfg = {k: v for k, v in run["pretrained_cfg"].items() if k in fields and k != "state_dict"}
    cfg = filter_pretrained_cfg(cfg, remove_source=True, remove_null=True)
    cfg.update(tag=tag, num_classes=run["num_classes"], hf_hub_filename=WEIGHTS_FILENAME)
    return cfg


# --------------------------------------------------------------------------------------------- the folder


def write_folder(model: nn.Module, run: dict[str, Any], folder: Path, tag: str) -> None:
    """``model.safetensors`` and ``config.json`` (timm's ``save_for_hf``, safetensors only)."""
    model_config = {
        "pretrained_cfg": export_pretrained_cfg(run, tag),
        "label_names": list(run["dataset"].get("label_names") or []),
        "svb_config": run["svb_config"],
        "timm_svb_version": run.get("timm_svb_version", timm_svb.__version__),
    }
    save_for_hf(model, str(folder), model_config=model_config, safe_serialization=True)
    # safetensors writes 0600: give the weights the mode of the config.json written beside them
    os.chmod(folder / WEIGHTS_FILENAME, stat.S_IMODE((folder / "config.json").stat().st_mode))


def write_spectrum(model: nn.Module, run: dict[str, Any], folder: Path) -> str | None:
    """Plot the singular-value spectrum to ``spectrum.png`` when ``timm_svb.spectrum`` (and matplotlib) is
    available; returns the file name, None when not plotted."""
    try:
        from timm_svb.spectrum import model_spectrum, plot_spectra  # noqa: PLC0415  (optional)

        epsilon = float((run.get("svb_config") or {}).get("epsilon", 0.5))
        plot_spectra(
            {run["model"]: model_spectrum(model)},
            folder / SPECTRUM_PNG,
            epsilon=epsilon,
            title=f"Singular values of {run['model']} ({run['dataset']['name']})",
        )
    except ImportError as e:
        _logger.warning("no spectrum plot in the card (%s)", e)
        return None
    return SPECTRUM_PNG


def probe_input(model: nn.Module, batch_size: int = 4) -> torch.Tensor:
    """A fixed (seeded) random batch of the model's input size."""
    size = tuple(model.pretrained_cfg["input_size"])
    return torch.randn((batch_size, *size), generator=torch.Generator().manual_seed(0))


def same_outputs(model: nn.Module, other: nn.Module) -> bool:
    """Whether two models (in eval mode) give bit-identical outputs on :func:`probe_input`."""
    x = probe_input(model)
    with torch.no_grad():
        return torch.equal(model(x), other(x))


def check_folder(folder: Path, model: nn.Module) -> nn.Module:
    """Load ``folder`` through timm (``local-dir:``) and check weights and outputs equal ``model``'s.

    Returns the loaded model (eval mode). Raises :class:`PublishError` on any difference or on a file that
    does not belong in a published folder (pickles above all).
    """
    unexpected = sorted(p.name for p in folder.iterdir() if p.name not in ALLOWED_FILES)
    if unexpected:
        raise PublishError(f"{folder} holds files that are not published: {unexpected}")
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    expected, got = model.state_dict(), loaded.state_dict()
    if expected.keys() != got.keys() or any(not torch.equal(expected[k], got[k]) for k in expected):
        raise PublishError(f"weights loaded back from {folder} differ from the run's")
    if not same_outputs(model, loaded):
        raise PublishError(f"outputs of the model loaded back from {folder} differ from the run's model")
    return loaded


def zoo_model(name: str, folder: Path, model: nn.Module) -> tuple[nn.Module | None, str | None]:
    """``timm.create_model(name, pretrained=True)`` with the folder's weights, as zoo users get it (the
    zoo entry's default kwargs, loaded by timm-svb's loader); ``(model, None)`` when its outputs equal
    ``model``'s, else ``(None, why not)``."""
    weights = str(folder / WEIGHTS_FILENAME)
    try:
        zoo = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": weights}).eval()
    except RuntimeError as e:  # the weights do not fit the zoo model's layout
        return None, f"the weights do not fit timm.create_model({name!r}) (non-default model kwargs?): {e}"
    if not same_outputs(model, zoo):
        return None, (
            f"timm.create_model({name!r}) with these weights gives other outputs than the run's model: "
            "its model kwargs change the forward pass (e.g. global_pool, act_layer)"
        )
    return zoo, None


# ------------------------------------------------------------------------------------------- evaluation


def recipe_evaluator(
    model: nn.Module, run: dict[str, Any], data_dir: Path | None = None
) -> dict[str, float] | None:
    """Re-evaluate ``model`` with ``recipes/validate.py`` as the run tested (its data set, preprocessing, test
    batch, memory format and precision; on a GPU when there is one); None when the test data is not
    reachable (the recipe's ``DataError``)."""
    try:
        metrics = evaluate_run_model(model, run, data_dir=data_dir)
    except DataError as e:
        _logger.warning("test data not reachable, not re-evaluated: %s", e)
        return None
    return {"top1_err": float(metrics["top1_err"]), "top5_err": float(metrics["top5_err"])}


def check_metrics(recorded: dict[str, Any], checked: dict[str, float], tolerance: float) -> None:
    """Refuse (:class:`PublishError`) when re-evaluated errors differ from the run's by more than
    ``tolerance`` percentage points."""
    for key in ("top1_err", "top5_err"):
        if not math.isclose(float(recorded[key]), checked[key], rel_tol=0.0, abs_tol=tolerance):
            raise PublishError(
                f"re-evaluated {key} {checked[key]:.4f}% differs from the run's record {recorded[key]:.4f}% "
                f"by more than {tolerance} points: refusing to publish"
            )


# ----------------------------------------------------------------------------------------------- record


def zoo_mismatch(
    run: dict[str, Any], repo_id: str, name: str, svb_override: str | None, svb_applied: int | None = None
) -> str | None:
    """Why the run cannot be recorded as zoo entry ``name``, before building anything (None if it can).

    The record pins ``timm-svb/MODEL.TAG``; the tag must exist and its cfg match the run's preprocessing
    and classes; an ``_svb`` name needs weights trained with SVB, applied at least once (``svb_applied``
    None: not known) (or ``--svb-override REASON``). That the tag's data and schedule claim holds is
    :func:`claim_mismatch`'s, checked by :func:`prepare`. That the zoo
    model gives the run's outputs is checked on the built folder (:func:`zoo_model`). SVB bands other than
    the zoo model's defaults are only logged: ``config.json``, the card and the record keep the bands used.
    """
    if repo_id != f"{HUB_ORG}/{name}":
        return f"the record pins {name!r} in the repo '{HUB_ORG}/{name}', not {repo_id!r}"
    try:
        zoo_cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # a tag the architecture does not have
        zoo_cfg = None
    if zoo_cfg is None:
        arch = name.split(".")[0]
        tags = [n.split(".", 1)[1] for n in timm.models.get_arch_pretrained_cfgs(arch)]
        return f"the zoo has no pretrained cfg {name!r} (tags of {arch}: {tags or 'none'}; --tag picks one)"
    zoo_cfg, run_cfg = zoo_cfg.to_dict(), {**run["pretrained_cfg"], "num_classes": run["num_classes"]}
    for key in _CFG_KEYS:
        if not _same(zoo_cfg.get(key), run_cfg.get(key)):
            return f"{key}: zoo cfg {name!r} has {zoo_cfg.get(key)!r}, the run {run_cfg.get(key)!r}"
    trained = _svb_bands(run["svb_config"])
    if name.split(".")[0].endswith("_svb") and not svb_override:
        if not trained["epsilon"]:
            return (
                f"{name} is an SVB model but the run trained without SVB: record it under the baseline's "
                "name, or pass --svb-override REASON (stated on the model card and in the record)"
            )
        if svb_applied == 0:
            return (
                f"{name} is an SVB model but SVB never applied in the run (svb_applied_total 0: its schedule "
                "never fired, plain SGD): train longer, or pass --svb-override REASON"
            )
    carried = _svb_bands(getattr(timm.create_model(name.split(".")[0]), "svb_config", None))
    if trained["epsilon"] and not _same(list(trained.values()), list(carried.values())):
        _logger.warning(
            "%s: trained with SVB bands %s, the zoo model's svb_config (its defaults for further "
            "training) is %s; config.json, the card and the record keep the bands used",
            name,
            trained,
            carried,
        )
    return None


def _svb_bands(svb_config: dict[str, Any] | None) -> dict[str, float | None]:
    """The SVB / BBN bands of an ``svb_config`` (None: not used)."""
    config = svb_config or {}
    return {"epsilon": config.get("epsilon"), "bbn_epsilon": config.get("bbn_epsilon")}


def _same(a: Any, b: Any) -> bool:
    """Equal cfg values, numbers up to 1e-6 and lists equal to tuples (JSON round trips)."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=0.0, abs_tol=1e-6)
    return a == b


def repo_head(api: Any, repo_id: str, private: bool, recording: bool) -> str:
    """The current commit of ``repo_id`` (created if missing), to push on top of; refuses a private repo
    when recording (zoo users could not download from it), before anything is uploaded."""
    try:
        info = api.repo_info(repo_id)
    except RepositoryNotFoundError:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.repo_info(repo_id)
    if info.private and recording:
        raise PublishError(
            f"{repo_id} is private: users of the zoo could not download the recorded weights. Make it public "
            "or pass --no-record; nothing was uploaded"
        )
    return info.sha


def push_folder(folder: Path, repo_id: str, api: Any, commit_message: str, parent_commit: str) -> str:
    """Upload ``folder`` in one commit on top of ``parent_commit`` that holds exactly its files (every other
    file of the repo is deleted, but ``.gitattributes``); returns the commit id. A push that raced another
    one fails (``parent_commit``) and nothing is recorded."""
    try:
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message=commit_message,
            parent_commit=parent_commit,
            delete_patterns="*",
        )
    except HfHubHTTPError as e:
        raise PublishError(
            f"upload to {repo_id} failed ({e}); nothing was recorded. If another push changed the repo "
            "meanwhile, check it and re-run"
        ) from e
    return info.oid


# ------------------------------------------------------------------------------------------------ main


@dataclasses.dataclass
class PublishOptions:
    """Settings of one publication (see ``--help``)."""

    repo_id: str
    dry_run: Path | None = None
    in_package: Path | None = None
    weights: str = "best"
    tag: str | None = None
    tolerance: float = 0.1
    require_eval: bool = False
    record: Path | None = None
    no_record: bool = False
    svb_override: str | None = None
    allow_mismatch: str | None = None
    commit_message: str | None = None
    private: bool = False
    data_dir: Path | None = None

    @property
    def recording(self) -> bool:
        """Whether this publication writes a record entry."""
        return self.dry_run is None and not self.no_record


def _out_folder(dry_run: Path | None, tmp: str) -> Path:
    """The folder to build in: the (new or empty) dry-run folder, else a temporary one."""
    if dry_run is None:
        return Path(tmp)
    if dry_run.exists() and any(dry_run.iterdir()):
        raise PublishError(f"--dry-run folder {dry_run} is not empty")
    dry_run.mkdir(parents=True, exist_ok=True)
    return dry_run


@dataclasses.dataclass
class Release:
    """A run's weights about to be published: the run, its model and the zoo entry they would be."""

    run: dict[str, Any]
    model: nn.Module
    tag: str
    name: str  # zoo entry "model.tag"
    not_recordable: str | None  # why the zoo cannot list them, None if it can
    recorded: dict[str, Any]  # the run's metrics of these weights
    record: Path | None  # the record to write, None when not recording
    facts: dict[str, Any]  # what the run did (run_facts)
    mismatch: str | None  # how that differs from the tag's claim (claim_mismatch), None if it agrees


def prepare(run_dir: Path, opts: PublishOptions) -> Release:
    """Check the preconditions, the record and the run; refuse early what could not be pushed or recorded."""
    if opts.dry_run is not None and opts.in_package is not None:
        raise PublishError("--dry-run records nothing and --in-package records: pass one of them")
    if opts.in_package is not None and opts.no_record:
        raise PublishError("--in-package ships and records the weights: not with --no-record")
    if opts.dry_run is None and opts.in_package is None and get_token() is None:
        raise PublishError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry-run, or --in-package)"
        )
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", opts.repo_id):
        raise PublishError(f"--repo-id must be ORG/NAME, got {opts.repo_id!r}")
    if opts.private and opts.recording:
        raise PublishError(
            "--private: users of the zoo could not download the recorded weights (--no-record)"
        )
    record = None
    if opts.recording:  # read and check the record now, not after the push
        try:
            record = record_path(opts.record)
            read_record(record, writable=True)
        except RecordError as e:
            raise PublishError(f"{e}; nothing was uploaded") from e
    run = load_run(run_dir)
    weights = "best_ema" if opts.weights == "ema" else opts.weights
    if weights.endswith("_ema") and weights not in run["metrics"]:
        raise PublishError(f"{run_dir}: the run kept no EMA of its weights (--model-ema); nothing published")
    if run.get("status", "finished") != "finished" or not run["metrics"].get(weights):
        raise PublishError(
            f"{run_dir}: the run is not finished (status {run.get('status')!r}); nothing published"
        )
    model = load_run_model(run, run_dir / f"model_{weights}.safetensors")
    tag = opts.tag or default_tag(run["dataset"]["name"])
    name = f"{model.pretrained_cfg['architecture']}.{tag}"
    recorded = {**run["metrics"][weights], "weights": weights}
    facts = run_facts(run, run_dir)
    mismatch = claim_mismatch(tag, facts)
    not_recordable = zoo_mismatch(run, opts.repo_id, name, opts.svb_override, facts["svb_applied_total"])
    if not_recordable is None and mismatch and not opts.allow_mismatch:
        not_recordable = (
            f"{mismatch}; record it under a tag that says what the run did, or pass --allow-mismatch REASON "
            "(stated on the model card and in the record)"
        )
    rel = Release(run, model, tag, name, not_recordable, recorded, record, facts, mismatch)
    _refuse_unrecordable(rel, opts)
    return rel


def _refuse_unrecordable(rel: Release, opts: PublishOptions) -> None:
    """Log why the weights are not recordable; refuse when this publication records them."""
    if rel.not_recordable:
        _logger.warning("not recordable as zoo entry %r: %s", rel.name, rel.not_recordable)
        if opts.recording:
            raise PublishError(
                f"cannot record the weights as {rel.name!r}: {rel.not_recordable} (or use --no-record)"
            )


def build_checked_folder(rel: Release, folder: Path, opts: PublishOptions, evaluator: Evaluator) -> dict:
    """Write the repo folder, load it back and compare (as ``local-dir:`` and, for a zoo entry, as the zoo
    model), re-evaluate the model users get, add the card; returns the metrics to record."""
    write_folder(rel.model, rel.run, folder, rel.tag)
    loaded = check_folder(folder, rel.model)
    _logger.info("loaded back %s through timm: weights and outputs identical to the run's model", folder)
    if rel.not_recordable is None:
        zoo, rel.not_recordable = zoo_model(rel.name, folder, rel.model)
        _refuse_unrecordable(rel, opts)
        loaded = zoo or loaded
    checked = evaluator(loaded, rel.run)
    if checked is None and opts.require_eval:
        raise PublishError("--require-eval: the test data is not reachable, nothing published")
    if checked is not None:
        check_metrics(rel.recorded, checked, opts.tolerance)
        _logger.info(
            "re-evaluated: top-1/top-5 err %.2f%%/%.2f%% (run: %.2f%%/%.2f%%)",
            checked["top1_err"],
            checked["top5_err"],
            rel.recorded["top1_err"],
            rel.recorded["top5_err"],
        )
    card = build_model_card(
        repo_id=opts.repo_id,
        run=rel.run,
        metrics=rel.recorded,
        checked=checked,
        record_name=rel.name if opts.recording else None,
        num_params=sum(p.numel() for p in rel.model.parameters()),
        spectrum_png=write_spectrum(loaded, rel.run, folder),
        svb_override=opts.svb_override,
        facts=rel.facts,
        allowed_mismatch=_allowed_mismatch(rel, opts),
        shipped=opts.in_package is not None,
    )
    card.save(folder / "README.md")
    dataset = rel.run["dataset"]
    return {
        "dataset": data_source(dataset),  # as given: a local copy is not the Hub id it was named
        "test_split": dataset.get("test_split"),
        **rel.recorded,
        "reevaluated": checked,
    }


def _allowed_mismatch(rel: Release, opts: PublishOptions) -> str | None:
    """The stated override of a recorded tag whose claim the run does not meet: 'REASON (how it differs)'."""
    if not (rel.mismatch and opts.allow_mismatch and opts.recording):
        return None
    return f"{opts.allow_mismatch} (recorded although {rel.mismatch})"


def push_and_record(
    rel: Release, folder: Path, metrics: dict, opts: PublishOptions, api_factory: Callable[..., Any]
) -> dict[str, Any]:
    """Upload the checked folder and record the pinned commit; returns what was done."""
    message = opts.commit_message or (
        f"Add {rel.name} weights ({rel.run['dataset']['name']}: top-1 err {rel.recorded['top1_err']:.2f}%)"
    )
    api = api_factory(library_name="timm-svb", library_version=timm_svb.__version__)
    head = repo_head(api, opts.repo_id, opts.private, opts.recording)
    revision = push_folder(folder, opts.repo_id, api, message, head)
    _logger.info("pushed %s at revision %s", opts.repo_id, revision)
    if rel.record is None:
        return {"revision": revision}
    try:
        entry = record_entry(
            folder,
            rel.name,
            revision,
            metrics,
            rel.run["svb_config"],
            opts.svb_override,
            allow_mismatch=_allowed_mismatch(rel, opts),
        )
        write_record(rel.record, rel.name, entry)
    except (OSError, RecordError) as e:
        raise PushedNotRecordedError(opts.repo_id, revision, str(e)) from e
    _logger.info("recorded %s in %s", rel.name, rel.record)
    return {"revision": revision, "record": str(rel.record)}


def ship_and_record(rel: Release, folder: Path, metrics: dict, opts: PublishOptions) -> dict[str, Any]:
    """``--in-package``: the checked folder's weights into the package beside the record, and the record entry
    that pins their sha256 (no Hub commit yet); returns what was done."""
    entry = record_entry(
        folder,
        rel.name,
        None,
        metrics,
        rel.run["svb_config"],
        opts.svb_override,
        allow_mismatch=_allowed_mismatch(rel, opts),
    )
    shipped = ship_weights(folder, rel.record, rel.name)
    write_record(rel.record, rel.name, entry)
    _logger.info("shipped %s as %s and recorded it in %s", rel.name, shipped, rel.record)
    return {"package_file": str(shipped), "record": str(rel.record)}


def publish(
    run_dir: Path,
    opts: PublishOptions,
    evaluator: Evaluator | None = None,
    api_factory: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Build, check and (unless a dry run) push and record a run's weights; returns a summary.

    ``evaluator`` re-evaluates the model users get (default: the recipe's test loader and ``evaluate``);
    ``api_factory`` builds the ``HfApi`` that pushes (default: ``huggingface_hub.HfApi``; tests: a stand-in).
    """
    evaluator = evaluator or functools.partial(recipe_evaluator, data_dir=opts.data_dir)
    rel = prepare(run_dir, opts)
    with tempfile.TemporaryDirectory(prefix="timm-svb-publish-") as tmp:
        folder = _out_folder(opts.dry_run or opts.in_package, tmp)
        metrics = build_checked_folder(rel, folder, opts, evaluator)
        summary: dict[str, Any] = {
            "repo_id": opts.repo_id,
            "record_name": rel.name,
            "recordable": rel.not_recordable is None,
            "not_recordable_reason": rel.not_recordable,
            "run": {k: v for k, v in rel.facts.items() if k != "local_data"},
            "tag_mismatch": rel.mismatch,
            "allow_mismatch": opts.allow_mismatch if rel.mismatch else None,
            "files": sorted(p.name for p in folder.iterdir()),
            "sha256": file_sha256(folder / WEIGHTS_FILENAME),
            "outputs_identical": True,
            "metrics": metrics,
        }
        if opts.dry_run is not None:
            return {**summary, "dry_run": str(folder)}
        if opts.in_package is not None:
            return {**summary, "release_folder": str(folder), **ship_and_record(rel, folder, metrics, opts)}
        return {**summary, **push_and_record(rel, folder, metrics, opts, api_factory or HfApi)}


def build_parser() -> argparse.ArgumentParser:
    """Command line of ``hub/publish.py``."""
    p = argparse.ArgumentParser(
        prog="hub/publish.py",
        description=(
            "Publish a training run (the run folder of recipes/train.py) as a Hugging Face Hub model repo:\n"
            "model.safetensors + config.json (timm's save_for_hf; never a pickle) + README.md model card\n"
            "(model-index top-1/top-5 accuracy, SVB settings, recipe, citation, spectrum plot).\n\n"
            "Checks before anything is published: the folder is loaded back through timm ('local-dir:')\n"
            "and must give outputs identical to the run's model, and so must timm.create_model(MODEL.TAG)\n"
            "with the folder's weights (what pretrained=True users get) for a zoo entry; that model is\n"
            "re-evaluated on the test split when the data is reachable and refused when the errors differ\n"
            "from run.json by more than --tolerance. The record is read and checked before any upload.\n"
            "A zoo entry is recorded only when the run did what its tag claims: DATA = the full schedule of\n"
            "the run's recipe config (-c), DATA_eN = N epochs; DATA = a Hub set read from the Hub (cifar10,\n"
            "cifar100, in1k) or a local copy's folder name (c10jpeg = --data-dir .../cifar10-jpeg); else\n"
            "--allow-mismatch REASON. The card states the data as given, epochs done, SVB applications.\n\n"
            "--dry-run OUT_DIR stops there and leaves the folder in OUT_DIR. Otherwise it is uploaded\n"
            "with huggingface_hub in one commit holding exactly the checked files, on top of the repo's\n"
            "current commit (token from HF_TOKEN or the `hf auth login` cache; never printed or written),\n"
            "and recorded (repo id, commit, sha256 of model.safetensors, metrics, SVB settings) in the\n"
            "record (--record), from which timm.create_model(MODEL.TAG, pretrained=True) loads. A failed\n"
            "push records nothing; after a failure past the push, re-running the same command is safe\n"
            "(an unchanged folder makes no new commit)."
        ),
        epilog=(
            "examples:\n"
            "  # dry run: build + check the repo folder in OUT_DIR, no upload, no record, no token\n"
            "  python hub/publish.py runs/digits --repo-id timm-svb/convnet20_svb.sklearn_digits "
            "--dry-run /tmp/publish-digits\n"
            '  python -c "import timm, timm_svb; '
            "timm.create_model('local-dir:/tmp/publish-digits', pretrained=True)\"\n"
            "  # publish: push to the Hub and record the pinned commit in timm_svb/models/published.json\n"
            "  python hub/publish.py runs/wrn28_10_svb --repo-id timm-svb/wrn28_10_svb.cifar10 --require-eval"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="run folder with run.json and model_*.safetensors"
    )
    p.add_argument(
        "--repo-id",
        required=True,
        metavar="ORG/NAME",
        help=f"Hub model repo; recorded only as {HUB_ORG}/MODEL.TAG, the zoo entry's name",
    )
    p.add_argument(
        "--dry-run",
        type=Path,
        metavar="OUT_DIR",
        help="build and check the repo folder in OUT_DIR (new or empty) and stop: "
        "no upload, no record, no token needed",
    )
    p.add_argument(
        "--in-package",
        type=Path,
        metavar="OUT_DIR",
        help="where the Hub cannot be reached: build and check the repo folder in OUT_DIR (new or empty; "
        "push it later with the plain command), ship its weights inside the package "
        "(timm_svb/models/weights/MODEL.TAG.safetensors) and record them there pinned by sha256, so "
        "timm.create_model(MODEL.TAG, pretrained=True) loads them offline; no token needed",
    )
    p.add_argument(
        "--weights",
        choices=("best", "final", "ema", "best_ema", "final_ema"),
        default="best",
        help="which weights of the run to publish: best (lowest test error), final (after the last epoch), "
        "or the model EMA's (--model-ema runs): ema = best_ema (the EMA's lowest test error), final_ema; "
        "the card and the record say which (default: best)",
    )
    p.add_argument(
        "--tag",
        help="pretrained tag of the zoo entry MODEL.TAG (default: from the data set name, "
        "e.g. uoft-cs/cifar10 -> cifar10)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.1,
        help="largest accepted difference of re-evaluated top-1/top-5 error, in percentage points "
        "(default: 0.1)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="local copy of the test data set for the re-evaluation (as recipes/train.py --data-dir)",
    )
    p.add_argument(
        "--require-eval",
        action="store_true",
        help="refuse to publish when the test data is not reachable for re-evaluation",
    )
    p.add_argument(
        "--record",
        type=Path,
        metavar="JSON",
        help="record file to update (default: timm_svb/models/published.json of the imported timm_svb, "
        "when that is a source checkout; never a record inside site-packages)",
    )
    p.add_argument(
        "--no-record",
        action="store_true",
        help="push without recording (e.g. to a personal repo outside the org)",
    )
    p.add_argument(
        "--svb-override",
        metavar="REASON",
        help="record an _svb model trained without SVB; REASON is stated on the card and in the record",
    )
    p.add_argument(
        "--allow-mismatch",
        metavar="REASON",
        help="record a run whose data or schedule differ from what its tag claims (a tag is DATA, the full "
        "schedule of the run's recipe config, or DATA_eN, N epochs completed; DATA names a Hub set read "
        "from the Hub or a local copy's folder name, e.g. c10jpeg = a folder cifar10-jpeg); REASON and the "
        "difference are stated on the card and in the record",
    )
    p.add_argument("--commit-message", help="Hub commit message (default: 'Add MODEL.TAG weights (...)')")
    p.add_argument(
        "--private", action="store_true", help="create the Hub repo as private (only with --no-record)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; prints the summary as JSON."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    opts = PublishOptions(**{k: v for k, v in vars(args).items() if k != "run_dir"})
    try:
        summary = publish(args.run_dir, opts)
    except PublishError as e:
        _logger.error("%s", e)
        if isinstance(e, PushedNotRecordedError):
            command = shlex.join(["python", "hub/publish.py", *(sys.argv[1:] if argv is None else argv)])
            print(f"pushed revision: {e.revision}\nto finish, re-run: {command}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
