"""Worker for tests/test_svb.py's 2-process run: ``torchrun --standalone --nproc_per_node=2 THIS OUT_DIR``.

Three stages on one process group (timeout 600 s, so a rank left waiting in a collective would hang the
test, not end it): a DDP training run whose last ``SVB.apply()`` is observed from outside (which rank
solved which matrices), one rank's solver raising, and an FSDP2 model. Each rank saves what it saw.
"""

import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from test_svb import small_net
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import timm_svb.svb
from timm_svb import SVB, SVBError


def recorded(name: str, calls: list):
    """The engine's step ``name`` (looked up at call time), keeping a copy of its first argument (the
    weight matrices of a stack, or the gammas of a group of BN layers)."""
    real = getattr(timm_svb.svb, name)

    def recording(first, *args, **kwargs):
        calls.append(
            [t.detach().clone() for t in first] if isinstance(first, list) else first.detach().clone()
        )
        return real(first, *args, **kwargs)

    return recording


def train_and_observe(rank: int) -> dict:
    model = DistributedDataParallel(small_net())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    svb = SVB(model, epsilon=0.5, bbn_epsilon=1.0, every_n_steps=2)
    handle = svb.attach(optimizer)
    torch.manual_seed(100 + rank)  # each rank its own data, as under DDP
    for _ in range(7):
        optimizer.zero_grad()
        model(torch.randn(8, 3, 8, 8)).square().mean().backward()
        optimizer.step()
        if svb.step == 6:
            handle.remove()
    before_last = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    solved: dict[str, list] = {"_certify_parts": [], "bbn_gamma": []}
    real = {name: getattr(timm_svb.svb, name) for name in solved}
    for name, calls in solved.items():
        setattr(timm_svb.svb, name, recorded(name, calls))
    stats = svb.apply()
    for name, solver in real.items():
        setattr(timm_svb.svb, name, solver)
    return {
        "state": {k: v.detach().clone() for k, v in model.module.named_parameters()},
        "before_last": before_last,
        "solved": solved,
        "num_applied": svb.num_applied,
        "clipped": stats.clipped + stats.bn_clipped,
        "names_exclude": [layer.name for layer in SVB(model, exclude=("10", "0")).layers],
        "names_include": [layer.name for layer in SVB(model, include=("3", "7")).layers],
    }


def one_rank_fails(rank: int) -> dict:
    svb = SVB(small_net(), epsilon=0.5, bbn_epsilon=1.0)
    if rank == 1:

        def broken_solver(*args, **kwargs):
            raise RuntimeError("injected solver failure")

        timm_svb.svb._solve = broken_solver
    start = time.perf_counter()
    try:
        svb.apply()
        message = None
    except SVBError as exc:
        message = str(exc)
    return {"failure": message, "failure_seconds": time.perf_counter() - start}


def fsdp2_refused() -> dict:
    model = small_net()
    for layer in model:
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            fully_shard(layer)
    fully_shard(model)
    try:
        SVB(model)
        return {"fsdp2": None}
    except ValueError as exc:
        return {"fsdp2": str(exc)}


def main(out_dir: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    rank = dist.get_rank()
    result = train_and_observe(rank)
    result.update(one_rank_fails(rank))
    dist.barrier()
    result.update(fsdp2_refused())
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
