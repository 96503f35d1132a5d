#!/usr/bin/env python3
"""Run a study (every arm x seed of a family of configs), resumably, and report it.

    python recipes/study.py cpu_table1_preact_resnet20 --data-dir ../shared/data/cifar10-jpeg
    python recipes/study.py cpu_fig2_convnet20 --data-dir ../shared/data/cifar10-jpeg --seeds 0 1
    python recipes/study.py cpu_fig2_convnet20 --report          # table.md and curves.png only

A study is the configs ``timm_svb/recipe/configs/<study>_*.yaml`` (one per arm); each arm runs once per
seed, in ``--runs/<study>/<arm>_s<seed>`` (``python -m timm_svb.recipe -c <config> --seed S``, as
``recipes/train.py``; its log in ``train.log`` there).
A run whose record is in ``--results`` (or whose run folder says it finished) is skipped, a stopped one
resumed (``--resume``), so the same command continues a study that was cut short, also in a fresh checkout.
After every finished run, its ``summary.csv``, ``args.yaml`` and ``run.json`` (no weights) are copied to
``--results/<study>/<arm>_s<seed>/`` with ``machine.json`` (the CPU, its cores and torch's threads), and
``--results/<study>/table.md`` (final and best top-1 test error, mean +- std over seeds, epochs, wall time)
and ``curves.png`` (the curves of every run, :mod:`timm_svb.curves`, coloured as Figure 2: blue SGD, red SVB,
black SVB + BBN) are rewritten.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .options import CONFIG_DIR

if TYPE_CHECKING:
    from timm_svb.curves import RunCurves

CONFIGS = CONFIG_DIR
KEPT = ("summary.csv", "args.yaml", "run.json")


def arms(study: str) -> dict[str, Path]:
    """The study's arms: ``{arm: config}`` for ``configs/<study>_<arm>.yaml``."""
    found = {p.stem[len(study) + 1 :]: p for p in sorted(CONFIGS.glob(f"{study}_*.yaml"))}
    if not found:
        known = sorted({p.stem.rsplit("_", 1)[0] for p in CONFIGS.glob("cpu_*.yaml")})
        raise SystemExit(f"no configs timm_svb/recipe/configs/{study}_*.yaml; studies with configs: {known}")
    return found


def run_status(run_dir: Path) -> str | None:
    """``finished``, ``stopped``/``running`` (resumable), or None when the run has not started."""
    record = run_dir / "run.json"
    if not record.is_file():
        return None
    return json.loads(record.read_text(encoding="utf-8")).get("status")


def machine() -> dict[str, object]:
    """What the timings of a run mean: the CPU, its cores, torch's threads, the library versions."""
    import torch  # noqa: PLC0415  (slow import, only when a run finished)

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def train(config: Path, seed: int, run_dir: Path, extra: list[str]) -> None:
    """One arm and seed: a new run, or the stopped one resumed; its output goes to ``run_dir/train.log``."""
    argv = [
        sys.executable,
        "-m",
        "timm_svb.recipe",
        "-c",
        str(config),
        "--seed",
        str(seed),
        "--no-progress",
    ]
    argv += ["--output", str(run_dir)] + (["--resume"] if run_dir.joinpath("checkpoints").is_dir() else [])
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "a", encoding="utf-8") as log:
        print(f"{' '.join(argv + extra)}", file=log, flush=True)
        done = subprocess.run(argv + extra, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        raise SystemExit(f"{run_dir.name} failed (exit {done.returncode}): see {run_dir / 'train.log'}")


def keep(run_dir: Path, result_dir: Path, machine_info: dict[str, object]) -> None:
    """The run's record, without weights, to the results folder."""
    result_dir.mkdir(parents=True, exist_ok=True)
    for name in KEPT:
        shutil.copy2(run_dir / name, result_dir / name)
    (result_dir / "machine.json").write_text(json.dumps(machine_info, indent=2) + "\n", encoding="utf-8")


def _rows(result_dir: Path) -> list[dict[str, str]]:
    with open(result_dir / "summary.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


# Figure 2's colours: blue SGD, red SVB, black SVB + BBN; the seeds of an arm in one colour, their line styles
# differing
METHOD_COLORS = {"no SVB": "tab:blue", "SVB": "tab:red", "SVB + BBN": "black"}
SEED_LINESTYLES = ("-", "--", ":", "-.")


def _method(record: dict[str, Any]) -> str:
    """The method of a run, from its ``run.json``: ``"no SVB"``, ``"SVB"`` or ``"SVB + BBN"``."""
    svb = record.get("svb_config")
    if not svb:
        return "no SVB"
    return "SVB + BBN" if svb.get("bbn_epsilon") is not None else "SVB"


def _record(run: Path) -> dict[str, Any]:
    return json.loads((run / "run.json").read_text(encoding="utf-8"))


def finished_runs(folder: Path) -> list[Path]:
    """The result folders of a study's finished runs (``<arm>_s<seed>``), in Figure 2's order of methods (SGD,
    SVB, SVB + BBN), then by arm and seed."""
    methods = list(METHOD_COLORS)
    runs = sorted(p.parent for p in folder.glob("*/run.json"))
    return sorted(runs, key=lambda run: methods.index(_method(_record(run))))  # stable: arm, seed kept


def study_curves(runs: list[Path]) -> list[RunCurves]:
    """The curves of a study's result folders (``<arm>_s<seed>``), each labelled by its arm and seed and
    coloured as Figure 2 colours its method; an arm's seeds differ in line style."""
    from timm_svb.curves import read_run, svb_setting  # noqa: PLC0415

    curves, seen = [], {}
    for run in runs:
        arm, seed = run.name.rsplit("_s", 1)
        record = _record(run)
        curve = read_run(run, f"{arm}, seed {seed}: {record.get('model', '?')}, {svb_setting(record)}")
        curve.color = METHOD_COLORS[_method(record)]
        curve.linestyle = SEED_LINESTYLES[seen.setdefault(arm, 0) % len(SEED_LINESTYLES)]
        seen[arm] += 1
        curves.append(curve)
    return curves


def report(study: str, results: Path) -> Path:
    """Write ``table.md`` and ``curves.png`` of the finished runs under ``results/<study>``."""
    from timm_svb.curves import curves_figure  # noqa: PLC0415
    from timm_svb.hub.card import data_label  # noqa: PLC0415

    folder = results / study
    runs = finished_runs(folder)
    if not runs:
        raise SystemExit(f"no finished runs under {folder}")
    first = _record(runs[0])
    cores = json.loads((runs[0] / "machine.json").read_text(encoding="utf-8"))["cores"]
    label = f"{data_label(first['dataset'])}, {first['epochs']} epochs, {cores} CPU cores"
    lines = [
        f"# {study}: top-1 test error (%), {label}",
        "",
        "| arm | seeds | epochs | train images | final (mean +- std) | best (mean +- std) "
        "| per seed: final / best | wall time per run (min) | machine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_arm: dict[str, list[Path]] = {}
    for run in runs:
        by_arm.setdefault(run.name.rsplit("_s", 1)[0], []).append(run)
    for arm, arm_runs in by_arm.items():
        finals, bests, minutes, seeds = [], [], [], []
        for run in arm_runs:
            rows = _rows(run)
            errors = [float(r["top1_err"]) for r in rows]
            finals.append(errors[-1])
            bests.append(min(errors))
            minutes.append(sum(float(r["epoch_s"]) for r in rows) / 60)
            seeds.append(run.name.rsplit("_s", 1)[1])
        record = _record(arm_runs[0])
        info = json.loads((arm_runs[0] / "machine.json").read_text(encoding="utf-8"))
        per_seed = ", ".join(f"{f:.2f} / {b:.2f}" for f, b in zip(finals, bests, strict=True))
        lines.append(
            f"| {arm} | {' '.join(seeds)} | {record['completed_epochs']} | "
            f"{record['dataset']['num_train_images']} | {_mean_std(finals)} | {_mean_std(bests)} | "
            f"{per_seed} | {statistics.mean(minutes):.0f} | "
            f"{info['cpu']}, {info['torch_threads']} thread(s) |"
        )
    lines += [
        "",
        "Wall time: the training epochs' own time (summary.csv's epoch_s), without the test passes; runs "
        "that shared the machine with other work are slower than the machine can do.",
    ]
    table = folder / "table.md"
    table.write_text("\n".join(lines) + "\n", encoding="utf-8")
    curves_figure(study_curves(runs), title=f"{study}: {label}").savefig(folder / "curves.png", dpi=120)
    return table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("study", help="config prefix, e.g. cpu_fig2_convnet20 or cpu_table1_preact_resnet20")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds, the same for every arm")
    parser.add_argument("--arms", nargs="+", default=None, help="only these arms (default: all)")
    parser.add_argument("--data-dir", default=None, help="local copy of the data set (passed to train.py)")
    parser.add_argument("--runs", type=Path, default=Path("runs/studies"), help="where the runs train")
    parser.add_argument("--results", type=Path, default=Path("results"), help="where their records go")
    parser.add_argument("--report", action="store_true", help="only rewrite table.md and curves.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    configs = arms(args.study)
    if args.arms:
        unknown = set(args.arms) - set(configs)
        if unknown:
            raise SystemExit(f"unknown arm(s) {sorted(unknown)}; {args.study} has {sorted(configs)}")
        configs = {arm: configs[arm] for arm in args.arms}
    extra += ["--data-dir", args.data_dir] if args.data_dir else []
    if not args.report:
        for seed in args.seeds:  # every arm at a seed before the next seed: a cut-short study stays balanced
            for arm, config in configs.items():
                run_dir = args.runs / args.study / f"{arm}_s{seed}"
                result_dir = args.results / args.study / run_dir.name
                if (result_dir / "run.json").is_file():
                    continue  # finished and kept (on this machine or another): not trained again
                if run_status(run_dir) != "finished":
                    print(f"{run_dir}: training ({config.name}, seed {seed})", flush=True)
                    train(config, seed, run_dir, extra)
                    if run_status(run_dir) != "finished":
                        raise SystemExit(
                            f"{run_dir} stopped before its last epoch: run the same command to resume"
                        )
                if not (result_dir / "run.json").is_file():
                    keep(run_dir, result_dir, machine())
                    print(report(args.study, args.results), flush=True)
    print(report(args.study, args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
