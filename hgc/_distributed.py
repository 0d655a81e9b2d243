"""Runs started by ``torchrun`` (PyTorch's own launcher, one process per GPU or CPU share).

hgc does not schedule processes itself: ``torchrun --nproc-per-node N -m hgc embed|fit …`` (and
multi-node the same way, on a shared file system) starts N copies, and this module reads where
each copy stands from the variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).
Without them a run is one process and nothing here does anything.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .errors import InputError, PeerFailedError

log = logging.getLogger(__name__)
T = TypeVar("T")
#: The commands whose work torchrun's processes share (any other refuses to run under torchrun).
DISTRIBUTED_COMMANDS = ("embed", "fit")
#: How long a process waits for the others at a barrier before giving up.
WAIT_HOURS = 24
#: What gloo / NCCL say when the process on the other end has gone.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
              "Timed out", "timed out")


@dataclass(frozen=True)
class Ranks:
    """This process's place in a run: ``rank`` of ``world`` processes, ``local`` on its node."""

    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """The process that owns shared outputs (takes their lock, merges, writes the record)."""
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every ``world``-th, from position ``rank`` (deterministic, and balanced
        to within one item)."""
        return list(items[self.rank :: self.world])


def ranks() -> Ranks:
    """Where this process stands, from torchrun's variables (one process without them)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Ranks()
    return Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def process_group(backend: str = "gloo") -> Iterator[Ranks]:
    """A torch.distributed process group for the block when torchrun started this process.

    ``gloo`` coordinates CPU processes (and barriers of GPU ones); ``nccl`` averages gradients
    between GPUs. A group opened by the caller is reused and left open.
    """
    where = ranks()
    if not where.distributed:
        yield where
        return
    import torch
    import torch.distributed as dist

    opened = not dist.is_initialized()
    if opened:
        if backend == "nccl":  # NCCL's collectives (barriers, object gathers) run on the current GPU
            torch.cuda.set_device(where.local)
        # work is shared out by slides, which differ in size: processes may wait long for each other
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=WAIT_HOURS))
        log.info("process %d of %d (local %d) joined a %s group", where.rank, where.world, where.local, backend)
    try:
        yield where
    finally:
        if opened:
            dist.destroy_process_group()


@contextlib.contextmanager
def peers() -> Iterator[None]:
    """Communication with the other processes of the run; when one of them has stopped, a
    :class:`~hgc.errors.PeerFailedError` saying so instead of a transport traceback."""
    try:
        yield
    except RuntimeError as exc:
        if isinstance(exc, PeerFailedError) or not any(s in str(exc) for s in _PEER_GONE):
            raise
        raise PeerFailedError(f"process {ranks().rank}: another process of this run stopped or did not answer within "
                              f"{WAIT_HOURS} h (its message, if any, is above); finished work is kept, rerun the same "
                              "command to complete it") from None


def barrier() -> None:
    """Wait for every process of the run (nothing to wait for in a one-process run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with peers():
            dist.barrier()


def local_device(device: str, where: Ranks) -> str:
    """Each process of a multi-GPU run on its own GPU: ``cuda`` becomes ``cuda:<local rank>``; one
    named GPU for several processes of a node is refused (they would all share it)."""
    if not where.distributed or not device.startswith("cuda"):
        return device
    if device != "cuda" and local_processes() > 1:
        raise InputError(f"device '{device}' names one GPU, but torchrun started {local_processes()} processes on "
                         "this node; give --device cuda (or auto) and each process takes its own GPU")
    return f"cuda:{where.local}" if device == "cuda" else device


def local_processes() -> int:
    """Processes of this run on this node (torchrun's ``LOCAL_WORLD_SIZE``; 1 without torchrun)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def agree(value: float, device: str) -> float:
    """The main process's ``value`` in every process, so decisions taken on it (early stopping)
    are the same everywhere even when GPU kernels differ in their last bits."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    with peers():
        dist.broadcast(t, src=0)
    return float(t.item())
