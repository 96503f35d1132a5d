"""Worker for tests/test_svb.py's 2-process run: ``torchrun --standalone --nproc_per_node=2 THIS OUT_DIR``."""

import sys

import torch
import torch.distributed as dist
from test_svb import small_net
from torch.nn.parallel import DistributedDataParallel

from timm_svb import SVB
from timm_svb.svb import _assign_owners


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
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
    params = dict(model.module.named_parameters())
    before_last = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    stats = svb.apply()
    owners = _assign_owners(svb.layers, dist.get_world_size())
    torch.save(
        {
            "state": {k: v.detach().clone() for k, v in params.items()},
            "before_last": before_last,
            "owned": [layer.name for layer, owner in zip(svb.layers, owners, strict=True) if owner == rank],
            "num_applied": svb.num_applied,
            "clipped": stats.clipped + stats.bn_clipped,
        },
        f"{out_dir}/rank{rank}.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
