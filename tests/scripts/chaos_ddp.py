"""A tiny two-node DDP job for tests/chaos/ (gloo, CPU).

Run under ``torchrun --nnodes=2 --node_rank=N --nproc_per_node=2 ...`` on each
"node", with ``PLUTO_RUN_ID`` shared by every rank and ``PLUTO_SIDECAR_SOCKET``
naming that node's own sidecar::

    chaos_ddp.py OUT_DIR [STEPS]

Every rank trains a few DDP steps and logs at each step:

- ``chaos/k<j>`` for j < 4: the deterministic values of ``chaos_writer.value``
  (writer = global rank), so the test knows every expected point;
- ``ddp/world`` = the all-reduced sum of ``rank + step`` over the world (proof
  that the two nodes really trained together): ``sum(ranks) + world * step``;
- ``ddp/loss``: the rank's own loss.

Writes ``rank-<RANK>.json`` (rank, node, run ids, writer) into OUT_DIR.
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

KEYS = 4


def value(writer: int, key: int, step: int) -> float:
    """The same formula as chaos_writer.value."""
    return writer * 1_000_000.0 + step + key / 16


def main() -> int:
    out = Path(sys.argv[1])
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    dist.init_process_group(backend="gloo")
    rank = dist.get_rank()
    run = pluto.init(project=os.environ.get("PLUTO_PROJECT", "chaos"),
                     config={"steps": steps}, settings={"console": False,
                                                        "flush_interval": 0.05})
    report = {
        "rank": rank,
        "node": int(os.environ.get("GROUP_RANK", "-1")),
        "local_rank": int(os.environ.get("LOCAL_RANK", "-1")),
        "world": dist.get_world_size(),
        "id": run.id,
        "run_id": run.run_id,
        "writer": run.writer,
        "socket": os.environ.get("PLUTO_SIDECAR_SOCKET"),
    }
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(rank)
    for step in range(steps):
        x = torch.randn(8, 4, generator=data)
        loss = nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        world = torch.tensor([float(rank + step)])
        dist.all_reduce(world)
        values = {f"chaos/k{j}": value(rank, j, step) for j in range(KEYS)}
        run.log({**values, "ddp/world": float(world.item()), "ddp/loss": loss}, step=step)
    dist.barrier()
    run.finish()
    report["undelivered_bytes"] = run.undelivered_bytes
    (out / f"rank-{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
