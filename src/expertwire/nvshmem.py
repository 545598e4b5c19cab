"""NVSHMEM bootstrap and helpers with pplx_kernels' names: the unique id travels as a CPU uint8 tensor, so any
torch.distributed broadcast can carry it from rank 0 to the others."""

from __future__ import annotations

import atexit
import inspect
import weakref
from collections.abc import Sequence

import torch
import torch.distributed as dist

from . import ops
from ._device_memory import tensor_bytes, tensor_over
from ._native import ext
from .checks import integer

_symmetric: "weakref.WeakSet[ext.SymmetricMemory]" = weakref.WeakSet()


def _release_at_exit() -> None:
    """At interpreter exit the objects still alive are released without nvshmem_free, which is collective: a
    process ending on an error (a peer that died) would wait in it forever, and ranks that end without
    finalizing release their objects in no agreed order. The heap goes with the process."""
    ext.nvshmem_release_without_collectives()


atexit.register(_release_at_exit)


def nvshmem_unique_id_size() -> int:
    return ext.nvshmem_unique_id_bytes()


def nvshmem_get_unique_id() -> torch.Tensor:
    """A fresh unique id (on one rank, usually 0), to broadcast to every rank before nvshmem_init."""
    return torch.frombuffer(bytearray(ext.nvshmem_unique_id()), dtype=torch.uint8)


def nvshmem_alloc_empty_unique_id() -> torch.Tensor:
    """A zeroed tensor of a unique id's size: the receive buffer of the broadcast."""
    return torch.zeros(nvshmem_unique_id_size(), dtype=torch.uint8, device="cpu")


def _join_with_uid(uid: torch.Tensor, rank: int, world_size: int) -> int:
    integer("nvshmem_init", "rank", rank, minimum=-(2**31), maximum=2**31 - 1)
    integer("nvshmem_init", "world_size", world_size, minimum=-(2**31), maximum=2**31 - 1)
    size = nvshmem_unique_id_size()
    if not isinstance(uid, torch.Tensor):
        raise ValueError(
            f"nvshmem_init: uid must be a torch.Tensor, got {type(uid).__name__} (the current form is "
            "nvshmem_init(global_rank, local_rank, world_size, device, uid=None))"
        )
    # Any shape of `size` bytes, as pplx_kernels takes it (a [1, size] row of a gathered batch, say).
    if uid.dtype != torch.uint8 or uid.numel() != size:
        raise ValueError(
            f"nvshmem_init: uid must be a uint8 tensor of {size} elements, got {uid.dtype} of shape {list(uid.shape)}"
        )
    if uid.device.type != "cpu":
        raise ValueError(f"nvshmem_init: uid must be on the CPU, got device {uid.device}")
    if _joined_already(rank, world_size):
        return 0
    ext.nvshmem_init(bytes(uid.reshape(-1).tolist()), rank, world_size)
    torch.cuda.synchronize()
    return 0


def _joined_already(rank: int, world_size: int) -> bool:
    """Whether NVSHMEM is already running in this process as this rank of this many (initialized by nvshmem4py's
    nvshmem.core.init, say): then nothing joins twice, and expertwire's kernels are attached to the running job."""
    if not ext.nvshmem_initialized():
        return False
    joined = (ext.nvshmem_my_pe(), ext.nvshmem_n_pes())
    if joined != (rank, world_size):
        raise ValueError(
            f"nvshmem_init: NVSHMEM already runs in this process as rank {joined[0]} of {joined[1]}, "
            f"not rank {rank} of {world_size}"
        )
    ext.nvshmem_attach_to_running()
    return True


def _device_index(device: object) -> int:
    """The CUDA device index of `device`: an int, a CUDA torch.device (or its string), or an object with a
    device_id (cuda.core's Device)."""
    if isinstance(device, (str, torch.device)):
        as_torch = torch.device(device)
        if as_torch.type != "cuda":
            raise ValueError(f"nvshmem_init: device must be a CUDA device, got {as_torch}")
        return as_torch.index if as_torch.index is not None else torch.cuda.current_device()
    index = getattr(device, "device_id", device)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(
            "nvshmem_init: device must be a CUDA device index, a torch.device or an object with device_id, "
            f"got {type(device).__name__} {device!r}"
        )
    return index


def _join_over_torch_distributed(
    global_rank: int, local_rank: int, world_size: int, device: object, uid: "torch.Tensor | None" = None
) -> int:
    integer("nvshmem_init", "global_rank", global_rank, minimum=0, maximum=2**31 - 1)
    integer("nvshmem_init", "local_rank", local_rank, minimum=0, maximum=2**31 - 1)
    integer("nvshmem_init", "world_size", world_size, minimum=1, maximum=2**31 - 1)
    if global_rank >= world_size:
        raise ValueError(f"nvshmem_init: global_rank must be < world_size={world_size}, got {global_rank}")
    index = _device_index(device)
    if uid is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "nvshmem_init: without uid the unique id is broadcast over torch.distributed's default group, "
                "which is not initialized: call torch.distributed.init_process_group first, or pass uid="
            )
        group = (dist.get_rank(), dist.get_world_size())
        if group != (global_rank, world_size):
            raise ValueError(
                f"nvshmem_init: global_rank {global_rank} of world_size {world_size} must be this process's rank "
                f"in torch.distributed's default group, which is rank {group[0]} of {group[1]}"
            )
    torch.cuda.set_device(index)
    if _joined_already(global_rank, world_size):
        return 0
    if uid is None:
        carried = [nvshmem_get_unique_id() if global_rank == 0 else None]
        dist.broadcast_object_list(carried, src=0)
        uid = carried[0]
    return _join_with_uid(uid, global_rank, world_size)


def nvshmem_init(*args: object, **kwargs: object) -> int:
    """Joins an NVSHMEM job; blocks until every rank has joined; returns 0. Both of pplx_kernels' forms:

    nvshmem_init(uid, rank, world_size)
        `uid` is a unique id that nvshmem_get_unique_id() made on one rank and the caller broadcast.
    nvshmem_init(global_rank, local_rank, world_size, device, uid=None)
        Rank 0 makes the unique id and torch.distributed's default group broadcasts it (or `uid`, given, is used
        as it is); `device` (an index, a torch.device, or cuda.core's Device) becomes the current CUDA device.

    In a process where NVSHMEM already runs as this rank (nvshmem4py's nvshmem.core.init, say), either form joins
    nothing twice. A uid that is not one nvshmem_get_unique_id() made (an empty one the broadcast never filled, say)
    and ranks outside [0, world_size) raise ValueError; failures of NVSHMEM itself, RuntimeError."""
    current = len(args) >= 4 or any(name in kwargs for name in ("global_rank", "local_rank", "device"))
    form = _join_over_torch_distributed if current else _join_with_uid
    try:
        bound = inspect.signature(form).bind(*args, **kwargs)
    except TypeError as error:
        raise TypeError(
            f"nvshmem_init: {error}; the forms are nvshmem_init(uid, rank, world_size) and "
            "nvshmem_init(global_rank, local_rank, world_size, device, uid=None)"
        ) from None
    return form(*bound.args, **bound.kwargs)


class PyTorchStreamWrapper:
    """A torch.cuda.Stream seen through the CUDA stream protocol (`__cuda_stream__`), as cuda.core and nvshmem4py
    take streams; pplx_kernels' name."""

    def __init__(self, pt_stream: torch.cuda.Stream) -> None:
        self.pt_stream = pt_stream
        self.handle = pt_stream.cuda_stream

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.pt_stream.cuda_stream)


def nvshmem_finalize() -> None:
    """Leaves NVSHMEM. Collective. Internode AllToAll objects and nvshmem_malloc tensors still alive are
    released first; neither may be used afterwards. Where NVSHMEM was running before nvshmem_init (nvshmem4py's),
    this gives back expertwire's reference only, and NVSHMEM keeps running until its owner finalizes it."""
    torch.cuda.synchronize()
    ops.destroy_nvshmem_users()
    for memory in list(_symmetric):
        memory.close()
    ext.nvshmem_finalize()


def nvshmem_my_pe() -> int:
    """This process's NVSHMEM rank; RuntimeError before nvshmem_init."""
    return ext.nvshmem_my_pe()


def nvshmem_n_pes() -> int:
    """The NVSHMEM job's rank count; RuntimeError before nvshmem_init."""
    return ext.nvshmem_n_pes()


def nvshmem_barrier_all() -> None:
    """Every rank reaches this point before any leaves it; RuntimeError before nvshmem_init."""
    ext.nvshmem_barrier_all()


def nvshmem_barrier_all_on_current_stream() -> None:
    ext.nvshmem_barrier_all_on_stream(torch.cuda.current_stream().cuda_stream)


def nvshmem_malloc(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor in NVSHMEM's symmetric heap, zeroed. Collective: every rank allocates the same shape in the same
    order. The memory is freed (collectively) when the last reference to the tensor goes, or at nvshmem_finalize."""
    memory = ext.SymmetricMemory(max(tensor_bytes(shape, dtype), 1))
    _symmetric.add(memory)
    return tensor_over(memory.data_ptr, shape, dtype, device, owner=memory)


def nvshmem_alltoall(dest: torch.Tensor, source: torch.Tensor) -> None:
    """NVSHMEM's all-to-all on the current stream: block r of `source` goes to rank r's `dest`, one block per rank
    along dim 0. Both must come from nvshmem_malloc, with equal shapes."""
    for name, tensor in (("dest", dest), ("source", source)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"nvshmem_alltoall: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_contiguous():
            raise ValueError(f"nvshmem_alltoall: {name} must be contiguous, got strides {list(tensor.stride())}")
        if tensor.device.type != "cuda":
            raise ValueError(f"nvshmem_alltoall: {name} must be on a CUDA device, got device {tensor.device}")
    if dest.shape != source.shape or dest.dtype != source.dtype:
        raise ValueError(
            f"nvshmem_alltoall: dest must match source's {source.dtype} {list(source.shape)}, "
            f"got {dest.dtype} {list(dest.shape)}"
        )
    ranks = nvshmem_n_pes()
    if dest.dim() == 0 or dest.shape[0] != ranks:
        raise ValueError(
            f"nvshmem_alltoall: dest must have n_pes={ranks} blocks along dim 0, got shape {list(dest.shape)}"
        )
    bytes_per_rank = dest.numel() * dest.element_size() // ranks
    ext.nvshmem_alltoall_on_stream(
        dest.data_ptr(), source.data_ptr(), bytes_per_rank, ops.current_stream_handle(dest.device)
    )
