"""The SVB/BBN plugin: bound a model now (:meth:`SVB.apply`) or after optimizer steps (:meth:`SVB.attach`)."""

from __future__ import annotations

import fnmatch
import math
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from ._solver import _certify_parts, _full_precision, _index, _oriented, _solve, _take
from .functional import (
    band,
    band_slack,
    bbn_alpha,
    bbn_gamma,
    bbn_ratio,
    check_epsilon,
    weight_matrices,
)

__all__ = ["SVB", "LayerStats", "SVBStats", "NonFiniteWeightError", "SVBError", "DEFAULT_LAYER_TYPES"]

DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

# Columns of the per-layer statistics table (host memory) that ranks sum-reduce: every rank fills only its
# own rows.
_MIN, _MAX, _CLIPPED, _NONFINITE, _FALLBACK, _DEGENERATE, _ERROR, _CERTIFIED = range(8)
_COLUMNS = 8
# Bytes of each rank's error message that reach the other ranks.
_MESSAGE_BYTES = 1024


class NonFiniteWeightError(ValueError):
    """A weight (or a BN layer's gamma / running variance) holds NaN or Inf; nothing was written back."""


class SVBError(RuntimeError):
    """Bounding raised on some rank: every rank raises this (naming the rank and layers); nothing written."""


@dataclass
class LayerStats:
    """What :meth:`SVB.apply` saw and did in one layer.

    For a conv/linear layer ``certified`` means the certificate proved every singular value in band, so
    no solver ran and nothing changed; then ``sv_min``/``sv_max`` are NaN (not computed). Otherwise they
    are its extreme singular values before bounding (over the groups the solver saw) and ``clipped``
    counts the singular values moved into the band; ``fallback`` is True if a float64 route was needed
    (condition number beyond the float32 Gram's limit) and ``degenerate`` if a weight matrix (of some
    group) is all zero and was left as it is. For a BN layer they are the extremes of the ratio
    ``gamma / (sigma * alpha)`` (``gamma / mean(gamma)`` in "rel" mode) and ``clipped`` counts the gammas
    changed; ``degenerate`` means ``alpha <= 0`` (the layer was left as it is, ratios NaN). ``skipped``
    means NaN/Inf (nothing was written).
    """

    kind: str
    sv_min: float
    sv_max: float
    clipped: int
    fallback: bool = False
    skipped: bool = False
    degenerate: bool = False
    certified: bool = False


@dataclass
class SVBStats:
    """Summary of one :meth:`SVB.apply`; ``per_layer`` is filled when asked for.

    ``certified`` counts the conv/linear layers proved in band without a solver; ``sv_min``/``sv_max`` are
    the extremes over the layers the solver saw (NaN if it saw none). ``skipped`` names the layers left
    alone for NaN/Inf, ``degenerate`` those left alone because there was nothing to bound (an all-zero
    weight matrix, BN gammas averaging to <= 0).
    """

    layers: int
    clipped: int
    sv_min: float
    sv_max: float
    bn_layers: int = 0
    bn_clipped: int = 0
    certified: int = 0
    skipped: list[str] = field(default_factory=list)
    degenerate: list[str] = field(default_factory=list)
    per_layer: dict[str, LayerStats] | None = None

    def to_dict(self) -> dict[str, float]:
        """Flat scalars for a logger / tracker."""
        return {
            "svb/layers": self.layers,
            "svb/clipped": self.clipped,
            "svb/sv_min": self.sv_min,
            "svb/sv_max": self.sv_max,
            "svb/certified": self.certified,
            "bbn/layers": self.bn_layers,
            "bbn/clipped": self.bn_clipped,
            "svb/skipped": len(self.skipped),
            "svb/degenerate": len(self.degenerate),
        }


@dataclass
class _Layer:
    name: str
    module: nn.Module
    kind: str  # "weight" or "bn"
    cost: float


class SVB:
    """Singular Value Bounding (and optionally Bounded Batch Normalization) for any torch model.

    ``SVB(model).apply()`` clips every singular value of every conv/linear weight matrix (per group) to
    ``[1/(1+epsilon), 1+epsilon]`` and, when ``bbn_epsilon`` is given, bounds every BatchNorm scale by
    Algorithm 2. ``attach(optimizer)`` does it after every ``every_n_steps`` real optimizer steps.

    Args:
        model: the model whose layers are bounded; DDP and ``torch.compile`` wrappers are fine (layer names,
            in patterns and statistics, are those of the unwrapped model). Sharded parameters (FSDP, DTensor)
            are refused: use DDP.
        epsilon: SVB band half-width; the paper uses 0.5 (the reference code's factor 1.5).
        bbn_epsilon: BBN band; ``None`` leaves BatchNorm alone. The paper uses 1.0 (0.2 in Table 3).
        every_n_steps: apply after every this many real optimizer steps; defaults to ``steps_per_epoch``.
        steps_per_epoch: optimizer steps in one epoch; needed by the two epoch rules below.
        skip_last_steps: do not apply in the last this many steps of an epoch (the reference code: 100).
        num_epochs: length of training in epochs; with ``skip_final_epoch``, no SVB in the final one.
        skip_final_epoch: do not apply during the final epoch (the reference code does this).
        include: glob patterns of module names to bound (``None``: all).
        exclude: glob patterns of module names to leave alone, e.g. ``("fc", "head.*")``.
        layer_types: module types whose ``weight`` is bounded.
        bbn_mode: ``"sigma"`` (Algorithm 2; needs BN running statistics) or ``"rel"`` (the reference code's
            simpler mode).
        on_nonfinite: ``"raise"`` (a weight with NaN/Inf raises and nothing is written) or ``"warn"``
            (that layer is skipped with a warning, the others are bounded).
        process_group: ``torch.distributed`` group to shard the work over (default: the world, when
            initialised). Each rank bounds its share, then the changed layers are broadcast, so every rank
            ends with bitwise identical weights. :meth:`apply` is then a collective.
        certify: prove in-band layers in band with one Cholesky factorisation per shape instead of solving
            them (default). ``False`` solves every layer, so the statistics hold every layer's extreme
            singular values (at several times the cost between applies).
    """

    def __init__(
        self,
        model: nn.Module,
        epsilon: float = 0.5,
        bbn_epsilon: float | None = None,
        every_n_steps: int | None = None,
        *,
        steps_per_epoch: int | None = None,
        skip_last_steps: int = 0,
        num_epochs: int | None = None,
        skip_final_epoch: bool = False,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        layer_types: tuple[type[nn.Module], ...] = DEFAULT_LAYER_TYPES,
        bbn_mode: str = "sigma",
        on_nonfinite: str = "raise",
        process_group: Any = None,
        certify: bool = True,
    ) -> None:
        self.epsilon = check_epsilon(epsilon, "epsilon")
        self.bbn_epsilon = None if bbn_epsilon is None else check_epsilon(bbn_epsilon, "bbn_epsilon")
        self.steps_per_epoch = _check_count(steps_per_epoch, "steps_per_epoch", allow_none=True)
        if every_n_steps is None:
            every_n_steps = self.steps_per_epoch
        self.every_n_steps = _check_count(every_n_steps, "every_n_steps", allow_none=True)
        self.skip_last_steps = _check_count(skip_last_steps, "skip_last_steps", minimum=0)
        self.num_epochs = _check_count(num_epochs, "num_epochs", allow_none=True)
        self.skip_final_epoch = bool(skip_final_epoch)
        if self.skip_last_steps and self.steps_per_epoch is None:
            raise ValueError("skip_last_steps needs steps_per_epoch")
        if self.skip_final_epoch and (self.steps_per_epoch is None or self.num_epochs is None):
            raise ValueError("skip_final_epoch needs steps_per_epoch and num_epochs")
        if bbn_mode not in ("sigma", "rel"):
            raise ValueError(f"bbn_mode must be 'sigma' or 'rel', got {bbn_mode!r}")
        if on_nonfinite not in ("raise", "warn"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'warn', got {on_nonfinite!r}")
        self.bbn_mode = bbn_mode
        self.on_nonfinite = on_nonfinite
        self.process_group = process_group
        self.certify = bool(certify)
        self.model = model
        _refuse_sharded(model)
        self.layers = select_layers(model, include, exclude, layer_types, self.bbn_epsilon is not None)
        if bbn_mode == "sigma":
            for layer in self.layers:
                if layer.kind == "bn" and layer.module.running_var is None:
                    raise ValueError(
                        f"BatchNorm {layer.name!r} keeps no running statistics (track_running_stats=False), "
                        "which bbn_mode='sigma' (Algorithm 2) needs: use bbn_mode='rel' or exclude the layer"
                    )
        self._steps = 0  # optimizer steps seen by the hook, less the skipped ones settled so far
        self._skipped: torch.Tensor | None = None  # steps a fused optimizer skipped, not yet read back
        self._handle: RemovableHandle | None = None
        self.num_applied = 0  # times the hook applied SVB

    @classmethod
    def from_model(cls, model: nn.Module, **overrides: Any) -> SVB:
        """Build the plugin from ``model.svb_config`` (set by the ``*_svb`` models), with overrides."""
        config = getattr(_unwrap(model), "svb_config", None)
        if config is None:
            raise ValueError(
                f"{type(model).__name__} has no svb_config (only the timm_svb '*_svb' models carry one); "
                "build the plugin directly: SVB(model, epsilon=..., bbn_epsilon=...)"
            )
        return cls(model, **{**config, **overrides})

    # ------------------------------------------------------------------ schedule

    @property
    def step(self) -> int:
        """Real optimizer steps seen by the hook (steps a ``GradScaler`` skipped are not counted)."""
        self._settle_skipped()
        return self._steps

    @step.setter
    def step(self, value: int) -> None:
        self._steps, self._skipped = int(value), None

    def should_apply(self, step: int) -> bool:
        """Whether the schedule bounds after real optimizer step number ``step`` (1-based)."""
        if self.every_n_steps is None or step % self.every_n_steps:
            return False
        if self.steps_per_epoch is not None:
            epoch, position = divmod(step - 1, self.steps_per_epoch)
            if position >= self.steps_per_epoch - self.skip_last_steps:
                return False
            if self.skip_final_epoch and epoch >= self.num_epochs - 1:
                return False
        return True

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Bound after every ``every_n_steps`` real steps of ``optimizer``; returns a removable handle.

        The hook sits on the innermost torch optimizer, so an Accelerate ``AcceleratedOptimizer`` step that
        only accumulates gradients, or a ``GradScaler`` step skipped for inf/NaN gradients, is not counted
        (also with ``fused=True`` optimizers, whose skipped steps still run ``step()``). One SVB counts one
        optimizer: attaching it again while attached raises (``handle.remove()`` first).
        """
        if self.every_n_steps is None:
            raise ValueError("attach() needs every_n_steps (or steps_per_epoch for once an epoch)")
        if self._handle is not None and self._handle.id in (self._handle.hooks_dict_ref() or {}):
            raise RuntimeError(
                "this SVB is already attached to an optimizer, and would count every step twice: remove "
                "the first hook (handle.remove()) or build one SVB per optimizer"
            )
        inner = optimizer
        while not _has_step_hooks(inner) and isinstance(
            getattr(inner, "optimizer", None), torch.optim.Optimizer
        ):
            inner = inner.optimizer
        if not _has_step_hooks(inner):
            raise TypeError(f"{type(optimizer).__name__} is not a torch.optim.Optimizer with step hooks")
        self._handle = inner.register_step_post_hook(self._after_step)
        return self._handle

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # GradScaler hands a step with inf/NaN gradients to an optimizer that unscales itself (fused=True)
        # with found_inf set; that step changed nothing. Tallied on the device, read back only when the
        # schedule may fire, so the hook adds no host sync to other steps.
        found_inf = getattr(optimizer, "found_inf", None)
        if isinstance(found_inf, torch.Tensor):
            skipped = (found_inf > 0).to(torch.int64)
            self._skipped = skipped if self._skipped is None else self._skipped + skipped
        self._steps += 1
        if self._steps % self.every_n_steps:
            return
        self._settle_skipped()
        if self.should_apply(self._steps):
            self.apply()
            self.num_applied += 1

    def _settle_skipped(self) -> None:
        if self._skipped is not None:
            self._steps -= int(self._skipped.item())
            self._skipped = None

    def state_dict(self) -> dict[str, int]:
        """The schedule's position, for checkpoints (``accelerator.register_for_checkpointing(svb)``)."""
        return {"step": self.step, "num_applied": self.num_applied}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.step = int(state_dict["step"])
        self.num_applied = int(state_dict["num_applied"])

    # ------------------------------------------------------------------ bounding

    @torch.no_grad()
    def apply(self, per_layer: bool = False) -> SVBStats:
        """Bound every selected layer now and return what was seen and done.

        Under ``torch.distributed`` this is a collective over ``process_group``: every rank must call it at
        the same point (the :meth:`attach` hook does); calling it on one rank only leaves that rank waiting.
        If anything raises while a rank bounds its share, every rank raises the same :class:`SVBError`
        (naming the rank, layers and error) and nothing is written back on any rank.
        """
        rank, world = _rank_and_world(self.process_group)
        owners = _assign_owners(self.layers, world)
        mine = [i for i, owner in enumerate(owners) if owner == rank]
        table = np.zeros((len(self.layers), _COLUMNS))
        results, error = self._bound_local(mine, table, rank)
        if world > 1:
            table = self._all_reduce(table)
        if (table[:, _ERROR] > 0).any():
            raise self._failure(table, error, world) from error
        names = [layer.name for layer in self.layers]
        bad = [names[i] for i in range(len(self.layers)) if table[i, _NONFINITE] > 0]
        if bad and self.on_nonfinite == "raise":
            raise NonFiniteWeightError(
                f"NaN/Inf in layer(s) {', '.join(bad)}: nothing was written back. Lower the learning rate or "
                "check the data; SVB(..., on_nonfinite='warn') skips such layers instead."
            )
        if bad:
            warnings.warn(
                f"SVB skipped layer(s) with NaN/Inf: {', '.join(bad)}", RuntimeWarning, stacklevel=2
            )
        degenerate = [names[i] for i in range(len(self.layers)) if table[i, _DEGENERATE] > 0]
        if degenerate:
            warnings.warn(
                f"SVB left layer(s) {', '.join(degenerate)} as they are: nothing to bound (an all-zero "
                "weight matrix, or BatchNorm gammas averaging to <= 0, e.g. timm's zero_init_last)",
                RuntimeWarning,
                stacklevel=2,
            )
        changed = [i for i in range(len(self.layers)) if table[i, _CLIPPED] > 0 and table[i, _NONFINITE] == 0]
        for i in changed:
            if i in results:
                self.layers[i].module.weight.copy_(results[i])
        if world > 1:
            _broadcast_layers(
                [self.layers[i] for i in changed], [owners[i] for i in changed], self.process_group
            )
        return self._stats(table, bad, degenerate, per_layer)

    def _bound_local(
        self, indices: list[int], table: np.ndarray, rank: int
    ) -> tuple[dict[int, torch.Tensor], Exception | None]:
        """Bound this rank's layers, filling their rows of ``table``; returns the new weights / gammas.

        Two passes keep the host out of the device's way: first the certificate of every weight stack and
        the whole of BBN are queued on the device and their outcome comes back in one transfer; then only
        the stacks holding matrices the certificate left go to the solver (a few host decisions per
        stack). An error marks the rows of the unit it came from (all of this rank's if outside one) and
        stops the rest.
        """
        results: dict[int, torch.Tensor] = {}
        unit = indices
        try:
            with _full_precision():
                started = []
                for unit in self._units(indices):
                    kind = self.layers[unit[0]].kind
                    started.append((unit, self._start_bn(unit) if kind == "bn" else self._certify(unit)))
                unit = indices
                outcomes = _to_host([work[-1] for _, work in started])
                for (unit, work), outcome in zip(started, outcomes, strict=True):
                    if self.layers[unit[0]].kind == "bn":
                        results.update(self._finish_bn(unit, work, outcome, table))
                    else:
                        results.update(self._finish_weights(unit, work, outcome, table))
        except Exception as exc:  # re-raised on every rank by apply(), after the collective
            table[unit, _ERROR] = rank + 1
            return results, exc
        return results, None

    def _units(self, indices: list[int]) -> Iterator[list[int]]:
        """Layers bounded together: conv/linear layers whose matrices share shape, dtype and device; BN
        layers of one size, dtype and device."""
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for i in indices:
            module = self.layers[i].module
            weight = module.weight
            if self.layers[i].kind == "bn":
                key = ("bn", weight.shape, weight.dtype, weight.device)
            else:
                groups = getattr(module, "groups", 1)
                key = (weight.shape[0] // groups, weight[0].numel(), weight.dtype, weight.device)
            by_shape[key].append(i)
        yield from by_shape.values()

    def _matrices(self, i: int) -> torch.Tensor:
        """Layer ``i``'s weight matrices, oriented (smaller side first) in the compute dtype: a view of a
        contiguous float32 weight, a copy otherwise."""
        module = self.layers[i].module
        # contiguous: the same products (and bits) whatever the weight's memory format
        return _oriented(weight_matrices(module.weight.detach(), getattr(module, "groups", 1)).contiguous())

    def _certify(self, unit: list[int]) -> tuple:
        """Queue the certificate of a weight stack: ``(matrices per layer, their Gram, certified mask)``;
        no host sync. Without ``certify`` nothing is certified and the solver forms the Gram."""
        parts = [self._matrices(i) for i in unit]
        if not self.certify:
            count = sum(len(part) for part in parts)
            return parts, None, torch.zeros(count, dtype=torch.bool, device=parts[0].device)
        certified, gram = _certify_parts(parts, *band(self.epsilon), self._slack(unit))
        return parts, gram, certified

    def _slack(self, unit: list[int]) -> float:
        return band_slack(self.layers[unit[0]].module.weight.dtype)

    def _finish_weights(
        self, unit: list[int], work: tuple, certified: list[float], table: np.ndarray
    ) -> dict[int, torch.Tensor]:
        """Solve the matrices of a weight stack that the certificate left, fill the stack's rows of the
        table and return the new weights of the layers that changed."""
        parts, gram, _ = work
        offsets = np.cumsum([0] + [len(part) for part in parts]).tolist()
        rest = [row for row, done in enumerate(certified) if not done]
        # per layer: its matrices the solver takes, and where they sit in the solver's stack
        local = [[row - start for row in rest if start <= row < end] for start, end in pairwise(offsets)]
        first = np.cumsum([0] + [len(rows) for rows in local]).tolist()
        for i, rows in zip(unit, local, strict=True):
            table[i, _CERTIFIED] = not rows
            table[i, [_MIN, _MAX]] = math.nan
        if not rest:
            return {}
        pieces = [_take(part, rows) for part, rows in zip(parts, local, strict=True) if rows]
        solved = _solve(
            torch.cat(pieces) if len(pieces) > 1 else pieces[0],
            None if gram is None else _take(gram, rest),
            *band(self.epsilon),
            self._slack(unit),
        )
        columns = [solved.sv[:, 0], solved.sv[:, -1], solved.num_clipped, solved.fallback, solved.degenerate]
        stats = torch.stack([c.double() for c in [*columns, solved.nonfinite]], -1).tolist()  # one transfer
        results = {}
        for k, (i, rows) in enumerate(zip(unit, local, strict=True)):
            if not rows:
                continue
            mine = stats[first[k] : first[k + 1]]
            if any(row[5] for row in mine):
                table[i, _NONFINITE] = 1
                continue
            table[i, _MIN] = min((row[0] for row in mine if not math.isnan(row[0])), default=math.nan)
            table[i, _MAX] = max((row[1] for row in mine if not math.isnan(row[1])), default=math.nan)
            table[i, [_FALLBACK, _DEGENERATE]] = any(row[3] for row in mine), any(row[4] for row in mine)
            table[i, _CLIPPED] = sum(row[2] for row in mine)
            if table[i, _CLIPPED]:
                new = solved.matrices[first[k] : first[k + 1]]
                if len(rows) < len(parts[k]):  # some of the layer's groups were certified
                    new, solved_rows = parts[k].clone(), new
                    new[_index(rows, new.device)] = solved_rows
                weight = self.layers[i].module.weight
                if new.shape[-2] != len(weight) // getattr(self.layers[i].module, "groups", 1):
                    new = new.mT  # back from the smaller-side-first orientation
                results[i] = new.reshape(weight.shape).to(weight.dtype)
        return results

    def _start_bn(self, unit: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Queue BBN for BN layers of one size: ``(new gammas, per-layer summary)``; no host sync."""
        bns = [self.layers[i].module for i in unit]
        gamma = torch.stack([bn.weight.detach() for bn in bns])
        var = torch.stack([bn.running_var for bn in bns]) if self.bbn_mode == "sigma" else None
        eps = bns[0].eps
        if any(bn.eps != eps for bn in bns):
            dtype = torch.float64 if gamma.dtype == torch.float64 else torch.float32
            eps = torch.tensor([[bn.eps] for bn in bns], dtype=dtype, device=gamma.device)
        finite = torch.isfinite(gamma).all(-1)
        if var is not None:
            finite &= torch.isfinite(var).all(-1)
        ratio = bbn_ratio(gamma, var, eps, self.bbn_mode)
        new = bbn_gamma(gamma, var, eps, self.bbn_epsilon, self.bbn_mode)
        columns = [
            ratio.amin(-1),
            ratio.amax(-1),
            (new != gamma).sum(-1),
            finite,
            bbn_alpha(gamma, var, eps, self.bbn_mode) > 0,
            torch.isfinite(new).all(-1),
        ]
        return new, torch.stack([c.double() for c in columns], -1)

    def _finish_bn(
        self, unit: list[int], work: tuple, summary: list[list[float]], table: np.ndarray
    ) -> dict[int, torch.Tensor]:
        """The statistics and new gammas of BN layers from their summary (see :meth:`_start_bn`)."""
        new, _ = work
        results = {}
        for b, (i, row) in enumerate(zip(unit, summary, strict=True)):
            ratio_min, ratio_max, changed, finite, positive, new_finite = row
            if not finite:
                table[i, _NONFINITE] = 1
            elif not positive:
                table[i, [_MIN, _MAX, _DEGENERATE]] = math.nan, math.nan, 1
            else:
                table[i, [_MIN, _MAX]] = ratio_min, ratio_max
                if changed and not new_finite:
                    table[i, _NONFINITE] = 1
                elif changed:
                    table[i, _CLIPPED] = changed
                    results[i] = new[b]
        return results

    def _collective_device(self) -> torch.device:
        if dist.get_backend(self.process_group) == "gloo":
            return torch.device("cpu")
        return self.layers[0].module.weight.device

    def _all_reduce(self, table: np.ndarray) -> np.ndarray:
        reduced = torch.from_numpy(table).to(self._collective_device())
        dist.all_reduce(reduced, group=self.process_group)
        return reduced.cpu().numpy()

    def _failure(self, table: np.ndarray, error: Exception | None, world: int) -> SVBError:
        """The error every rank raises: which rank failed in which layers, with what (text from each rank)."""
        text = "" if error is None else f"{type(error).__name__}: {error}"
        messages = (
            [text] if world == 1 else _all_gather_text(text, self._collective_device(), self.process_group)
        )
        parts = []
        for rank, message in enumerate(messages):
            names = [
                layer.name for layer, row in zip(self.layers, table, strict=True) if row[_ERROR] == rank + 1
            ]
            if names:
                where = f"on rank {rank} " if world > 1 else ""
                parts.append(f"{where}in layer(s) {', '.join(repr(n) for n in names)} ({message})")
        return SVBError(
            f"SVB.apply() failed {'; '.join(parts)}. Nothing was written back"
            f"{' on any rank (every rank raises this error)' if world > 1 else ''}."
        )

    def _stats(
        self, table: np.ndarray, skipped: list[str], degenerate: list[str], per_layer: bool
    ) -> SVBStats:
        weights = [
            i for i, layer in enumerate(self.layers) if layer.kind == "weight" and table[i, _NONFINITE] == 0
        ]
        bns = [i for i, layer in enumerate(self.layers) if layer.kind == "bn" and table[i, _NONFINITE] == 0]
        solved = [i for i in weights if not math.isnan(table[i, _MIN])]  # certified layers have no values
        stats = SVBStats(
            layers=len(weights),
            clipped=int(table[weights, _CLIPPED].sum()),
            sv_min=float(table[solved, _MIN].min()) if solved else math.nan,
            sv_max=float(table[solved, _MAX].max()) if solved else math.nan,
            bn_layers=len(bns),
            bn_clipped=int(table[bns, _CLIPPED].sum()),
            certified=int(table[weights, _CERTIFIED].sum()),
            skipped=skipped,
            degenerate=degenerate,
        )
        if per_layer:
            stats.per_layer = {
                layer.name: LayerStats(
                    kind=layer.kind,
                    sv_min=float(row[_MIN]),
                    sv_max=float(row[_MAX]),
                    clipped=int(row[_CLIPPED]),
                    fallback=bool(row[_FALLBACK]),
                    skipped=bool(row[_NONFINITE]),
                    degenerate=bool(row[_DEGENERATE]),
                    certified=bool(row[_CERTIFIED]),
                )
                for layer, row in zip(self.layers, table, strict=True)
            }
        return stats

    def __repr__(self) -> str:
        n_bn = sum(layer.kind == "bn" for layer in self.layers)
        return (
            f"SVB(epsilon={self.epsilon}, bbn_epsilon={self.bbn_epsilon}, "
            f"every_n_steps={self.every_n_steps}, layers={len(self.layers) - n_bn}, bn_layers={n_bn}, "
            f"certify={self.certify}, step={self._steps})"
        )


def _check_count(value: int | None, name: str, minimum: int = 1, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _has_step_hooks(optimizer: Any) -> bool:
    return isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "_optimizer_step_post_hooks")


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel and ``torch.compile`` wrappers (nested in any order)."""
    # torch.compile's wrapper class lives in torch._dynamo, which only a compiled model has imported
    compiled = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", ())
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif compiled and isinstance(module, compiled):
            module = module._orig_mod
        else:
            return module


def _named_modules(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` of the unwrapped model: wrappers (at the top or around any child) are looked
    through, so names are those of the plain model."""
    module = _unwrap(module)
    yield prefix, module
    for name, child in module.named_children():
        yield from _named_modules(child, f"{prefix}.{name}" if prefix else name)


def _refuse_sharded(model: nn.Module) -> None:
    """Refuse FSDP (1 and 2) and other DTensor-sharded models: a rank holds only a shard of each matrix."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", ())
    fsdp = getattr(sys.modules.get("torch.distributed.fsdp"), "FullyShardedDataParallel", ())
    sharded = (fsdp and any(isinstance(m, fsdp) for m in model.modules())) or (
        dtensor and any(isinstance(p, dtensor) for p in model.parameters())
    )
    if sharded:
        raise ValueError(
            f"{type(model).__name__} has sharded parameters (FSDP / fully_shard / DTensor): SVB needs each "
            "weight matrix whole on one rank. Train with DistributedDataParallel (Accelerate's default "
            "multi-GPU mode), where SVB shares the work between ranks."
        )


def select_layers(
    model: nn.Module,
    include: Sequence[str] | None,
    exclude: Sequence[str],
    layer_types: tuple[type[nn.Module], ...],
    with_bn: bool,
) -> list[_Layer]:
    """The layers :class:`SVB` bounds, in module order: conv/linear weights and, with ``with_bn``, BatchNorms.

    ``include``/``exclude`` are glob patterns on module names of the unwrapped model (no ``module.`` or
    ``_orig_mod.``); a weight shared by several modules is taken once.
    """
    if isinstance(include, str) or isinstance(exclude, str):
        raise TypeError("include/exclude take a sequence of glob patterns, e.g. exclude=('fc',)")
    layers, seen = [], set()
    for name, module in _named_modules(model):
        if include is not None and not any(fnmatch.fnmatch(name, p) for p in include):
            continue
        if any(fnmatch.fnmatch(name, p) for p in exclude):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or id(weight) in seen:
            continue
        is_matrix = isinstance(module, layer_types) and (is_lazy(weight) or weight.dim() >= 2)
        is_bn = with_bn and isinstance(module, _BatchNorm) and module.affine
        if not (is_matrix or is_bn):
            continue
        if is_lazy(weight) or weight.is_meta:
            what = "a lazy module" if is_lazy(weight) else "on the meta device"
            raise ValueError(
                f"layer {name!r} has no weight values yet ({what}): build SVB after a first forward pass "
                "(lazy modules) or after loading the weights"
            )
        if is_matrix:
            if parametrize.is_parametrized(module, "weight"):
                raise ValueError(
                    f"layer {name!r} has a parametrized weight; exclude it or remove the parametrization"
                )
            g, m, n = weight_matrices(weight.detach(), getattr(module, "groups", 1)).shape
            kind, cost = "weight", g * min(m, n) ** 2 * (max(m, n) + min(m, n))
        else:
            kind, cost = "bn", float(weight.numel())
        seen.add(id(weight))
        layers.append(_Layer(name, module, kind, float(cost)))
    if not layers:
        types = ", ".join(t.__name__ for t in layer_types) + (", BatchNorm" if with_bn else "")
        raise ValueError(
            f"{type(model).__name__} has no layer to bound (looked for {types}"
            f"{'' if include is None else f' matching include={list(include)}'}"
            f"{'' if not exclude else f', not matching exclude={list(exclude)}'})"
        )
    return layers


def _rank_and_world(group: Any) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _assign_owners(layers: list[_Layer], world: int) -> list[int]:
    """Longest-processing-time-first assignment of layers to ranks; the same on every rank."""
    if world == 1:
        return [0] * len(layers)
    load = [0.0] * world
    owners = [0] * len(layers)
    for i in sorted(range(len(layers)), key=lambda i: (-layers[i].cost, i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += layers[i].cost
    return owners


def _all_gather_text(text: str, device: torch.device, group: Any) -> list[str]:
    """Every rank's ``text`` (its first ``_MESSAGE_BYTES`` bytes), on every rank: one sum-reduce."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    buffer = torch.zeros(world, _MESSAGE_BYTES, dtype=torch.int32)
    data = text.encode()[:_MESSAGE_BYTES]
    buffer[rank, : len(data)] = torch.tensor(list(data), dtype=torch.int32)
    buffer = buffer.to(device)
    dist.all_reduce(buffer, group=group)
    return [bytes(row[row > 0].tolist()).decode(errors="replace") for row in buffer.cpu()]


def _broadcast_layers(layers: list[_Layer], owners: list[int], group: Any) -> None:
    """Send each changed layer from the rank that bounded it to all others; one buffer per owner and dtype."""
    buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for layer, owner in zip(layers, owners, strict=True):
        tensor = layer.module.weight
        buckets[(owner, tensor.dtype, tensor.device)].append(tensor)
    for (owner, _, _), tensors in sorted(buckets.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.broadcast(
            flat, src=dist.get_global_rank(group, owner) if group is not None else owner, group=group
        )
        start = 0
        for t in tensors:
            t.copy_(flat[start : start + t.numel()].view_as(t))
            start += t.numel()


def _to_host(tensors: list[torch.Tensor]) -> list[list]:
    """The values of small device tensors as host lists (2-D tensors as lists of rows), in one transfer
    per device: the only place :meth:`SVB.apply` waits for the device when no layer needs the solver."""
    flat = [t.detach().reshape(-1).double() for t in tensors]
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for k, t in enumerate(flat):
        by_device[t.device].append(k)
    values: list[list] = [[] for _ in tensors]
    for ks in by_device.values():
        host = torch.cat([flat[k] for k in ks]).tolist()
        for k in ks:
            values[k], host = host[: flat[k].numel()], host[flat[k].numel() :]
            if tensors[k].dim() == 2:
                width = tensors[k].shape[1]
                values[k] = [values[k][r : r + width] for r in range(0, len(values[k]), width)]
    return values
