"""Several processes filling one synthetic set: ranks, their devices, and the few collectives.

Under ``torchrun`` / ``accelerate launch`` every process sees ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` (its index on its machine); :func:`resolve_device` maps a bare ``cuda`` (or no
device, when CUDA is there) to ``cuda:LOCAL_RANK`` so the processes of one machine use one GPU
each. Ranks write disjoint shards / images of the same set (see :mod:`dfqkern.datagen.store`);
dgh's set-level BatchNorm statistics are summed over the ranks with :func:`all_reduce_sums`, so a
distributed dgh run optimizes the statistics of the whole set, as a single process does.
Every collective is a no-op without an initialized ``torch.distributed`` process group.
"""
from __future__ import annotations

import datetime
import os
import sys
from typing import Sequence

import torch

# Launchers' variables for (rank, world size) and for the rank on this machine, in the order read.
RANK_ENV = (("RANK", "WORLD_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"),
            ("SLURM_PROCID", "SLURM_NTASKS"))
LOCAL_RANK_ENV = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: torch.distributed when initialized, else an already
    created accelerate state, else the launcher's environment (torchrun / accelerate launch: RANK,
    WORLD_SIZE; MPI; SLURM); ``(0, 1)`` for a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    state_mod = sys.modules.get("accelerate.state")  # only if the user already uses accelerate
    if state_mod is not None:
        shared = getattr(getattr(state_mod, "PartialState", None), "_shared_state", None)
        if shared and "num_processes" in shared:
            return int(shared.get("process_index", 0)), int(shared["num_processes"])
    for r, w in RANK_ENV:
        if r in os.environ and w in os.environ:
            return int(os.environ[r]), int(os.environ[w])
    return 0, 1


def check_rank(rank: "int | None", world_size: "int | None") -> tuple[int, int]:
    """``rank`` / ``world_size`` as given, the missing ones from :func:`dist_info`; both checked."""
    if rank is None or world_size is None:
        r, w = dist_info()
        rank, world_size = (r if rank is None else rank), (w if world_size is None else world_size)
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    return rank, world_size


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK`` of torchrun / accelerate, MPI, SLURM); 0 alone."""
    for name in LOCAL_RANK_ENV:
        if name in os.environ:
            value = os.environ[name]
            if not value.strip().isdigit():
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
            return int(value)
    return 0


def resolve_device(device: "str | torch.device | None") -> torch.device:
    """The device a generating process uses: ``None`` or ``"auto"`` -> CUDA when available, else
    the CPU; a bare ``cuda`` -> ``cuda:LOCAL_RANK`` (one GPU per process of a machine; an error when
    the machine has fewer GPUs than local ranks); anything else as given."""
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        index = local_rank()
        count = torch.cuda.device_count()
        if count and index >= count:
            raise ValueError(f"device cuda: local rank {index} has no GPU of its own (this machine has {count}); "
                             f"start at most {count} processes per machine or pass --device cuda:N")
        device = torch.device("cuda", index)
    return device


def is_collective() -> bool:
    """Whether a torch.distributed process group with more than one rank is running."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_from_env(device: "str | torch.device | None" = None, timeout_s: float = 1800.0) -> bool:
    """Start the default process group from the launcher's environment (``MASTER_ADDR`` / ``PORT``,
    ``RANK``, ``WORLD_SIZE``) when ``WORLD_SIZE`` > 1 and none is running; returns whether a group
    with several ranks runs afterwards. gloo carries CPU tensors, NCCL CUDA ones."""
    import torch.distributed as dist

    if is_collective():
        return True
    rank, world = dist_info()
    if world <= 1 or not dist.is_available():
        return False
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {' and '.join(missing)} unset: start the processes with torchrun "
                         f"or accelerate launch (they set them)")
    use_cuda = device is not None and torch.device(device).type == "cuda"
    backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def _reduce_device(fallback: torch.device) -> torch.device:
    import torch.distributed as dist

    return torch.device("cpu") if "gloo" in str(dist.get_backend()) else fallback


def all_reduce_sums(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Element-wise sums over the ranks of ``tensors`` (same shapes on every rank), as float64, in
    one collective; the tensors themselves when no group runs."""
    import torch.distributed as dist

    if not is_collective():
        return [t.double() for t in tensors]
    flat = torch.cat([t.detach().double().reshape(-1) for t in tensors]) if tensors else torch.zeros(0)
    device = flat.device
    flat = flat.to(_reduce_device(device))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].reshape(t.shape).to(device))
        start += t.numel()
    return out


def any_rank(flags: Sequence[bool]) -> list[bool]:
    """Element-wise OR of ``flags`` over the ranks (the same decisions on every rank)."""
    if not is_collective():
        return [bool(f) for f in flags]
    summed = all_reduce_sums([torch.tensor([float(bool(f)) for f in flags], dtype=torch.float64)])[0]
    return [bool(v > 0) for v in summed.tolist()]


def broadcast_module(module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (in place), as DDP does at its start: ranks
    that built the model themselves (random initialization, say) then all invert the same one."""
    import torch.distributed as dist

    if not is_collective():
        return
    with torch.no_grad():
        for t in list(module.state_dict(keep_vars=True).values()):
            buf = t.detach().to(_reduce_device(t.device))
            dist.broadcast(buf, src=0)
            t.detach().copy_(buf)


def same_on_all_ranks(text: str) -> bool:
    """Whether ``text`` (a digest, say) is rank 0's on every rank; the same answer on all ranks."""
    import torch.distributed as dist

    if not is_collective():
        return True
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return not any_rank([box[0] != text])[0]


def barrier() -> None:
    import torch.distributed as dist

    if is_collective():
        dist.barrier()


def split_evenly(n: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous part of ``range(n)``: parts are disjoint, cover it, and differ in
    length by at most one."""
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def on_rank_zero(context_factory):
    """A context that rank 0 enters (``context_factory()``, e.g. the lock on the output) while the
    other ranks wait to hear whether it could; if it could not, every rank raises, rank 0 its own
    error. Without a process group it is ``context_factory()`` itself."""
    import contextlib

    if not is_collective():
        return context_factory()

    @contextlib.contextmanager
    def guarded():
        import torch.distributed as dist

        ctx, error = None, None
        if dist.get_rank() == 0:
            try:
                ctx = context_factory()
                ctx.__enter__()
            except BaseException as err:  # noqa: BLE001 - re-raised below, after the others know
                ctx, error = None, err
        if any_rank([error is not None])[0]:
            if error is not None:
                raise error
            raise RuntimeError("rank 0 could not start (see its error); this rank stops too")
        try:
            yield
        finally:
            if ctx is not None:
                ctx.__exit__(*sys.exc_info())

    return guarded()
