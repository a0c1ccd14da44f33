"""A tiny multi-process (DDP) training script that logs to Pluto from every rank.

Run it with torchrun; every rank calls ``pluto.init`` and, because they share
``PLUTO_RUN_ID``, they all attach to the same run (one creates it, the rest get
``resumed=True``)::

    export PLUTO_URL=http://127.0.0.1:7300 PLUTO_RUN_ID=my-run-1
    torchrun --standalone --nproc_per_node=2 examples/train.py --steps 60

    # fork it at step 30 with another learning rate
    PLUTO_RUN_ID=my-run-1-fork torchrun --standalone --nproc_per_node=2 \\
        examples/train.py --steps 60 --fork-run-id my-run-1 --fork-step 30 --lr 0.02

The model is a linear regression on synthetic data with a fixed seed, so runs
are reproducible: a fork replays steps 1..fork_step silently with the parent's
learning rate (``--replay-lr``) and then logs steps fork_step+1..steps, which
the fork owns. Uses NCCL when CUDA is available, gloo on the CPU otherwise.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import pluto

DEFAULT_LR = 0.05
FEATURES = 16
BATCH = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Tiny DDP linear regression that logs to Pluto.")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--project", default=os.environ.get("PLUTO_PROJECT", "demo"))
    p.add_argument("--name", default=None, help="run name (default: baseline or fork-*)")
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    p.add_argument(
        "--fork-run-id",
        default=None,
        help="run to fork from: numeric id, display id (ABC-1) or external id (PLUTO_RUN_ID)",
    )
    p.add_argument("--fork-step", type=int, default=None, help="step of the parent to fork at")
    p.add_argument(
        "--replay-lr",
        type=float,
        default=DEFAULT_LR,
        help="learning rate the parent used; a fork replays its first steps with it",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if (args.fork_run_id is None) != (args.fork_step is None):
        p.error("--fork-run-id and --fork-step go together")
    if args.fork_step is not None and not 0 <= args.fork_step < args.steps:
        p.error("--fork-step must be in [0, --steps)")
    return args


def lr_at(step: int, base_lr: float, total: int) -> float:
    """Cosine decay to 10% of ``base_lr`` over the run: ``train/lr`` is a real curve."""
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(total, 1))))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_cuda = torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    # Same weights on every rank (DDP also broadcasts them); a different data shard each.
    torch.manual_seed(args.seed)
    true_w = torch.randn(FEATURES, 1)
    true_b = 0.5
    model = nn.Linear(FEATURES, 1).to(device)
    ddp = DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr)
    data_gen = torch.Generator().manual_seed(args.seed * 1000 + rank)

    forking = args.fork_run_id is not None
    name = args.name or (f"fork-lr{args.lr:g}" if forking else "baseline")
    config: dict[str, Any] = {
        "lr": args.lr,
        "steps": args.steps,
        "batch_size": BATCH,
        "features": FEATURES,
        "world_size": world,
        "seed": args.seed,
        "backend": dist.get_backend(),
    }
    init_kwargs: dict[str, Any] = {}
    if forking:
        init_kwargs = {"fork_run_id": args.fork_run_id, "fork_step": args.fork_step}
    run = pluto.init(project=args.project, name=name, config=config, **init_kwargs)
    print(
        f"[pluto] rank={rank} world={world} run_id={run.id} display_id={run.display_id} "
        f"resumed={run.resumed} url={run.url}",
        flush=True,
    )

    first_step = args.fork_step + 1 if forking else 1
    loss_value = float("nan")
    for step in range(1, args.steps + 1):
        x = torch.randn(BATCH, FEATURES, generator=data_gen)
        y = x @ true_w + true_b + 0.1 * torch.randn(BATCH, 1, generator=data_gen)
        x, y = x.to(device), y.to(device)

        logging = step >= first_step
        base_lr = args.lr if logging else args.replay_lr
        lr = lr_at(step, base_lr, args.steps)
        for group in opt.param_groups:
            group["lr"] = lr

        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(ddp(x), y)
        loss.backward()  # DDP all-reduces the gradients here
        grad_norm = torch.nn.utils.clip_grad_norm_(ddp.parameters(), max_norm=float("inf"))
        opt.step()
        loss_value = loss.item()

        if logging:
            metrics = {"train/loss": loss_value, "train/lr": lr}
            if rank == 0:
                metrics["train/grad_norm"] = grad_norm.item()
            run.log(metrics, step=step)

    dist.barrier()
    run.finish()
    if rank == 0:
        print(
            f"[pluto] done: {args.steps} steps, final loss {loss_value:.4f}, "
            f"run {run.display_id} (id {run.id})",
            flush=True,
        )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
