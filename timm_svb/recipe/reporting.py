"""What a run reports as it goes: the console log, ``run.json``, ``summary.csv`` and ``curves.png`` (the
run's files, rewritten after every epoch by :class:`RunReport`), and the trackers of ``--log-with``
(Accelerate's ``init_trackers`` / ``log``)."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import is_tensorboard_available
from torch import nn

from timm_svb.curves import plot_curves
from timm_svb.spectrum import model_spectrum, spectrum_summary

from .loop import RecordingSVB
from .rundir import RunState, write_run_json, write_summary

_logger = logging.getLogger(__name__)


# Where trackers that name runs take --run-name (Accelerate passes init_kwargs[tracker] to each).
RUN_NAME_KWARGS = {"wandb": "name", "mlflow": "run_name", "trackio": "name", "clearml": "task_name"}


class RunReport:
    """``run.json``, ``summary.csv`` and ``curves.png`` of the run, rewritten by the main process as the run
    goes."""

    def __init__(self, run_dir: Path, run: dict[str, Any], state: RunState, is_main: bool) -> None:
        self.run_dir, self.run, self.state, self.is_main = run_dir, run, state, is_main

    def write(self, status: str, completed_epochs: int | None = None) -> None:
        """Record the run's progress with ``status`` (``running``, ``stopped``, ``stopped_max_steps``,
        ``finished``) and its whole epochs (default: those of its rows)."""
        if not self.is_main:
            return
        self.run["status"] = status
        self.run["completed_epochs"] = self.state.epoch if completed_epochs is None else completed_epochs
        # SVB applications so far, which the publisher's model card states (None: no SVB)
        last = self.state.history[-1] if self.state.history else {}
        self.run["svb_applied_total"] = (
            None if self.run["svb_config"] is None else last.get("svb_applied_total", 0)
        )
        self.run["metrics"] = self.state.metrics()
        write_run_json(self.run_dir / "run.json", self.run)
        write_summary(self.run_dir / "summary.csv", self.state.history)
        if self.state.history:  # from the files just written, as timm-svb-curves draws any run
            plot_curves([self.run_dir], self.run_dir / "curves.png", title=f"{self.run_dir.name} ({status})")


def setup_logging(is_main: bool) -> None:
    """The run's log lines (every ``timm_svb.recipe`` logger) on the console: INFO on the main process,
    warnings only on the others."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("timm_svb.recipe").setLevel(logging.INFO if is_main else logging.WARNING)


def trackers(value: str) -> list[str]:
    value = (value or "none").strip().lower()
    if value == "auto":
        return ["tensorboard"] if is_tensorboard_available() else []
    if value in ("none", "", "no"):
        return []
    return [v.strip() for v in value.split(",") if v.strip()]


def flat_hparams(config: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in config.items():
        out[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def log_svb_schedule(svb: RecordingSVB, steps_per_epoch: int, svb_steps: list[int], epochs: int) -> None:
    _logger.info(
        "SVB eps %g, BBN %s: every %d steps (epoch = %d steps), not in the last %d steps of an epoch%s: "
        "%d times in %d epochs",
        svb.epsilon,
        "off" if svb.bbn_epsilon is None else f"eps {svb.bbn_epsilon:g} ({svb.bbn_mode})",
        svb.every_n_steps,
        steps_per_epoch,
        svb.skip_last_steps,
        ", not in the final epoch" if svb.skip_final_epoch else "",
        len(svb_steps),
        epochs,
    )
    if not svb_steps:
        causes = [
            f"--epochs {epochs} ({steps_per_epoch} steps each)",
            f"--svb-every ({svb.every_n_steps} steps)",
        ]
        if svb.skip_last_steps:
            causes.append(f"--svb-skip-last {svb.skip_last_steps}")
        if svb.skip_final_epoch:
            causes.append("--svb-skip-final-epoch (on by default; --no-svb-skip-final-epoch)")
        _logger.warning(
            "SVB is on but its schedule applies it 0 times: this run is plain SGD. The schedule comes from "
            "%s; train more epochs or change those options",
            ", ".join(causes),
        )


def svb_row(svb: RecordingSVB, applied_before: int) -> dict[str, Any]:
    """The SVB columns of an epoch's ``summary.csv`` row: its applications and what the last one saw."""
    stats = svb.last_stats
    return {
        "svb_applied": svb.num_applied - applied_before,
        "svb_applied_total": svb.num_applied,
        "svb_s": svb.seconds,
        "svb_clipped": stats.clipped if stats else None,
        "svb_sv_min": solved_extreme(stats.sv_min) if stats else None,
        "svb_sv_max": solved_extreme(stats.sv_max) if stats else None,
        "bbn_clipped": stats.bn_clipped if stats else None,
    }


def log_epoch(
    args: argparse.Namespace,
    accelerator: Accelerator,
    plain: nn.Module,
    svb: RecordingSVB | None,
    row: dict[str, Any],
    epoch: int,
) -> None:
    """An epoch's row to the trackers (with spectrum statistics every ``--spectrum-every`` epochs) and the
    console."""
    spectrum = {}
    # main process only: the other processes hold the same weights and the trackers live on the main one
    if accelerator.is_main_process and args.spectrum_every and (epoch + 1) % args.spectrum_every == 0:
        spectrum = spectrum_summary(model_spectrum(plain), epsilon=band_epsilon(svb))
    extra = {}
    if svb is not None:
        last = svb.last_stats.to_dict() if svb.last_stats else {}
        extra = {"svb/applied": row["svb_applied"], **last}
    if row["train_top1_err"] is not None:  # not with mixed targets
        extra["train/top1_err"] = row["train_top1_err"]
    if "ema_top1_err" in row:
        extra.update({f"test_ema/{k}": row[f"ema_{k}"] for k in ("top1_err", "top5_err")})
        extra["test_ema/loss"] = row["ema_test_loss"]
    accelerator.log(
        {
            **spectrum,
            "train/loss": row["train_loss"],
            "train/lr": row["lr"],
            "train/images_per_s": row["images_per_s"],
            "test/top1_err": row["top1_err"],
            "test/top5_err": row["top5_err"],
            "test/loss": row["test_loss"],
            **extra,
        },
        step=epoch + 1,
    )
    text = ""
    if "ema_top1_err" in row:
        text += f"  EMA top-1 err {row['ema_top1_err']:.2f}%"
    if svb is not None and row["svb_applied"]:
        text += f"  SVB x{row['svb_applied']} ({describe_svb(svb.last_stats)}, {svb.seconds:.2f}s)"
    _logger.info(
        "epoch %d/%d  lr %.4g  train loss %.4f  test top-1 err %.2f%%  top-5 err %.2f%%  %.0f img/s%s",
        epoch + 1,
        args.epochs,
        row["lr"],
        row["train_loss"],
        row["top1_err"],
        row["top5_err"],
        row["images_per_s"],
        text,
    )


def band_epsilon(svb: Any) -> float:
    """The SVB band drawn in spectrum plots: the run's epsilon, or the paper's 0.5 without SVB."""
    return svb.epsilon if svb is not None else 0.5


def solved_extreme(value: float) -> float | None:
    """``SVBStats.sv_min`` / ``sv_max`` for summary.csv: None (an empty cell) when the certificate proved
    every layer in band, so no solver computed singular values."""
    return None if math.isnan(value) else value


def describe_svb(stats: Any) -> str:
    if stats is None:
        return ""
    text = f"{stats.certified}/{stats.layers} layers certified in band"
    if stats.certified < stats.layers:
        text += f", sv {stats.sv_min:.3f}..{stats.sv_max:.3f} in the others"
    text += f", {stats.clipped} clipped"
    if stats.bn_layers:
        text += f", {stats.bn_clipped} BN scales bounded"
    return text
