"""Data-parallel training helpers for ``torchrun`` (gloo on CPU, NCCL on GPU).

ULMFiT itself trains on one GPU; pretraining on a large Wikipedia dump is where several
processes pay off. ``torchrun --nproc_per_node N`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env` turns them into a
process group. The training loop then wraps the model in ``DistributedDataParallel``, gives
each rank its slice of the batch streams and averages metrics with :func:`all_reduce_mean`.
Everything here degrades to a no-op in a single process, so library code calls it
unconditionally.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ulmfit.checkpoint import get_rng_states
from ulmfit.model import State, unwrap_model


@dataclasses.dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: its rank, the world size and the device it should use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_initialized() -> bool:
    """Whether a ``torch.distributed`` process group is up."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (or without a process group): the process that writes files."""
    return rank() == 0


def init_from_env(backend: str | None = None, device: str | None = None) -> DistributedContext:
    """Initialise the process group from ``torchrun``'s environment variables.

    Without ``WORLD_SIZE`` (a plain ``python`` run) nothing is initialised and the context of a
    single process is returned. The backend is NCCL when CUDA is available (one GPU per local
    rank), gloo otherwise; ``backend``/``device`` override the choice.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if device is None:
        device = f"cuda:{local_rank}" if use_cuda else "cpu"
    if world <= 1 and not is_initialized():
        return DistributedContext(device=device)
    if not is_initialized():
        if use_cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"))
    return DistributedContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
    )


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_initialized():
        dist.barrier()


def communication_device() -> torch.device:
    """Where collective tensors must live: the current GPU for NCCL, the CPU otherwise."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(metrics: Mapping[str, float], weight: float = 1.0) -> dict[str, float]:
    """Average ``metrics`` over ranks, each rank counting ``weight`` times (e.g. its token count).

    In a single process the metrics come back unchanged.
    """
    metrics = dict(metrics)
    if not is_initialized() or not metrics:
        return {key: float(value) for key, value in metrics.items()}
    keys = sorted(metrics)
    device = communication_device()
    # float64 so that sums of many per-token losses do not lose precision
    values = torch.tensor(
        [float(metrics[key]) * weight for key in keys] + [weight],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    total_weight = float(values[-1])
    return {key: float(values[i]) / total_weight for i, key in enumerate(keys)}


def all_reduce_sum(values: Mapping[str, float]) -> dict[str, float]:
    """Sum ``values`` over ranks (unchanged in a single process)."""
    if not is_initialized():
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor(
        [values[k] for k in keys], dtype=torch.float64, device=communication_device()
    )
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return {k: float(tensor[i]) for i, k in enumerate(keys)}


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG states, in rank order (rank 0 saves them all)."""
    states = get_rng_states()
    if not is_initialized():
        return [states]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, states)
    return gathered


def gather_rows(state: State | None, device: torch.device) -> list[Tensor] | None:
    """The recurrent state of the global batch: every rank's rows, concatenated (on CPU)."""
    if state is None:
        return None
    tensors = [tensor for pair in state for tensor in pair]  # h0, c0, h1, c1, ...
    if is_initialized():
        gathered_tensors = []
        for tensor in tensors:
            parts = [torch.empty_like(tensor) for _ in range(world_size())]
            dist.all_gather(parts, tensor.contiguous().to(device))
            gathered_tensors.append(torch.cat(parts, dim=1))
        tensors = gathered_tensors
    return [tensor.detach().cpu() for tensor in tensors]


def scatter_rows(tensors: list[Tensor] | None, device: torch.device) -> State | None:
    """This rank's rows of a saved global recurrent state."""
    if tensors is None:
        return None
    rows = tensors[0].size(1) // world_size()
    local = [t[:, rank() * rows : (rank() + 1) * rows].to(device) for t in tensors]
    return tuple((local[i], local[i + 1]) for i in range(0, len(local), 2))


def sync_buffers(model: nn.Module) -> None:
    """Make every rank's buffers equal (batch-norm running statistics) before evaluating.

    ``DistributedDataParallel`` copies rank 0's buffers into the others at the start of each
    forward pass, so after the last training step each rank holds statistics of its own rows.
    Averaging them gives every rank the same model, with statistics of the whole batch.
    """
    if not is_initialized():
        return
    for buffer in unwrap_model(model).buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(world_size())
        else:
            dist.broadcast(buffer, src=0)


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` under a process group, else ``module``."""
    if not is_initialized():
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def broadcast_object(value: object, src: int = 0) -> object:
    """Send a picklable Python value from ``src`` to every rank (no-op in a single process)."""
    if not is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def teardown() -> None:
    """Destroy the process group if one is up."""
    if is_initialized():
        dist.destroy_process_group()
