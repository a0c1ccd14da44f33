"""A tiny DDP job for tests/test_torchrun.py: every rank attaches to one run and logs.

Run under ``torchrun`` with ``PLUTO_RUN_ID`` shared by all ranks::

    ddp_log.py OUT_DIR [STEPS]

Each rank writes ``rank-<RANK>.json`` (rank, run ids, resumed, writer) into
OUT_DIR, trains a few DDP steps on CPU (gloo) and logs:

- ``train/loss`` at every step (each rank its own value, a 0-d tensor),
- ``shared/x`` at every step with value = rank (the same key and step on every
  rank: all of them must be kept),
- ``rank<RANK>/only`` (a key only this rank logs).

The SDK's spool stays in ``./.pluto``, shared by all ranks as in a real job.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import pluto


def main() -> int:
    out = Path(sys.argv[1])
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    dist.init_process_group(backend="gloo")
    rank = dist.get_rank()
    run = pluto.init(
        project=os.environ.get("PLUTO_PROJECT", "ddp"),
        config={"steps": steps},
        settings={"flush_interval": 0.05},
    )
    report = {
        "rank": rank,
        "id": run.id,
        "run_id": run.run_id,
        "display_id": run.display_id,
        "resumed": run.resumed,
        "writer": run.writer,
    }
    (out / f"rank-{rank}.json").write_text(json.dumps(report))

    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(rank)
    for step in range(steps):
        x = torch.randn(8, 4, generator=data)
        loss = nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.log({"train/loss": loss, "shared/x": rank, f"rank{rank}/only": float(step)}, step=step)
    print(f"rank {rank} done", flush=True)
    dist.barrier()
    run.finish()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
