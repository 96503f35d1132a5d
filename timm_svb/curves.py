"""Training curves of recipe runs, as in Figure 2 of the SVB paper: training loss and top-1 test error per
epoch, the epochs in which SVB bounded marked, several runs overlaid.

Command line (``timm-svb-curves --help``)::

    python -m timm_svb.curves runs/fig2_convnet20_sgd runs/fig2_convnet20_svb --out fig2.png
    timm-svb-curves runs/fig2_* --out fig2.png --title "ConvNet-20, CIFAR-10"

Python::

    from timm_svb.curves import plot_curves, read_run

    plot_curves(["runs/a", "runs/b"], "fig.png")  # also: curves_figure([read_run("runs/a")]) -> Figure

Only a run folder's ``summary.csv`` (one row per epoch, written by ``recipes/train.py``) and ``run.json`` (the
model and its SVB settings, for the legend) are read, so runs copied from other machines plot without their
weights, checkpoints or data. ``recipes/train.py`` writes each run's own ``curves.png`` with the same code.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .spectrum import MODEL_COLORS, _figure_class, _legend_below, _plot_formats, _unique_labels

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["RunCurves", "curves_figure", "main", "plot_curves", "read_run", "run_label", "svb_setting"]


@dataclass
class RunCurves:
    """The per-epoch series of one run, from its ``summary.csv``."""

    label: str
    epochs: list[int]
    train_loss: list[float]  # NaN where the row has no value
    top1_err: list[float]
    ema_top1_err: list[float] | None  # None: the run kept no EMA
    svb_epochs: list[int]  # epochs in which SVB bounded the model at least once
    color: str | None = None  # None: the next of the default colours
    linestyle: str = "-"


def _number(text: str | None) -> float:
    return float(text) if text not in (None, "") else math.nan


def svb_setting(run: dict[str, Any]) -> str:
    """The SVB/BBN bands of a run from its ``run.json``: ``"no SVB"``, ``"SVB eps 0.5"``,
    ``"SVB eps 0.5 + BBN eps 1"``."""
    svb = run.get("svb_config")
    if not svb:
        return "no SVB"
    setting = f"SVB eps {svb['epsilon']:g}"
    if svb.get("bbn_epsilon") is not None:
        setting += f" + BBN eps {svb['bbn_epsilon']:g}"
    return setting


def run_label(run: dict[str, Any], folder: str = "") -> str:
    """A legend label from ``run.json``: the config (or run folder) name, the model, its SVB/BBN bands."""
    config = (run.get("args") or {}).get("config")
    name = Path(config).stem if config else folder
    return f"{name + ': ' if name else ''}{run.get('model', '?')}, {svb_setting(run)}"


def read_run(run_dir: str | Path, label: str | None = None) -> RunCurves:
    """The curves of a run folder (``summary.csv``, and ``run.json`` for the label when there is one)."""
    run_dir = Path(run_dir)
    summary = run_dir / "summary.csv"
    if not summary.is_file():
        raise FileNotFoundError(f"{summary} not found: RUN must be a run folder of recipes/train.py")
    with open(summary, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if label is None:
        record = run_dir / "run.json"
        run = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
        label = run_label(run, run_dir.resolve().name)
    ema = [_number(r.get("ema_top1_err")) for r in rows]
    return RunCurves(
        label=label,
        epochs=[int(r["epoch"]) for r in rows],
        train_loss=[_number(r["train_loss"]) for r in rows],
        top1_err=[_number(r["top1_err"]) for r in rows],
        ema_top1_err=ema if not all(math.isnan(v) for v in ema) else None,
        svb_epochs=[int(r["epoch"]) for r in rows if r.get("svb_applied") not in (None, "", "0")],
    )


def _isolated(values: Sequence[float]) -> list[int]:
    """Indices of the finite values with no finite neighbour, where a line alone draws nothing (a 1-epoch
    run, or an epoch between missing values)."""
    finite = [math.isfinite(v) for v in values]
    return [
        i
        for i, ok in enumerate(finite)
        if ok and not (i > 0 and finite[i - 1]) and not (i + 1 < len(finite) and finite[i + 1])
    ]


def _line(ax: Any, epochs: list[int], values: list[float], **style: Any) -> None:
    """A run's series as a line, with a dot on each point the line alone would not show."""
    alone = _isolated(values)
    ax.plot(epochs, values, linewidth=1.6, **style, **({"marker": "o", "markevery": alone} if alone else {}))


def curves_figure(runs: Sequence[RunCurves], title: str | None = None) -> Figure:
    """Two panels, training loss and top-1 test error (percent) against epochs, one colour per run (or the
    run's own ``color`` and ``linestyle``); the EMA's test error dashed; triangles mark the epochs in which
    SVB bounded; a dot marks a point without a neighbour (a 1-epoch run). The legend, under the panels,
    takes as many columns as fit. Returns a matplotlib ``Figure`` not registered with pyplot (save it with
    ``fig.savefig``)."""
    if not runs:
        raise ValueError("no runs to plot")
    Figure = _figure_class()
    from matplotlib.ticker import FixedLocator, MaxNLocator  # noqa: PLC0415  (matplotlib is there: _figure_class checked)

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    loss_ax, err_ax = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        color = run.color or MODEL_COLORS[i % len(MODEL_COLORS)]
        for ax, values in ((loss_ax, run.train_loss), (err_ax, run.top1_err)):
            _line(ax, run.epochs, values, color=color, linestyle=run.linestyle, label=run.label)
            marked = [v for e, v in zip(run.epochs, values, strict=True) if e in run.svb_epochs]
            ax.plot(run.svb_epochs, marked, linestyle="none", marker="v", markersize=5, color=color)
        if run.ema_top1_err is not None:
            _line(
                err_ax, run.epochs, run.ema_top1_err, color=color, linestyle="--", label=f"{run.label}, EMA"
            )
    if any(run.svb_epochs for run in runs):
        err_ax.plot([], [], linestyle="none", marker="v", color="0.3", label="SVB applied in the epoch")
    loss_ax.set_title("training loss")
    err_ax.set_title("top-1 test error (%)")
    epochs = sorted({e for run in runs for e in run.epochs})
    for ax in (loss_ax, err_ax):
        ax.set_xlabel("epoch")
        # one epoch in all: the integer locator finds too few integers in the view and ticks at fractions
        ax.xaxis.set_major_locator(MaxNLocator(integer=True) if len(epochs) > 1 else FixedLocator(epochs))
        ax.grid(alpha=0.3)
    _legend_below(fig, *err_ax.get_legend_handles_labels(), max_cols=3)
    fig.suptitle(title or "Training curves")
    return fig


def plot_curves(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Save :func:`curves_figure` of the runs to ``out`` (format from the suffix, e.g. ``.png``)."""
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    runs = [read_run(d, None if labels is None else labels[i]) for i, d in enumerate(run_dirs)]
    for run, label in zip(runs, _unique_labels([r.label for r in runs]), strict=True):
        run.label = label
    out = Path(out)
    curves_figure(runs, title).savefig(out, dpi=dpi)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="timm-svb-curves",
        description=(
            "Overlay the training curves of recipes/train.py runs, as Figure 2 of the SVB paper: training "
            "loss and top-1 test error per epoch (the EMA's dashed), the epochs in which SVB bounded marked, "
            "each run labelled by its config, model and SVB settings. Reads RUN/summary.csv and "
            "RUN/run.json only."
        ),
        epilog="example: timm-svb-curves runs/fig2_convnet20_sgd runs/fig2_convnet20_svb --out fig2.png",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders of recipes/train.py")
    parser.add_argument(
        "--out", type=Path, default=Path("curves.png"), help="plot file (default: curves.png)"
    )
    parser.add_argument("--labels", nargs="+", metavar="LABEL", help="legend labels, one per RUN")
    parser.add_argument("--title", default=None, help="figure title")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``timm-svb-curves`` / ``python -m timm_svb.curves``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        parser.error(f"--labels gives {len(args.labels)} labels for {len(args.runs)} runs")
    try:
        formats = _plot_formats()
    except ImportError as e:
        parser.error(str(e))
    if args.out.suffix.lstrip(".").lower() not in formats:
        parser.error(f"--out {args.out}: the suffix must name a plot format ({', '.join(sorted(formats))})")
    if not args.out.parent.is_dir():
        parser.error(f"output folder {args.out.parent} does not exist")
    try:
        plot_curves(args.runs, args.out, labels=args.labels, title=args.title)
    except (FileNotFoundError, KeyError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"wrote {args.out} ({len(args.runs)} run{'s' if len(args.runs) != 1 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
