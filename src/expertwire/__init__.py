"""expertwire: MoE all-to-all dispatch and combine kernels, a drop-in for pplx_kernels.

    from expertwire import AllToAll
    from expertwire.nvshmem import nvshmem_get_unique_id, nvshmem_init, ...

Device-side failures (a peer that never arrived, a bad expert index) raise expertwire.DeviceError from
AllToAll.check_errors() and from the next dispatch/combine; invalid arguments raise ValueError.
"""

from . import autograd, reference
from ._native import ext as _ext
from .all_to_all import AllToAll
from .checks import AllToAllShape
from .high_throughput import HighThroughputAllToAll, HighThroughputDispatch
from .nvshmem import (
    PyTorchStreamWrapper,
    nvshmem_alloc_empty_unique_id,
    nvshmem_alltoall,
    nvshmem_barrier_all,
    nvshmem_barrier_all_on_current_stream,
    nvshmem_finalize,
    nvshmem_get_unique_id,
    nvshmem_init,
    nvshmem_malloc,
    nvshmem_my_pe,
    nvshmem_n_pes,
    nvshmem_unique_id_size,
)

DeviceError = _ext.DeviceError
DeviceError.__module__ = __name__


def peer_memory_unavailable_reason() -> "str | None":
    """Why this process's ranks may not use the intranode transports (``AllToAll.intranode``,
    ``HighThroughputAllToAll.intranode``), which need each other's memory, or None when they may. Today the one
    reason is ``NVSHMEM_DISABLE_P2P`` set true: the job declares its ranks apart, as on different nodes."""
    return _ext.peer_memory_unavailable_reason()


__all__ = [
    "AllToAll",
    "AllToAllShape",
    "autograd",
    "DeviceError",
    "HighThroughputAllToAll",
    "HighThroughputDispatch",
    "nvshmem_alloc_empty_unique_id",
    "nvshmem_alltoall",
    "nvshmem_barrier_all",
    "nvshmem_barrier_all_on_current_stream",
    "nvshmem_finalize",
    "nvshmem_get_unique_id",
    "nvshmem_init",
    "nvshmem_malloc",
    "nvshmem_my_pe",
    "nvshmem_n_pes",
    "nvshmem_unique_id_size",
    "peer_memory_unavailable_reason",
    "PyTorchStreamWrapper",
    "reference",
]
