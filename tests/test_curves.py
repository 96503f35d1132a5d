"""timm_svb.curves: Figure-2 style curves of run folders, from their summary.csv and run.json only."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from timm_svb import curves

# every test draws figures with matplotlib (a second or more each)
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
FIELDS = (
    "epoch",
    "lr",
    "train_loss",
    "train_top1_err",
    "top1_err",
    "top5_err",
    "svb_applied",
    "ema_top1_err",
)


def write_run(folder: Path, rows: list[dict], run: dict) -> Path:
    """A run folder as copied from another machine: summary.csv and run.json, nothing else."""
    folder.mkdir(parents=True)
    with open(folder / "summary.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (folder / "run.json").write_text(json.dumps(run), encoding="utf-8")
    return folder


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    sgd_rows = [
        {
            "epoch": e,
            "train_loss": f"{2.3 / e + rng.random():.6g}",
            "top1_err": f"{60 / e + rng.random():.6g}",
        }
        for e in range(1, 7)
    ]
    svb_rows = [
        {
            "epoch": e,
            "train_loss": f"{2.0 / e + rng.random():.6g}",
            "top1_err": f"{50 / e + rng.random():.6g}",
            "svb_applied": 0 if e in (3, 6) else 1,  # skipped in epoch 3 and in the final one
            "ema_top1_err": f"{55 / e:.6g}",
        }
        for e in range(1, 7)
    ]
    sgd = write_run(
        tmp_path / "a",
        sgd_rows,
        {"model": "convnet20", "svb_config": None, "args": {"config": "fig2_convnet20_sgd"}},
    )
    svb = write_run(
        tmp_path / "b",
        svb_rows,
        {
            "model": "convnet20_svb",
            "svb_config": {"epsilon": 0.05, "bbn_epsilon": 1.0, "every_n_steps": 391},
            "args": {"config": "timm_svb/recipe/configs/fig2_convnet20_svb_bbn.yaml"},
        },
    )
    return sgd, svb


def csv_column(run_dir: Path, column: str) -> list[float]:
    with open(run_dir / "summary.csv", encoding="utf-8") as f:
        return [float(r[column]) if r.get(column) else math.nan for r in csv.DictReader(f)]


def test_two_runs_plot_their_summary_values(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    """The lines of the figure hold exactly the values of each run's summary.csv; labels name the config,
    model and SVB settings; SVB epochs are marked on both panels; the EMA's error is dashed."""
    sgd, svb = two_runs
    runs = [curves.read_run(sgd), curves.read_run(svb)]
    assert runs[0].label == "fig2_convnet20_sgd: convnet20, no SVB"
    assert runs[1].label == "fig2_convnet20_svb_bbn: convnet20_svb, SVB eps 0.05 + BBN eps 1"
    fig = curves.curves_figure(runs)
    loss_ax, err_ax = fig.axes
    for ax, column in ((loss_ax, "train_loss"), (err_ax, "top1_err")):
        lines = {line.get_label(): line for line in ax.get_lines()}
        for run_dir, run in zip((sgd, svb), runs, strict=True):
            line = lines[run.label]
            assert list(line.get_xdata()) == list(range(1, 7))
            assert list(line.get_ydata()) == csv_column(run_dir, column)
        markers = [line for line in ax.get_lines() if line.get_marker() == "v" and len(line.get_xdata())]
        assert len(markers) == 1  # the SVB run only
        assert list(markers[0].get_xdata()) == [1, 2, 4, 5]
        assert list(markers[0].get_ydata()) == [csv_column(svb, column)[e - 1] for e in (1, 2, 4, 5)]
    ema = next(line for line in err_ax.get_lines() if line.get_label().endswith(", EMA"))
    assert ema.get_linestyle() == "--" and list(ema.get_ydata()) == csv_column(svb, "ema_top1_err")
    assert not any(
        line.get_label().startswith("fig2_convnet20_sgd") and "EMA" in line.get_label()
        for line in err_ax.get_lines()
    )

    out = curves.plot_curves([sgd, svb], tmp_path / "fig.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as image:
        assert image.size[0] > 600 and image.size[1] > 300


def test_command_line(two_runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sgd, svb = two_runs
    assert curves.main([str(sgd), str(svb), "--out", str(tmp_path / "fig.png"), "--title", "Figure 2"]) == 0
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        curves.main([str(sgd), "--out", str(tmp_path / "fig.nope")])
    with pytest.raises(SystemExit):
        curves.main([str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit):
        curves.main([str(sgd), str(svb), "--labels", "one"])
    # the same label twice is told apart; installed as a console script
    same = curves.plot_curves([sgd, sgd], tmp_path / "same.png")
    assert same.is_file()
    assert 'timm-svb-curves = "timm_svb.curves:main"' in (REPO / "pyproject.toml").read_text()


def rendered(fig) -> np.ndarray:
    """The figure's pixels (RGBA rows, top row first), drawn as savefig would."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())


def pixels_of(image: np.ndarray, box, color: str) -> int:
    """How many pixels within ``box`` (display coordinates, origin bottom left) are ``color``."""
    from matplotlib.colors import to_rgba_array  # noqa: PLC0415

    target = (to_rgba_array(color)[0, :3] * 255).round()
    height = image.shape[0]
    area = image[height - int(box.y1) : height - int(box.y0), int(box.x0) : int(box.x1), :3]
    return int((np.abs(area.astype(int) - target).max(-1) <= 8).sum())


def test_a_one_epoch_run_is_drawn(tmp_path: Path) -> None:
    """A single point has no line to draw: it gets a dot, on both panels, and the epoch axis ticks at 1
    (not at fractions of an epoch)."""
    one = write_run(tmp_path / "one", [{"epoch": 1, "train_loss": "2.1", "top1_err": "80"}], {"model": "m"})
    fig = curves.curves_figure([curves.read_run(one)])
    image = rendered(fig)
    for ax in fig.axes:
        assert pixels_of(image, ax.get_window_extent(), curves.MODEL_COLORS[0]) > 10
        assert list(ax.get_xticks()) == [1]
    # a value between missing ones is marked too; values with a neighbour are left to the line
    assert curves._isolated([math.nan, 1.0, math.nan, 2.0, 3.0]) == [1]


def test_the_legend_of_three_runs_stays_inside_the_figure(
    two_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    """Three runs with long labels (config, model, SVB settings, and their EMA): the legend is under the
    panels, within the figure's width, and the panels keep the height they have with one run."""
    sgd, svb = two_runs
    third = write_run(
        tmp_path / "c",
        [{"epoch": e, "train_loss": "1", "top1_err": "9", "ema_top1_err": "8"} for e in range(1, 7)],
        {
            "model": "preact_resnet20_svb",
            "svb_config": {"epsilon": 0.5, "bbn_epsilon": 0.2},
            "args": {"config": "timm_svb/recipe/configs/table1_preact_resnet20_svb_bbn_cifar10.yaml"},
        },
    )
    runs = [curves.read_run(d) for d in (sgd, svb, third)]
    fig = curves.curves_figure(runs)
    rendered(fig)
    legend = fig.legends[0].get_window_extent()
    assert 0 <= legend.x0 and legend.x1 <= fig.bbox.width and 0 <= legend.y0
    assert all(legend.y1 <= ax.get_window_extent().y0 for ax in fig.axes)
    alone = curves.curves_figure(runs[:1])
    rendered(alone)
    assert fig.axes[0].get_window_extent().height >= 0.9 * alone.axes[0].get_window_extent().height
