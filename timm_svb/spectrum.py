"""Singular-value spectra of a model's layers, plotted as in Figure 1 of the SVB paper, and a CLI for them.

Python::

    from timm_svb.spectrum import model_spectrum, plot_spectra, layer_rows

    spectrum = model_spectrum(model)  # {layer name: (groups, k) float64 tensor, descending}
    plot_spectra({"SGD": model_spectrum(sgd), "SVB": spectrum}, "spectra.png", epsilon=0.5)
    rows = layer_rows(spectrum, epsilon=0.5)  # min, max, condition number, fraction outside the band

Command line (``timm-svb-spectrum --help``)::

    timm-svb-spectrum preact_resnet20 preact_resnet20_svb --out spectra.png

The layers are the conv and linear layers :class:`timm_svb.SVB` bounds, in module registration order (which
is forward order for the timm_svb and timm models). "Lower", "middle" and "higher" layers are the first,
second and last third of that list; each histogram pools the singular values of all layers of its third
and is normalised to sum to 1, so models of different sizes share one axis.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import math
import sys
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .functional import band, outside_band, singular_values, weight_matrices
from .svb import DEFAULT_LAYER_TYPES, select_layers

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DEPTHS",
    "LayerRow",
    "SpectrumInputError",
    "depth_thirds",
    "layer_rows",
    "layer_shapes",
    "load_model",
    "main",
    "model_spectrum",
    "plot_spectra",
    "spectra_figure",
    "spectrum_by_depth",
    "spectrum_summary",
    "write_csv",
]

DEPTHS = ("lower", "middle", "higher")

# The paper's Figure 1 draws SGD in red and SVB in blue: the first two models get those colours.
MODEL_COLORS = (
    "tab:red",
    "tab:blue",
    "tab:green",
    "tab:orange",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:gray",
    "tab:olive",
    "tab:cyan",
)

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")

CSV_COLUMNS = (
    "model",
    "layer",
    "shape",
    "groups",
    "num_values",
    "min",
    "max",
    "condition_number",
    "fraction_outside_band",
)


class SpectrumInputError(ValueError):
    """A model spec that names no known model, or a checkpoint that cannot be read or does not fit."""


# ---------------------------------------------------------------------------------------------- spectra


def _select_layers(
    model: nn.Module,
    include: Sequence[str] | None,
    exclude: Sequence[str],
    layer_types: tuple[type[nn.Module], ...],
) -> list[tuple[str, torch.Tensor, int]]:
    """``(name, weight, groups)`` of every conv/linear layer, selected as :class:`timm_svb.SVB` does."""
    return [
        (layer.name, layer.module.weight.detach(), int(getattr(layer.module, "groups", 1)))
        for layer in select_layers(model, include, exclude, layer_types, with_bn=False)
    ]


@torch.no_grad()
def model_spectrum(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    layer_types: tuple[type[nn.Module], ...] = DEFAULT_LAYER_TYPES,
) -> dict[str, torch.Tensor]:
    """Singular values of every conv/linear layer of ``model``: ``{name: (groups, min(m, n)) tensor}``.

    Each value is a float64 CPU tensor, descending per group (a grouped conv has one row per group; the
    layer's block-diagonal matrix has their union). Computed on the weights' device with the engine's exact
    route (:func:`timm_svb.functional.singular_values`), one batched call per matrix shape. Layers are in
    module registration order; ``include``/``exclude`` are glob patterns on module names, as for
    :class:`timm_svb.SVB`. A layer whose weight holds NaN/Inf gets NaN values and a warning.
    """
    layers = _select_layers(model, include, exclude, layer_types)
    by_shape: dict[tuple, list[tuple[str, torch.Tensor]]] = defaultdict(list)
    result: dict[str, torch.Tensor] = {}
    for name, weight, groups in layers:
        mats = weight_matrices(weight, groups)
        if not torch.isfinite(weight).all():
            warnings.warn(f"layer {name!r} holds NaN/Inf weights; its spectrum is NaN", RuntimeWarning, 2)
            result[name] = torch.full((groups, min(mats.shape[1:])), math.nan, dtype=torch.float64)
            continue
        by_shape[(tuple(mats.shape[1:]), weight.device)].append((name, mats))
    for (matrix_shape, _), group in by_shape.items():
        stack = torch.cat([mats for _, mats in group])
        values = singular_values(stack.reshape(-1, matrix_shape[1]), groups=stack.shape[0]).cpu()
        start = 0
        for name, mats in group:
            result[name] = values[start : start + mats.shape[0]].clone()
            start += mats.shape[0]
    return {name: result[name] for name, _, _ in layers}


def layer_shapes(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    layer_types: tuple[type[nn.Module], ...] = DEFAULT_LAYER_TYPES,
) -> dict[str, tuple[int, ...]]:
    """Weight shape of every layer :func:`model_spectrum` measures (same selection and order)."""
    return {name: tuple(w.shape) for name, w, _ in _select_layers(model, include, exclude, layer_types)}


# ---------------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class LayerRow:
    """One layer's spectrum in numbers: one CSV row."""

    model: str
    layer: str
    shape: tuple[int, ...] | None
    groups: int
    num_values: int
    min: float
    max: float
    condition_number: float
    fraction_outside_band: float

    def as_csv(self) -> list[str]:
        shape = "x".join(map(str, self.shape)) if self.shape is not None else ""
        return [
            self.model,
            self.layer,
            shape,
            str(self.groups),
            str(self.num_values),
            repr(self.min),
            repr(self.max),
            repr(self.condition_number),
            repr(self.fraction_outside_band),
        ]


def condition_number(values: torch.Tensor) -> float:
    """``max / min`` of the singular values (``inf`` when the smallest is 0, ``nan`` for NaN values)."""
    smallest, largest = float(values.min()), float(values.max())
    if math.isnan(smallest) or math.isnan(largest):
        return math.nan
    return largest / smallest if smallest > 0 else math.inf


def layer_rows(
    spectrum: Mapping[str, torch.Tensor],
    epsilon: float = 0.5,
    *,
    model: str = "",
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> list[LayerRow]:
    """One :class:`LayerRow` per layer of a :func:`model_spectrum` result, in its order.

    Min, max and condition number are over all groups of a layer (the block-diagonal matrix); the fraction
    is of the layer's singular values outside ``[1/(1+epsilon), 1+epsilon]``.
    """
    rows = []
    for name, values in spectrum.items():
        shape = shapes.get(name) if shapes is not None else None
        rows.append(
            LayerRow(
                model=model,
                layer=name,
                shape=tuple(shape) if shape is not None else None,
                groups=values.shape[0] if values.dim() > 1 else 1,
                num_values=values.numel(),
                min=float(values.min()),
                max=float(values.max()),
                condition_number=condition_number(values),
                fraction_outside_band=float(outside_band(values, epsilon).double().mean()),
            )
        )
    return rows


def write_csv(rows: Sequence[LayerRow], path: str | Path) -> Path:
    """Write rows (``CSV_COLUMNS`` header) to ``path``; returns the path."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(row.as_csv() for row in rows)
    return path


def depth_thirds(names: Sequence[str]) -> dict[str, list[str]]:
    """Split layer names (in depth order) into contiguous ``lower``/``middle``/``higher`` thirds."""
    n = len(names)
    bounds = [round(i * n / 3) for i in range(4)]
    return {depth: list(names[bounds[i] : bounds[i + 1]]) for i, depth in enumerate(DEPTHS)}


def spectrum_by_depth(spectrum: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """All singular values of the lower, middle and higher thirds of the layers, as flat float64 tensors.

    Ready for a tracker's histogram (``writer.add_histogram(f"spectrum/{depth}", values, epoch)``).
    Non-finite values are dropped.
    """
    out = {}
    for depth, names in depth_thirds(list(spectrum)).items():
        flat = [spectrum[n].reshape(-1) for n in names]
        values = torch.cat(flat) if flat else torch.empty(0, dtype=torch.float64)
        out[depth] = values[torch.isfinite(values)]
    return out


def spectrum_summary(spectrum: Mapping[str, torch.Tensor], epsilon: float = 0.5) -> dict[str, float]:
    """Scalars for a tracker: extremes, condition numbers and the fraction of values outside the band."""
    rows = layer_rows(spectrum, epsilon)
    values = torch.cat([v.reshape(-1) for v in spectrum.values()])
    conds = torch.tensor([r.condition_number for r in rows], dtype=torch.float64)
    return {
        "spectrum/layers": float(len(rows)),
        "spectrum/sv_min": float(values.min()),
        "spectrum/sv_max": float(values.max()),
        "spectrum/condition_median": float(conds.median()),
        "spectrum/condition_max": float(conds.max()),
        "spectrum/fraction_outside_band": float(outside_band(values, epsilon).double().mean()),
    }


# ---------------------------------------------------------------------------------------------- plotting


def _histogram_edges(panel: Sequence[torch.Tensor], epsilon: float, bins: int, log_x: bool) -> torch.Tensor:
    """Bin edges shared by every model of one panel; the range covers the values and the SVB band."""
    lo, hi = band(epsilon)
    values = torch.cat([v for v in panel if v.numel()] or [torch.tensor([lo, hi], dtype=torch.float64)])
    top = max(float(values.max()), hi) * 1.05
    if log_x:
        positive = values[values > 0]
        bottom = min(float(positive.min()) if positive.numel() else lo, lo) / 1.05
        return torch.logspace(math.log10(bottom), math.log10(top), bins + 1, dtype=torch.float64)
    return torch.linspace(0.0, top, bins + 1, dtype=torch.float64)


def spectra_figure(
    spectra: Mapping[str, Mapping[str, torch.Tensor]],
    epsilon: float = 0.5,
    *,
    bins: int = 50,
    log_x: bool = False,
    log_y: bool = False,
    title: str | None = None,
) -> Figure:
    """Figure 1 of the paper for any models: one panel per depth third, one coloured step histogram per model.

    ``spectra`` maps a model label to its :func:`model_spectrum`. Each histogram is normalised to sum to 1
    (the fraction of that model's singular values in each bin); the grey span is the SVB band. ``log_y``
    shows small bins next to a tall one (an orthogonally initialised model has all its values at 1).
    Returns a matplotlib ``Figure`` that is not registered with pyplot (no global backend is touched; save
    it with ``fig.savefig`` or hand it to a tracker, e.g. TensorBoard's ``add_figure``).
    """
    if not spectra:
        raise ValueError("spectra is empty: give at least one {label: model_spectrum(model)}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    Figure = _figure_class()
    lo, hi = band(epsilon)
    by_depth = {label: spectrum_by_depth(spectrum) for label, spectrum in spectra.items()}
    counts = {label: {d: len(n) for d, n in depth_thirds(list(s)).items()} for label, s in spectra.items()}
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    axes = fig.subplots(1, len(DEPTHS))
    smallest = 1.0
    for ax, depth in zip(axes, DEPTHS, strict=True):
        edges = _histogram_edges([d[depth] for d in by_depth.values()], epsilon, bins, log_x)
        ax.axvspan(
            lo, hi, color="0.88", zorder=0, label=f"SVB band [{lo:.3g}, {hi:.3g}] (epsilon={epsilon:g})"
        )
        for i, (label, depths) in enumerate(by_depth.items()):
            values = depths[depth]
            if not values.numel():
                continue
            smallest = min(smallest, 1 / values.numel())
            hist = torch.histogram(values.clamp(edges[0], edges[-1]), bins=edges).hist / values.numel()
            color = MODEL_COLORS[i % len(MODEL_COLORS)]
            ax.stairs(hist.numpy(), edges.numpy(), color=color, linewidth=1.6, label=label)
        if log_x:
            ax.set_xscale("log")
        layers = sorted({c[depth] for c in counts.values()})
        ax.set_title(f"{depth} layers ({' / '.join(map(str, layers))} layer{'s' if layers[-1] != 1 else ''})")
        ax.set_xlabel("singular value")
    for ax in axes:
        if log_y:
            ax.set_yscale("log")
            ax.set_ylim(smallest / 2, 1.5)
        else:
            ax.set_ylim(0, None)
    axes[0].set_ylabel("fraction of singular values" + (" (log scale)" if log_y else ""))
    _legend_below(fig, *axes[0].get_legend_handles_labels(), max_cols=4)
    fig.suptitle(title or "Normalised singular-value histograms")
    return fig


def plot_spectra(
    spectra: Mapping[str, Mapping[str, torch.Tensor]],
    path: str | Path,
    epsilon: float = 0.5,
    *,
    bins: int = 50,
    log_x: bool = False,
    log_y: bool = False,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Save :func:`spectra_figure` to ``path`` (format from the suffix, e.g. ``.png``); returns the path."""
    path = Path(path)
    fig = spectra_figure(spectra, epsilon, bins=bins, log_x=log_x, log_y=log_y, title=title)
    fig.savefig(path, dpi=dpi)
    return path


def _figure_class() -> type[Figure]:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "plotting spectra needs matplotlib: pip install matplotlib (or timm-svb[dev])"
        ) from e
    return Figure


def _legend_below(fig: Figure, handles: Sequence[Any], names: Sequence[str], max_cols: int) -> None:
    """The figure's legend under its axes, in the most columns (up to ``max_cols``) that fit its width
    (long labels, config, model and SVB settings, in fixed columns ran off both sides); the figure grows by
    the rows beyond the first, so that the axes keep their height."""
    for ncols in range(max(1, min(len(names), max_cols)), 0, -1):
        legend = fig.legend(handles, names, loc="outside lower center", ncols=ncols, frameon=False)
        extent = legend.get_window_extent()
        if ncols == 1 or extent.width <= fig.bbox.width:
            break
        legend.remove()
    rows = -(-len(names) // ncols)
    fig.set_figheight(fig.get_figheight() + extent.height / fig.dpi * (rows - 1) / max(rows, 1))


def _plot_formats() -> set[str]:
    """File suffixes matplotlib can save to (``png``, ``pdf``, ``svg``, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return set(FigureCanvasBase.get_supported_filetypes())


# ---------------------------------------------------------------------------------------------- loading


def load_model(spec: str, pretrained: bool = False) -> nn.Module:
    """Build the model a CLI argument names; raise :class:`SpectrumInputError` with the reason if it cannot.

    ``spec`` is one of: a timm model name (``preact_resnet20``, ``resnet18.a1_in1k``; random weights unless
    ``pretrained``); ``hf-hub:org/repo`` or ``local-dir:path`` (weights always loaded); a folder written by
    ``timm.models.save_for_hf``; ``ARCH=path/to/checkpoint.safetensors`` (timm architecture and a state
    dict; ``.pth``/``.pt``/``.bin`` files work too); or a checkpoint path alone when a ``config.json`` with
    an ``architecture`` lies beside it.
    """
    if spec.startswith(("hf-hub:", "local-dir:")):
        return _create(spec, pretrained=True)
    arch, sep, file = spec.partition("=")
    if sep:
        if not arch:
            raise SpectrumInputError(f"{spec!r}: name the architecture before '=': preact_resnet20={file}")
        _check_name(arch)
        return _from_checkpoint(arch, Path(file))
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SpectrumInputError(f"{spec}: a folder, but without the config.json of timm's save_for_hf")
        return _create(f"local-dir:{path}", pretrained=True)
    if path.suffix in CHECKPOINT_SUFFIXES or "/" in spec or path.exists():
        if not path.is_file():
            raise SpectrumInputError(f"{spec}: no such file")
        return _from_checkpoint(_architecture_beside(path), path)
    _check_name(spec)
    try:
        return _create(spec, pretrained=pretrained)
    except SpectrumInputError as e:
        if not pretrained:
            raise
        raise SpectrumInputError(
            f"{e} -- for weights of your own, give ARCH=CHECKPOINT or a save_for_hf folder instead"
        ) from e


def _check_name(name: str) -> None:
    """Raise for a name timm does not know, suggesting close matches."""
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"
    raise SpectrumInputError(f"unknown model {name!r}{hint}")


def _create(name: str, **kwargs: object) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, **kwargs)
    except SpectrumInputError:
        raise
    except Exception as e:  # timm / huggingface_hub / torch raise many kinds; all mean "cannot load"
        raise SpectrumInputError(f"cannot load {name!r}: {type(e).__name__}: {_short(e)}") from e


def _architecture_beside(path: Path) -> str:
    """The ``architecture`` of the ``config.json`` next to a checkpoint (timm's save_for_hf layout)."""
    config = path.parent / "config.json"
    try:
        arch = json.loads(config.read_text(encoding="utf-8")).get("architecture")
    except (OSError, ValueError, AttributeError):
        arch = None
    if not isinstance(arch, str):
        raise SpectrumInputError(
            f"{path}: cannot tell its architecture (no config.json with 'architecture' beside it); "
            f"write ARCH={path}, e.g. preact_resnet20_svb={path}"
        )
    _check_name(arch)
    return arch


def _from_checkpoint(arch: str, path: Path) -> nn.Module:
    """``arch`` with the state dict of ``path``; the classifier is sized from the checkpoint."""
    from timm.models import load_state_dict

    if not path.is_file():
        raise SpectrumInputError(f"{path}: no such file")
    try:
        state_dict = load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as e:  # safetensors / pickle errors for truncated or foreign files
        raise SpectrumInputError(f"cannot read checkpoint {path}: {type(e).__name__}: {_short(e)}") from e
    model = _create(arch)
    classifier = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    head = state_dict.get(f"{classifier}.weight") if isinstance(classifier, str) else None
    if isinstance(head, torch.Tensor) and head.shape[0] != getattr(model, "num_classes", head.shape[0]):
        model = _create(arch, num_classes=head.shape[0])
    try:
        model.load_state_dict(state_dict)
    except Exception as e:
        raise SpectrumInputError(f"{path} does not fit {arch}: {_short(e)}") from e
    return model


def _short(error: BaseException, limit: int = 400) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- CLI


def _unique_labels(labels: Sequence[str]) -> list[str]:
    out, seen = [], defaultdict(int)
    for label in labels:
        seen[label] += 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def _format_summary(label: str, rows: Sequence[LayerRow], epsilon: float) -> str:
    values = sum(r.num_values for r in rows)
    outside = sum(r.fraction_outside_band * r.num_values for r in rows) / values
    conds = sorted(r.condition_number for r in rows)
    worst = max(rows, key=lambda r: (not math.isnan(r.condition_number), r.condition_number))
    lo, hi = band(epsilon)
    return (
        f"{label}: {len(rows)} layers, {values} singular values in "
        f"[{min(r.min for r in rows):.4g}, {max(r.max for r in rows):.4g}]; condition number median "
        f"{conds[len(conds) // 2]:.4g}, max {worst.condition_number:.4g} ({worst.layer}); "
        f"{100 * outside:.1f}% outside the SVB band [{lo:.4g}, {hi:.4g}]"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="timm-svb-spectrum",
        description=(
            "Plot normalised singular-value histograms of the lower, middle and higher conv/linear layers of "
            "one or more models (one colour per model, as Figure 1 of the SVB paper), write per-layer "
            "statistics to a CSV and print a summary."
        ),
        epilog=(
            "MODEL is a timm name (preact_resnet20, resnet18.a1_in1k; random weights unless --pretrained), "
            "hf-hub:ORG/REPO, local-dir:PATH, a folder saved by timm's save_for_hf, ARCH=CHECKPOINT "
            "(.safetensors, .pth, .pt, .bin), or CHECKPOINT alone when a config.json naming the architecture "
            "lies beside it. Example: timm-svb-spectrum preact_resnet20 preact_resnet20_svb --out spectra.png"
        ),
    )
    parser.add_argument("models", nargs="+", metavar="MODEL", help="models to compare (see below)")
    parser.add_argument(
        "--pretrained", action="store_true", help="load pretrained weights for timm model names"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("spectra.png"), help="plot file (default: spectra.png)"
    )
    parser.add_argument(
        "--csv", type=Path, default=None, help="per-layer CSV (default: --out with suffix .csv)"
    )
    parser.add_argument(
        "--epsilon", type=float, default=0.5, help="SVB band [1/(1+eps), 1+eps] (default: 0.5)"
    )
    parser.add_argument("--bins", type=int, default=50, help="histogram bins per panel (default: 50)")
    parser.add_argument("--log-x", action="store_true", help="logarithmic singular-value axis")
    parser.add_argument("--log-y", action="store_true", help="logarithmic fraction axis")
    parser.add_argument(
        "--labels", nargs="+", metavar="LABEL", help="legend labels, one per MODEL (default: MODEL)"
    )
    parser.add_argument(
        "--include", action="append", metavar="GLOB", help="only layers whose name matches (repeatable)"
    )
    parser.add_argument(
        "--exclude", action="append", default=[], metavar="GLOB", help="skip matching layers (repeatable)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for randomly initialised models (default: 0)"
    )
    parser.add_argument("--device", default="cpu", help="device for the computation (default: cpu)")
    parser.add_argument("--title", default=None, help="figure title")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``timm-svb-spectrum`` / ``python -m timm_svb.spectrum``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.models):
        parser.error(f"--labels gives {len(args.labels)} labels for {len(args.models)} models")
    if args.bins < 1:
        parser.error(f"--bins must be >= 1, got {args.bins}")
    try:
        band(args.epsilon)
    except ValueError as e:
        parser.error(str(e))
    csv_path = args.csv if args.csv is not None else args.out.with_suffix(".csv")
    for out in (args.out, csv_path):
        if not out.parent.is_dir():
            parser.error(f"output folder {out.parent} does not exist")
    try:
        _figure_class()
        device = torch.device(args.device)
    except (ImportError, RuntimeError) as e:
        parser.error(str(e))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")
    formats = _plot_formats()
    if args.out.suffix.lstrip(".").lower() not in formats:
        parser.error(f"--out {args.out}: the suffix must name a plot format ({', '.join(sorted(formats))})")

    labels = _unique_labels(args.labels or args.models)
    spectra, rows = {}, []
    for spec, label in zip(args.models, labels, strict=True):
        torch.manual_seed(args.seed)
        try:
            model = load_model(spec, pretrained=args.pretrained).to(device)
            selection = dict(include=args.include, exclude=args.exclude)
            spectrum = model_spectrum(model, **selection)
        except (SpectrumInputError, ValueError) as e:
            parser.exit(2, f"{parser.prog}: error: {e}\n")
        spectra[label] = spectrum
        model_rows = layer_rows(spectrum, args.epsilon, model=label, shapes=layer_shapes(model, **selection))
        rows.extend(model_rows)
        print(_format_summary(label, model_rows, args.epsilon))
    try:
        plot_spectra(
            spectra,
            args.out,
            args.epsilon,
            bins=args.bins,
            log_x=args.log_x,
            log_y=args.log_y,
            title=args.title,
        )
        write_csv(rows, csv_path)
    except OSError as e:
        parser.exit(2, f"{parser.prog}: error: cannot write the outputs: {e}\n")
    print(f"wrote {args.out} and {csv_path} ({len(rows)} layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
