"""NVSHMEM bootstrap and helpers with pplx_kernels' names: the unique id travels as a CPU uint8 tensor, so any
torch.distributed broadcast can carry it from rank 0 to the others."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from . import ops
from ._device_memory import tensor_bytes, tensor_over
from ._native import ext
from .checks import integer

_symmetric: "weakref.WeakSet[ext.SymmetricMemory]" = weakref.WeakSet()


def nvshmem_unique_id_size() -> int:
    return ext.nvshmem_unique_id_bytes()


def nvshmem_get_unique_id() -> torch.Tensor:
    """A fresh unique id (on one rank, usually 0), to broadcast to every rank before nvshmem_init."""
    return torch.frombuffer(bytearray(ext.nvshmem_unique_id()), dtype=torch.uint8)


def nvshmem_alloc_empty_unique_id() -> torch.Tensor:
    """A zeroed tensor of a unique id's size: the receive buffer of the broadcast."""
    return torch.zeros(nvshmem_unique_id_size(), dtype=torch.uint8, device="cpu")


def nvshmem_init(uid: torch.Tensor, rank: int, world_size: int) -> int:
    """Joins the NVSHMEM job named by `uid` as `rank` of `world_size`; blocks until every rank has joined.
    Returns 0. A uid that is not one nvshmem_get_unique_id() made (an empty one the broadcast never filled, say)
    and a rank outside [0, world_size) raise ValueError; failures of NVSHMEM itself, RuntimeError."""
    integer("nvshmem_init", "rank", rank, minimum=-(2**31), maximum=2**31 - 1)
    integer("nvshmem_init", "world_size", world_size, minimum=-(2**31), maximum=2**31 - 1)
    size = nvshmem_unique_id_size()
    if not isinstance(uid, torch.Tensor):
        raise ValueError(f"nvshmem_init: uid must be a torch.Tensor, got {type(uid).__name__}")
    # Any shape of `size` bytes, as pplx_kernels takes it (a [1, size] row of a gathered batch, say).
    if uid.dtype != torch.uint8 or uid.numel() != size:
        raise ValueError(
            f"nvshmem_init: uid must be a uint8 tensor of {size} elements, got {uid.dtype} of shape {list(uid.shape)}"
        )
    if uid.device.type != "cpu":
        raise ValueError(f"nvshmem_init: uid must be on the CPU, got device {uid.device}")
    ext.nvshmem_init(bytes(uid.reshape(-1).tolist()), rank, world_size)
    torch.cuda.synchronize()
    return 0


def nvshmem_finalize() -> None:
    """Leaves NVSHMEM. Collective. Internode AllToAll objects and nvshmem_malloc tensors still alive are
    released first; neither may be used afterwards."""
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
        dest.data_ptr(), source.data_ptr(), bytes_per_rank, torch.cuda.current_stream(dest.device).cuda_stream
    )
