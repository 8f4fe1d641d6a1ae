"""Train the small DDPM UNet with the Learner and AccelerateCB, in one or several processes.

    python examples/train_ddpm_dist.py --steps 20
    torchrun --standalone --nproc_per_node 2 examples/train_ddpm_dist.py --steps 3 --out /tmp/run
    accelerate launch --multi_gpu --num_processes 2 examples/train_ddpm_dist.py --steps 3

(``--multi_gpu`` also works on a CPU-only machine: it starts the processes and AccelerateCB makes
Accelerate use gloo on the CPU.)

Every process trains on its own shard of a procedural image set (SyntheticShapes) noised by the
DDPM collate; Accelerate (DDP over gloo on CPU, nccl on GPU) averages the gradients, so all
processes hold the same parameters after every step. Each process seeds itself differently
(rank-dependent initial weights and noise): only the synchronisation makes them agree.

With ``--out DIR`` each process writes ``DIR/rank<r>.json``: rank, num_processes, steps done,
last loss, the SHA-256 of its parameters and of its first batch. The launcher must really start
several processes: ``accelerate launch --cpu --num_processes 2`` starts one, and the Learner
warns loudly about it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from fastnca.demos.ddpm import SyntheticShapes, UNet, ddpm_dataloader
from fastnca.train.callbacks import AccelerateCB, Callback, MetricsCB
from fastnca.train.learner import DataLoaders, Learner


def param_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class RecordCB(Callback):
    """Counts optimiser steps; keeps a digest of the first batch and the last loss."""

    order = 50

    def __init__(self):
        self.steps, self.first_batch, self.loss = 0, None, float("nan")

    def before_batch(self, learn):
        if self.first_batch is None and learn.training:
            (xt, t), eps = learn.batch
            self.first_batch = hashlib.sha256(xt.cpu().numpy().tobytes()).hexdigest()

    def after_step(self, learn):
        self.steps += 1
        self.loss = float(learn.loss.detach())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="optimiser steps per process")
    p.add_argument("--bs", type=int, default=8, help="batch size per process")
    p.add_argument("--size", type=int, default=16, help="image size (a multiple of 4)")
    p.add_argument("--nfs", default="8,16", help="UNet channels per level, comma-separated")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--out", default=None, help="folder for rank<r>.json")
    args = p.parse_args(argv)

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    acc_cb = AccelerateCB(args.mixed_precision)
    acc = acc_cb.acc
    rank, world = acc.process_index, acc.num_processes
    torch.manual_seed(1234 + rank)  # different per rank on purpose: DDP must reconcile them

    ds = SyntheticShapes(args.steps * args.bs * world, size=args.size)
    valid = SyntheticShapes(args.bs * world, size=args.size, seed=1)
    dls = DataLoaders(
        ddpm_dataloader(ds, args.bs, shuffle=False), ddpm_dataloader(valid, args.bs, shuffle=False)
    )
    model = UNet(1, nfs=tuple(int(c) for c in args.nfs.split(",")))
    rec = RecordCB()
    learn = Learner(
        model,
        dls,
        F.mse_loss,
        lr=args.lr,
        cbs=[acc_cb, MetricsCB(), rec],
        opt_func=torch.optim.Adam,
    )
    learn.fit(1)

    result = {
        "rank": rank,
        "num_processes": world,
        "distributed_type": str(acc.distributed_type),
        "device": str(acc.device),
        "steps": rec.steps,
        "loss": rec.loss,
        "params_sha256": param_digest(learn.model),
        "first_batch_sha256": rec.first_batch,
    }
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
