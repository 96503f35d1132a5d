"""Mutation check: does the suite catch the bugs its tests are named after?

Run from the repository root (not part of CI: each mutant runs its tests, minutes in all)::

    python tools/mutation.py            # every mutant
    python tools/mutation.py --list     # names and what each breaks
    python tools/mutation.py NAME ...   # some of them

For each mutant, the checkout (tracked files and untracked ones git does not ignore) is copied into a
temporary folder and one deliberate bug is put in, in one of two ways:

- ``patch``: Python run at the start of every interpreter of the test run (a ``sitecustomize`` module on
  ``PYTHONPATH``), so that subprocesses (``torchrun`` workers, recipe runs) see the bug too. It replaces a
  named function or constant, so it survives refactoring as long as the name stays; a patch that no longer
  applies (a name gone) is reported STALE.
- ``edit``: a text replacement in a source file that must match exactly once; if the text has gone, the
  mutant is reported STALE and must be re-made on the new code.

Then the mutant's tests run (``pytest -x``, one thread). KILLED: they failed, as they must. SURVIVED: they
passed with the bug in, a gap in the suite. First, a control run of the same tests without any bug must pass
(a test failing anyway would count as a kill). The exit status is 1 when any mutant survived or is stale, 2
when the control failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    """One deliberate bug and the tests that must catch it."""

    name: str
    breaks: str  # what goes wrong for a user
    tests: tuple[str, ...]  # pytest arguments (node ids, files, -k expressions)
    patch: str = ""  # Python run at interpreter start-up (sitecustomize)
    edits: tuple[tuple[str, str, str], ...] = field(default=())  # (file, old text, new text)


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        name="resume-does-not-load",
        breaks="--resume silently retrains from epoch 0 (accelerator.load_state does nothing)",
        tests=("tests/test_recipe_runs.py::test_resume_gives_the_same_weights",),
        patch="""
            import accelerate
            accelerate.Accelerator.load_state = lambda self, *args, **kwargs: None
        """,
    ),
    Mutant(
        name="sha256-unchecked-for-the-default-tag",
        breaks="create_model('convnet20_svb', pretrained=True) (default tag) loads a tampered file unchecked",
        tests=("tests/test_hub_end_to_end.py::test_pretrained_from_record_on_every_path_with_tamper_checks",),
        patch="""
            import safetensors.torch
            import timm
            from timm_svb.models import _helpers
            checked = _helpers.SafetensorsPretrainedMixin.load_pretrained
            def load_pretrained(self, checkpoint_path):
                arch = self.pretrained_cfg.get("architecture")
                if self.pretrained_cfg.get("tag") != timm.models.get_pretrained_cfg(arch).tag:
                    return checked(self, checkpoint_path)
                cfg = {**self.pretrained_cfg, "state_dict": safetensors.torch.load_file(checkpoint_path)}
                timm.models.load_pretrained(self, {**cfg, "source": None}, self.num_classes, self.in_chans)
            _helpers.SafetensorsPretrainedMixin.load_pretrained = load_pretrained
        """,
    ),
    Mutant(
        name="sha256-never-checked",
        breaks="no recorded file is ever checked against its sha256, on any loading path",
        tests=(
            "tests/test_pretrained.py::test_sha256_is_checked_at_the_recorded_commit_only",
            "tests/test_hub_end_to_end.py::test_pretrained_from_record_on_every_path_with_tamper_checks",
        ),
        patch="""
            import timm_svb.models._pretrained as p
            p.recorded_name = lambda repo_id, commit: None
        """,
    ),
    Mutant(
        name="svd-route-not-written-back",
        breaks="layers on the float64 SVD route (ill-conditioned, rank-deficient) are never bounded",
        tests=("tests/test_svb.py::test_fallback_layers_are_bounded_written_and_reported",),
        patch="""
            import torch
            from timm_svb import _solver as f
            f._svd_clip = lambda a, lo, hi: (a.double(), torch.linalg.svdvals(a.double()).flip(-1))
        """,
    ),
    *(
        Mutant(
            name=f"route-limit-10-to-{limit}",
            breaks=f"the float64-eigh route's condition limit is {limit}, not the measured 10: "
            + ("needless slow routes" if limit < 10 else "the accuracy margin is gone"),
            tests=(
                "tests/test_functional.py::test_route_limits_are_pinned",
                "tests/test_svb.py::test_fallback_layers_are_bounded_written_and_reported",
            ),
            patch=f"""
                import torch
                from timm_svb import _solver as f
                routes = f._ROUTES[torch.float32]
                assert any(limit == 10.0 for _, _, limit in routes), "no route with limit 10 any more"
                f._ROUTES[torch.float32] = tuple((g, e, {limit} if c == 10.0 else c) for g, e, c in routes)
            """,
        )
        for limit in (2.0, 31.5)
    ),
    Mutant(
        name="band-slack-2e-5-to-9e-5",
        breaks="float32 values may stay outside the band by 4.5x more than promised",
        tests=("tests/test_functional.py::test_band_slack_is_the_promised_2e5",),
        patch="""
            import torch
            from timm_svb import functional as f
            assert f.BAND_SLACK[torch.float32] == 2e-5
            f.BAND_SLACK[torch.float32] = 9e-5
        """,
    ),
    Mutant(
        name="certificate-without-rounding-margin",
        breaks="the certificate trusts its rounded Gram: a matrix just outside the band can pass as in band",
        tests=(
            "tests/test_svb_certificate.py::test_just_inside_and_just_outside_each_edge",
            "tests/test_svb_certificate.py::test_never_certifies_a_matrix_a_float64_svd_puts_outside_the_band",
        ),
        patch="""
            from timm_svb import _solver as f
            f._certificate_margin = lambda trace, *args: trace * 0
        """,
    ),
    Mutant(
        name="precision-guard-removed",
        breaks="TF32 / bf16 matmul settings (new or legacy API) and autocast enter the SVB math",
        tests=("tests/test_functional.py::test_engine_math_is_ieee_float32_under_every_precision_setting",),
        patch="""
            import contextlib
            from timm_svb import functional, svb
            # each module that calls it holds its own binding (from ._solver import _full_precision)
            functional._full_precision = svb._full_precision = contextlib.nullcontext
        """,
    ),
    Mutant(
        name="grad-checkpointing-stays-off",
        breaks="model.set_grad_checkpointing() silently leaves activation checkpointing off",
        tests=("tests/test_models.py::test_grad_checkpointing",),
        patch="""
            import timm_svb.models as zoo
            from timm_svb.models import convnet, inception_resnet_v2_preact, preact_resnet
            for module in (convnet, inception_resnet_v2_preact, preact_resnet):
                for obj in vars(module).values():
                    if isinstance(obj, type) and "set_grad_checkpointing" in vars(obj):
                        def off(self, enable=True):
                            self.grad_checkpointing = False
                        obj.set_grad_checkpointing = off
        """,
    ),
    Mutant(
        name="same-seed-on-every-rank",
        breaks="every rank draws the same crops and flips for its share of the data",
        tests=("tests/test_recipe_dist.py",),
        patch="""
            import accelerate.utils
            real = accelerate.utils.set_seed
            def same_everywhere(seed, device_specific=False, deterministic=False):
                return real(seed, device_specific=False, deterministic=deterministic)
            accelerate.utils.set_seed = same_everywhere
        """,
    ),
    Mutant(
        name="bbn-skips-sync-batchnorm",
        breaks="BBN bounds BatchNorm1d/2d/3d only: the SyncBatchNorm layers of --sync-bn are never bounded",
        tests=("tests/test_svb.py::test_bbn_bounds_sync_batchnorm_layers_as_batchnorm",),
        edits=(
            (
                "timm_svb/svb.py",
                "is_bn = with_bn and isinstance(module, _BatchNorm) and module.affine",
                "is_bn = with_bn and isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) "
                "and module.affine",
            ),
        ),
    ),
    Mutant(
        name="subgroup-broadcast-from-group-rank",
        breaks="in a process subgroup of ranks other than 0..n-1, layers are broadcast from the wrong rank",
        tests=(
            "tests/test_svb.py::test_subgroup_with_ranks_not_from_zero_broadcasts_from_each_layers_owner",
        ),
        edits=(
            (
                "timm_svb/svb.py",
                "src=dist.get_global_rank(group, owner) if group is not None else owner, group=group",
                "src=owner, group=group",
            ),
        ),
    ),
    Mutant(
        name="sha256-checked-at-every-commit",
        breaks="the recorded sha256 is applied to every commit of a recorded repo: others fail to load",
        tests=("tests/test_pretrained.py::test_sha256_is_checked_at_the_recorded_commit_only",),
        patch="""
            import timm_svb.models._pretrained as p
            p.recorded_name = lambda repo_id, commit: next(
                (n for n, e in p.PUBLISHED.items() if e["hf_hub_id"] == repo_id), None
            )
        """,
    ),
    Mutant(
        name="resume-forgets-best-ema",
        breaks="a resumed run forgets the EMA's best epoch: a worse EMA overwrites model_best_ema",
        tests=("tests/test_recipe_rundir.py::test_run_state_keeps_the_best_ema_across_a_checkpoint",),
        edits=(
            ("timm_svb/recipe/rundir.py", 'self.best_ema = state.get("best_ema")', "self.best_ema = None"),
        ),
    ),
    Mutant(
        name="ema-steps-restart-each-epoch",
        breaks="the EMA's step count restarts every epoch: the warm-up of its decay repeats",
        tests=("tests/test_recipe_loop.py::test_the_ema_counts_steps_over_the_whole_run",),
        edits=(
            (
                "timm_svb/recipe/loop.py",
                "ema.update(step=epoch * (total or 0) + steps)",
                "ema.update(step=steps)",
            ),
        ),
    ),
    Mutant(
        name="ema-svb-ignores-exclude",
        breaks="the EMA copy's SVB bounds --svb-exclude'd and frozen layers",
        tests=("tests/test_recipe_trainer.py::test_the_emas_svb_leaves_excluded_and_frozen_layers_alone",),
        edits=(
            (
                "timm_svb/recipe/trainer.py",
                "svb.bbn_epsilon, exclude=_svb_exclude(args, copy), bbn_mode",
                "svb.bbn_epsilon, exclude=(), bbn_mode",
            ),
        ),
    ),
    Mutant(
        name="wrapper-prefixes-in-one-order",
        breaks="module. / _orig_mod. are stripped in one fixed order only: DDP around compile keeps a prefix",
        tests=("tests/test_recipe_rundir.py::test_plain_state_dict_drops_wrapper_prefixes",),
        edits=(
            (
                "timm_svb/recipe/rundir.py",
                """    while state:
        prefix = next((p for p in ("_orig_mod.", "module.") if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix) :]: v for k, v in state.items()}
""",
                """    for prefix in ("_orig_mod.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
""",
            ),
        ),
    ),
    Mutant(
        name="mixup-mode-ignored",
        breaks="--mixup-mode is ignored: always batch mode",
        tests=("tests/test_recipe_trainer.py::test_mixup_mode_is_used",),
        edits=(("timm_svb/recipe/trainer.py", "mode=args.mixup_mode,", 'mode="batch",'),),
    ),
    Mutant(
        name="cosine-ignores-warmup-offset",
        breaks="the cosine schedule counts from epoch 0, not the end of warm-up: it starts below the peak",
        tests=("tests/test_recipe_loop.py::test_cosine_schedule_starts_at_the_peak_after_warmup",),
        edits=(
            ("timm_svb/recipe/loop.py", "t = min(e - warmup_epochs, span) / span", "t = min(e, span) / span"),
        ),
    ),
    Mutant(
        name="record-written-without-lock",
        breaks="two publishers writing the record at once lose entries",
        tests=("tests/test_hub_record.py::test_concurrent_record_writes_keep_every_entry",),
        patch="""
            import contextlib
            import filelock
            class NoLock(contextlib.nullcontext):
                def __init__(self, *args, **kwargs):
                    super().__init__()
            filelock.FileLock = NoLock
        """,
    ),
)


def copy_checkout(dest: Path) -> None:
    """Copy the files git knows of (tracked, and untracked but not ignored) into ``dest``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        source = ROOT / name.decode()
        if source.is_file():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def sitecustomize(mutant: Mutant) -> str:
    """The module that puts a ``patch`` mutant into every interpreter of its test run."""
    body = textwrap.dedent(mutant.patch).strip()
    return f"# mutant {mutant.name}: {mutant.breaks}\n{body}\n_MUTANT_APPLIED = True\n"


def apply(mutant: Mutant, tree: Path) -> str | None:
    """Put the mutant into ``tree``; returns why it is stale, or None."""
    for path, old, new in mutant.edits:
        file = tree / path
        text = file.read_text(encoding="utf-8")
        if text.count(old) != 1:
            return f"{path}: the text to replace occurs {text.count(old)} times, not once: {old.strip()!r}"
        file.write_text(text.replace(old, new), encoding="utf-8")
    if mutant.patch:
        (tree / "_mutant").mkdir()
        (tree / "_mutant" / "sitecustomize.py").write_text(sitecustomize(mutant), encoding="utf-8")
        # a patch naming what no longer exists must not pass for a survivor: import it once, strictly
        check = subprocess.run(
            [sys.executable, "-c", "import sitecustomize as s; assert s._MUTANT_APPLIED"],
            cwd=tree,
            env=_env(mutant, tree),
            capture_output=True,
            text=True,
        )
        if check.returncode:
            return f"the patch does not apply: {check.stderr.strip().splitlines()[-1]}"
    return None


def _env(mutant: Mutant, tree: Path) -> dict[str, str]:
    """One thread, and the tree (with the mutant's sitecustomize first) on PYTHONPATH."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    paths = [str(tree / "_mutant")] * bool(mutant.patch) + [str(tree), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def run(mutant: Mutant, timeout: float) -> tuple[str, float, str]:
    """(verdict, seconds, last lines of pytest's output) for one mutant (no bug put in for the control)."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        tree = Path(tmp)
        copy_checkout(tree)
        stale = apply(mutant, tree)
        if stale:
            return "STALE", 0.0, stale
        env = _env(mutant, tree)
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests]
        start = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "TIMEOUT", time.perf_counter() - start, f"the tests ran past {timeout:.0f} s"
        seconds = time.perf_counter() - start
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-3:])
        if done.returncode == 0:
            return "SURVIVED", seconds, tail
        if done.returncode in (1,):
            return "KILLED", seconds, tail
        return f"ERROR (pytest exit {done.returncode})", seconds, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per mutant's tests")
    parser.add_argument(
        "--no-control", action="store_true", help="skip the first run of the chosen tests without any bug"
    )
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in MUTANTS}
    if args.list:
        for m in MUTANTS:
            print(f"{m.name}: {m.breaks}\n    tests: {' '.join(m.tests)}")
        return 0
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"unknown mutant(s) {unknown}; --list shows them")
    chosen = [by_name[n] for n in args.names] if args.names else list(MUTANTS)
    if not args.no_control:
        # a test that fails without the bug would count its mutant as killed: run them all clean first
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        verdict, seconds, tail = run(Mutant("control", "nothing", tests), args.timeout)
        print(
            f"control: the chosen tests without any bug {'pass' if verdict == 'SURVIVED' else 'FAIL'}"
            f" ({seconds:.0f} s)",
            flush=True,
        )
        if verdict != "SURVIVED":
            print(textwrap.indent(tail, "    "))
            return 2
    failed = 0
    for mutant in chosen:
        verdict, seconds, tail = run(mutant, args.timeout)
        failed += verdict != "KILLED"
        print(f"{verdict:9} {mutant.name} ({seconds:.0f} s): {mutant.breaks}", flush=True)
        if verdict != "KILLED":
            print(textwrap.indent(tail, "    "), flush=True)
    print(f"\n{len(chosen) - failed} of {len(chosen)} mutants killed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
