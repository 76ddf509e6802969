"""Data-parallel distillation across the processes of `accelerate launch`.

Only training is distributed. Rank 0 runs the whole pipeline (loading, evaluation, every other
stage, every file written); the other ranks are workers that wait for rank 0 to reach a
distill stage, receive the student's architecture, weights and training sequences from it,
train their share of every batch, and wait again. When rank 0 is done (or fails), it tells
them to stop.

Each micro-batch of `batch_size` sequences is split evenly over the ranks, gradients are
averaged across them before clipping and the optimizer step, and every rank applies the same
update, so a run on W processes computes what one process computes on the same batches (up to
the order of floating-point sums). Checkpoints are written by rank 0 only; on `--resume`
every rank reads the same checkpoint directory, which assumes one machine or a shared
filesystem.

Control messages travel over a gloo group with a long timeout, because the workers wait while
rank 0 evaluates the baseline, which can take hours; gradients travel over the default group
(NCCL on GPUs).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from compress.errors import PreflightError

log = logging.getLogger(__name__)

# How long a worker waits for rank 0's next message (baseline evaluation included).
CONTROL_TIMEOUT = timedelta(hours=48)
STOP = "stop"
DISTILL = "distill"


@dataclass
class DataParallel:
    """This process's place among the launched ones."""

    rank: int
    world_size: int
    device: torch.device
    control: Any = None  # the gloo process group for control messages

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, rows: list[int]) -> list[int]:
        """This rank's equal share of a micro-batch's rows."""
        per_rank = len(rows) // self.world_size
        return rows[self.rank * per_rank : (self.rank + 1) * per_rank]

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """Every rank ends with the mean of all ranks' gradients (one flat all-reduce)."""
        grads = [p.grad for p in params if p.grad is not None]
        if len(grads) != len(params):
            raise RuntimeError("data-parallel distillation: a trainable parameter has no gradient")
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def average_floats(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of each value (every rank passes the same keys)."""
        keys = sorted(values)
        tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return {k: float(v) / self.world_size for k, v in zip(keys, tensor.tolist(), strict=True)}

    def send_message(self, message: dict[str, Any]) -> None:
        """Rank 0 → workers: a small JSON-like dict."""
        dist.broadcast_object_list([message], src=0, group=self.control)

    def receive_message(self) -> dict[str, Any]:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def broadcast_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values into every rank's tensors of the same shapes, in place."""
        for tensor in tensors:
            if tensor.device == self.device:
                dist.broadcast(tensor, src=0)
            else:  # the student waits on the CPU between stages
                moved = tensor.to(self.device)
                dist.broadcast(moved, src=0)
                tensor.copy_(moved)


def world_size_from_environment() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def from_environment() -> DataParallel | None:
    """The process group of `accelerate launch` (or torchrun); None for a single process."""
    if world_size_from_environment() <= 1:
        return None
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # Without CUDA (or with `--cpu`), accelerate only forms a CPU process group when told to.
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=CONTROL_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    log.info(
        "data-parallel distillation: rank %d of %d on %s (%s)",
        state.process_index,
        state.num_processes,
        state.device,
        state.backend,
    )
    return DataParallel(state.process_index, state.num_processes, state.device, control)


def stop_workers(parallel: DataParallel) -> None:
    """Rank 0, finishing (or failing): release the waiting workers. A worker that has already
    exited (it failed on its own) cannot be told; the launcher reports its failure."""
    try:
        parallel.send_message({"op": STOP})
    except (RuntimeError, dist.DistBackendError) as exc:
        log.warning("could not tell the workers to stop: %s", exc)


def check_batch_size(batch_size: int, world_size: int) -> None:
    """Every rank gets an equal share of each micro-batch, or the ranks' means would not
    average to the batch mean."""
    if batch_size % world_size:
        raise PreflightError(
            f"batch_size {batch_size}: launched on {world_size} processes, it must be a "
            f"multiple of {world_size} (each process trains an equal share of every micro-batch)"
        )
