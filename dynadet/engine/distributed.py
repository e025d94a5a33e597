"""Thin helpers over ``torch.distributed`` that degrade to no-ops in a single process.

The library never launches processes: ``torchrun`` (or ``srun torchrun``) creates them and sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` only reacts to that environment.
"""

from __future__ import annotations

import datetime
import functools
import os
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import torch
import torch.distributed as dist

P = ParamSpec("P")
R = TypeVar("R")

__all__ = [
    "all_gather_object",
    "barrier",
    "cleanup",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_dist_initialized",
    "is_main_process",
    "main_process_only",
    "on_main",
    "reduce_dict",
]


def is_dist_initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return dist.get_rank() if is_dist_initialized() else 0


def get_world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if is_dist_initialized() else 1


def get_local_rank() -> int:
    """Rank on this machine, from torchrun's ``LOCAL_RANK`` (0 when unset).

    The CUDA device index must come from this, not from the global rank, or multi-node runs break.
    """
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on global rank 0 (and always in a single process)."""
    return get_rank() == 0


def barrier() -> None:
    """Synchronise all processes; no-op when not distributed."""
    if not is_dist_initialized():
        return
    if dist.get_backend() == "nccl":
        # Naming the device avoids NCCL guessing (and warning about) which GPU this rank uses.
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def init_distributed(
    backend: str | None = None,
    timeout: datetime.timedelta = datetime.timedelta(minutes=30),
) -> bool:
    """Initialise the default process group from torchrun's environment variables.

    Does nothing unless ``WORLD_SIZE`` > 1 (so a plain ``python`` run stays single-process).
    Backend: ``"nccl"`` when CUDA is available, else ``"gloo"``, unless ``backend`` is given.
    When CUDA is available the current device is set to ``cuda:LOCAL_RANK``.

    Args:
        backend: process-group backend, or None to choose as above.
        timeout: collective timeout; a hung rank fails after this instead of blocking forever.

    Returns:
        Whether distributed mode is active.
    """
    if is_dist_initialized():
        return True
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
    cuda = torch.cuda.is_available()
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(get_local_rank())
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=int(os.environ["RANK"]),
        world_size=world_size,
        timeout=timeout,
    )
    return True


def cleanup() -> None:
    """Destroy the default process group if one exists."""
    if is_dist_initialized():
        dist.destroy_process_group()


def all_gather_object(obj: Any) -> list[Any]:
    """Gather a picklable object from every rank.

    Returns:
        A list of length ``world_size`` whose entry ``r`` is rank ``r``'s object
        (``[obj]`` in a single process). Every rank must call this.
    """
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def reduce_dict(d: dict[str, torch.Tensor], average: bool = True) -> dict[str, torch.Tensor]:
    """Sum (or average) a dict of scalar tensors over all ranks, for logging.

    Args:
        d: name → 0-d (or 1-element) tensor; every rank must pass the same keys. Tensors must be on
            the device the backend communicates on (CUDA for nccl).

    Returns:
        A new dict with the same keys and float32 0-d tensors holding the reduced values. In a
        single process the input values are returned detached (no copy, no dtype change).
    """
    if get_world_size() == 1:
        return {k: v.detach() for k, v in d.items()}
    # Sorted keys: every rank must pack the values in the same order.
    keys = sorted(d)
    if not keys:
        return {}
    values = torch.stack([d[k].detach().reshape(()).float() for k in keys])
    dist.all_reduce(values)
    if average:
        values /= get_world_size()
    return dict(zip(keys, values.unbind(0), strict=True))


def main_process_only(fn: Callable[P, R]) -> Callable[P, R | None]:
    """Decorator: run ``fn`` on rank 0 only; other ranks return None without calling it.

    Never decorate a function that enters a collective: the other ranks would not join it.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | None:
        return fn(*args, **kwargs) if is_main_process() else None

    return wrapper


def on_main(fn: Callable[..., R], *args: Any, **kwargs: Any) -> R | None:
    """Call ``fn(*args, **kwargs)`` on rank 0 only and return its result (None elsewhere)."""
    return fn(*args, **kwargs) if is_main_process() else None
