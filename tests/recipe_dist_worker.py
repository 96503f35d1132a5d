"""Worker of tests/test_recipe_dist.py: ``torchrun --nproc_per_node=2 THIS OUT_DIR DATA_DIR``.

Runs recipes/train.py under torch.distributed (gloo, CPU) and saves what this rank ended with.
"""

import os
import sys

import torch
from recipe_helpers import FAST, train


def main(out_dir: str, data_dir: str) -> None:
    args = "--model convnet20_svb --epochs 2 --batch-size 8 --lr 0.05 --checkpoint-hist 1 --svb-epsilon 0.05"
    args += " --bbn-epsilon 0.05"
    args += " --svb-every 3 --svb-skip-last 0 --no-svb-skip-final-epoch"
    result = train.main(
        [*args.split(), "--data-dir", data_dir, "--output", os.path.join(out_dir, "run"), *FAST]
    )
    rank = int(os.environ["RANK"])
    torch.save(
        {
            "state": {k: v.detach().clone() for k, v in result.model.state_dict().items()},
            "num_applied": result.svb.num_applied,
            "expected": len(result.svb_steps),
            "steps": result.svb.step,
            "world": int(os.environ["WORLD_SIZE"]),
            "clipped": result.svb.last_stats.clipped + result.svb.last_stats.bn_clipped,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
