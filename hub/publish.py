"""Publish a training run's weights as a Hugging Face Hub model repository.

From ``RUN_DIR`` (written by ``recipes/train.py``: ``run.json`` and ``model_{best,final}.safetensors``) it
builds the repository folder with timm's ``save_for_hf`` (``model.safetensors``, ``config.json``) and a model
card (``README.md``), loads the folder back through timm (``local-dir:``) and checks that its outputs equal
the run's model, re-evaluates it on the test split when the data is reachable and refuses to publish when
the errors differ from the run's record by more than ``--tolerance``. Then it either leaves the folder in
``--dry-run OUT_DIR`` or uploads it with ``huggingface_hub`` and records the pinned commit and the sha256
of the weights in the package's record of published weights (``timm_svb/models/published.json``).

    python hub/publish.py RUN_DIR --repo-id timm-svb/NAME --dry-run OUT_DIR   # build and check only
    python hub/publish.py RUN_DIR --repo-id timm-svb/NAME --require-eval      # build, check, push, record
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: make `hub` importable
    sys.path.insert(0, str(REPO_ROOT))

import safetensors.torch  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from huggingface_hub import HfApi, get_token  # noqa: E402
from timm.models import PretrainedCfg, filter_pretrained_cfg, save_for_hf  # noqa: E402
from torch import nn  # noqa: E402

import timm_svb  # noqa: E402  (registers the zoo)
from hub.card import build_model_card  # noqa: E402
from hub.record import WEIGHTS_FILENAME, default_record_path, file_sha256, record_entry, write_record  # noqa: E402
from timm_svb.models._pretrained import HUB_ORG  # noqa: E402

_logger = logging.getLogger("timm_svb.hub")

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

# An evaluator re-evaluates a model on a run's test split: {"top1_err", "top5_err"} (percent), or None when
# the test data is not reachable.
Evaluator = Callable[[nn.Module, dict[str, Any]], dict[str, float] | None]


class PublishError(RuntimeError):
    """The folder cannot be published: a failed check or a missing precondition."""


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
    model.load_state_dict(safetensors.torch.load_file(weights, device="cpu"), strict=True)
    if model.num_classes != run["num_classes"]:
        raise PublishError(f"model has {model.num_classes} classes, run.json says {run['num_classes']}")
    return model.eval()


def default_tag(dataset_name: str) -> str:
    """Pretrained tag for a data set name: ``uoft-cs/cifar10`` -> ``cifar10``, ``imagenet-1k`` -> ``in1k``."""
    base = re.split(r"[/\\]", dataset_name.rstrip("/\\"))[-1].lower()
    tag = re.sub(r"[^0-9a-z]+", "_", base).strip("_")
    return _TAG_ALIASES.get(tag, tag)


def export_pretrained_cfg(run: dict[str, Any], tag: str) -> dict[str, Any]:
    """The run's preprocessing cfg as timm ``PretrainedCfg`` entries, without weight sources."""
    fields = {f.name for f in dataclasses.fields(PretrainedCfg)}
    cfg = {k: v for k, v in run["pretrained_cfg"].items() if k in fields and k != "state_dict"}
    cfg = filter_pretrained_cfg(cfg, remove_source=True, remove_null=True)
    cfg.update(tag=tag, num_classes=run["num_classes"])
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
    x = probe_input(loaded)
    with torch.no_grad():
        if not torch.equal(model(x), loaded(x)):
            raise PublishError(f"outputs of the model loaded back from {folder} differ from the run's model")
    return loaded


# ------------------------------------------------------------------------------------------- evaluation


def _recipe_module() -> Any:
    """``recipes/train.py`` as a module (None if it is not there)."""
    recipes = REPO_ROOT / "recipes"
    if not (recipes / "train.py").is_file():
        return None
    if str(recipes) not in sys.path:
        sys.path.insert(0, str(recipes))
    import train  # noqa: PLC0415

    return train


def recipe_evaluator(
    model: nn.Module, run: dict[str, Any], data_dir: Path | None = None
) -> dict[str, float] | None:
    """Re-evaluate with the recipe's ``build_test_loader`` and ``evaluate`` (on a GPU when there is one);
    None when the test data is not reachable (the recipe's ``DataError``)."""
    train = _recipe_module()
    if train is None:
        _logger.warning("recipes/train.py not found: not re-evaluated")
        return None
    from data import DataError  # noqa: PLC0415  (recipes/ is on sys.path now)

    cuda = torch.cuda.is_available()
    try:
        loader = train.build_test_loader(run, data_dir=data_dir, workers=4 if cuda else 0)
    except DataError as e:
        _logger.warning("test data not reachable, not re-evaluated: %s", e)
        return None
    device = torch.device("cuda" if cuda else "cpu")
    try:
        metrics = train.evaluate(model.to(device), loader)
    finally:
        model.to("cpu")
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


def zoo_mismatch(run: dict[str, Any], repo_id: str, name: str, model: nn.Module) -> str | None:
    """Why the weights cannot be recorded as zoo entry ``name`` (None if they can).

    ``timm.create_model(name, pretrained=True)`` builds the zoo model with its default kwargs and the zoo's
    cfg for the tag, so the tag must exist, its cfg must match the run's preprocessing and classes, and the
    default model must have exactly the run's state dict layout. SVB bands other than the zoo model's
    defaults are only logged: ``config.json`` and the card record the bands the weights were trained with.
    """
    if repo_id.split("/")[0] != HUB_ORG:
        return f"{repo_id} is not in the {HUB_ORG!r} Hub organisation"
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
    zoo_model = timm.create_model(name)
    zoo_sd, run_sd = zoo_model.state_dict(), model.state_dict()
    if {k: v.shape for k, v in zoo_sd.items()} != {k: v.shape for k, v in run_sd.items()}:
        return f"the run's state dict does not fit timm.create_model({name!r}) (non-default model kwargs?)"
    trained, carried = _svb_bands(run["svb_config"]), _svb_bands(getattr(zoo_model, "svb_config", None))
    if not _same(list(trained.values()), list(carried.values())):  # informative: weights fit either way
        _logger.warning(
            "%s: trained with SVB bands %s, the zoo model's svb_config (its defaults for further "
            "training) is %s; config.json and the card record the bands used",
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


def push_folder(folder: Path, repo_id: str, api: Any, commit_message: str, private: bool) -> str:
    """Create the repository if needed, upload ``folder`` in one commit, return the commit id."""
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return info.oid


# ------------------------------------------------------------------------------------------------ main


@dataclasses.dataclass
class PublishOptions:
    """Settings of one publication (see ``--help``)."""

    repo_id: str
    dry_run: Path | None = None
    weights: str = "best"
    tag: str | None = None
    tolerance: float = 0.1
    require_eval: bool = False
    record: Path | None = None
    no_record: bool = False
    commit_message: str | None = None
    private: bool = False
    data_dir: Path | None = None


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


def prepare(run_dir: Path, opts: PublishOptions) -> Release:
    """Check the preconditions and load the run; refuse early what could not be pushed or recorded."""
    if opts.dry_run is None and get_token() is None:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry-run)")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", opts.repo_id):
        raise PublishError(f"--repo-id must be ORG/NAME, got {opts.repo_id!r}")
    run = load_run(run_dir)
    if run.get("status", "finished") != "finished" or not run["metrics"].get(opts.weights):
        raise PublishError(
            f"{run_dir}: the run is not finished (status {run.get('status')!r}); nothing published"
        )
    model = load_run_model(run, run_dir / f"model_{opts.weights}.safetensors")
    tag = opts.tag or default_tag(run["dataset"]["name"])
    name = f"{model.pretrained_cfg['architecture']}.{tag}"
    not_recordable = zoo_mismatch(run, opts.repo_id, name, model)
    if not_recordable:
        _logger.warning("not recordable as zoo entry %r: %s", name, not_recordable)
        if opts.dry_run is None and not opts.no_record:
            raise PublishError(
                f"cannot record the weights as {name!r}: {not_recordable} (or use --no-record)"
            )
    recorded = {**run["metrics"][opts.weights], "weights": opts.weights}
    return Release(run, model, tag, name, not_recordable, recorded)


def build_checked_folder(rel: Release, folder: Path, opts: PublishOptions, evaluator: Evaluator) -> dict:
    """Write the repo folder, load it back and compare, re-evaluate, add the card; returns the metrics
    to record (the run's, plus the re-evaluation or None)."""
    write_folder(rel.model, rel.run, folder, rel.tag)
    loaded = check_folder(folder, rel.model)
    _logger.info("loaded back %s through timm: weights and outputs identical to the run's model", folder)
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
        record_name=None if rel.not_recordable or opts.no_record else rel.name,
        num_params=sum(p.numel() for p in rel.model.parameters()),
        spectrum_png=write_spectrum(loaded, rel.run, folder),
    )
    card.save(folder / "README.md")
    dataset = rel.run["dataset"]
    return {
        "dataset": dataset["name"],
        "test_split": dataset.get("test_split"),
        **rel.recorded,
        "reevaluated": checked,
    }


def push_and_record(
    rel: Release, folder: Path, metrics: dict, opts: PublishOptions, api_factory: Callable[..., Any]
) -> dict[str, Any]:
    """Upload the checked folder and record the pinned commit; returns what was done."""
    message = opts.commit_message or (
        f"Add {rel.name} weights ({rel.run['dataset']['name']}: top-1 err {rel.recorded['top1_err']:.2f}%)"
    )
    api = api_factory(library_name="timm-svb", library_version=timm_svb.__version__)
    revision = push_folder(folder, opts.repo_id, api, message, opts.private)
    _logger.info("pushed %s at revision %s", opts.repo_id, revision)
    if opts.no_record:
        return {"revision": revision}
    record = opts.record or default_record_path()
    write_record(record, rel.name, record_entry(folder, opts.repo_id, revision, metrics))
    _logger.info("recorded %s in %s", rel.name, record)
    return {"revision": revision, "record": str(record)}


def publish(
    run_dir: Path,
    opts: PublishOptions,
    evaluator: Evaluator | None = None,
    api_factory: Callable[..., Any] = HfApi,
) -> dict[str, Any]:
    """Build, check and (unless a dry run) push and record a run's weights; returns a summary.

    ``evaluator`` re-evaluates the loaded-back model (default: the recipe's test loader and ``evaluate``);
    ``api_factory`` builds the ``HfApi`` that pushes (tests pass a recording stand-in).
    """
    evaluator = evaluator or functools.partial(recipe_evaluator, data_dir=opts.data_dir)
    rel = prepare(run_dir, opts)
    with tempfile.TemporaryDirectory(prefix="timm-svb-publish-") as tmp:
        folder = _out_folder(opts.dry_run, tmp)
        metrics = build_checked_folder(rel, folder, opts, evaluator)
        summary: dict[str, Any] = {
            "repo_id": opts.repo_id,
            "record_name": rel.name,
            "recordable": rel.not_recordable is None,
            "not_recordable_reason": rel.not_recordable,
            "files": sorted(p.name for p in folder.iterdir()),
            "sha256": file_sha256(folder / WEIGHTS_FILENAME),
            "outputs_identical": True,
            "metrics": metrics,
        }
        if opts.dry_run is not None:
            return {**summary, "dry_run": str(folder)}
        return {**summary, **push_and_record(rel, folder, metrics, opts, api_factory)}


def build_parser() -> argparse.ArgumentParser:
    """Command line of ``hub/publish.py``."""
    p = argparse.ArgumentParser(
        prog="hub/publish.py",
        description=(
            "Publish a training run (the run folder of recipes/train.py) as a Hugging Face Hub model repo:\n"
            "model.safetensors + config.json (timm's save_for_hf; never a pickle) + README.md model card\n"
            "(model-index top-1/top-5 error, SVB settings, recipe, citation, spectrum plot).\n\n"
            "Checks before anything is published: the folder is loaded back through timm ('local-dir:') and\n"
            "must give outputs identical to the run's model; it is re-evaluated on the test split when the\n"
            "data is reachable and refused when the errors differ from run.json by more than --tolerance.\n\n"
            "--dry-run OUT_DIR stops there and leaves the folder in OUT_DIR. Otherwise it is uploaded\n"
            "with huggingface_hub in one commit (token from HF_TOKEN or the `hf auth login` cache; never\n"
            "printed or written) and recorded (repo id, commit, sha256 of model.safetensors, metrics) in\n"
            "timm_svb/models/published.json, from which timm.create_model(MODEL.TAG, pretrained=True) loads."
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
        help=f"Hub model repo; only repos of the {HUB_ORG!r} org can be recorded",
    )
    p.add_argument(
        "--dry-run",
        type=Path,
        metavar="OUT_DIR",
        help="build and check the repo folder in OUT_DIR (new or empty) and stop: "
        "no upload, no record, no token needed",
    )
    p.add_argument(
        "--weights",
        choices=("best", "final"),
        default="best",
        help="which weights of the run to publish (default: best)",
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
        help="record file to update (default: the package's timm_svb/models/published.json)",
    )
    p.add_argument(
        "--no-record",
        action="store_true",
        help="push without recording (e.g. to a personal repo outside the org)",
    )
    p.add_argument("--commit-message", help="Hub commit message (default: 'Add MODEL.TAG weights (...)')")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
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
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
