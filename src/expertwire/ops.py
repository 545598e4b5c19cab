"""torch.library custom ops around the native dispatch and combine, so that torch.compile traces them as opaque
ops with declared in-place outputs, and the launchers they share with eager calls.

An op cannot take a C++ object, so each live all-to-all is registered under an integer handle that the ops
receive; arguments are checked by the caller (AllToAll.dispatch/combine) before an op is reached. Eager calls
(and CUDA graph capture, which records the same launches) go straight to launch_dispatch/launch_combine: passing
through the torch dispatcher costs tens of microseconds of host time a call, which a latency-bound MoE layer
cannot spare.
"""

from __future__ import annotations

import itertools
from typing import Optional

import torch

from ._layout import dispatch_strides
from ._native import ext
from .checks import SCALAR_TYPES

_live: dict[int, "ext.AllToAllHandle"] = {}
_uses_nvshmem: set[int] = set()
_next_handle = itertools.count(1)


def register(native: "ext.AllToAllHandle", uses_nvshmem: bool) -> int:
    handle = next(_next_handle)
    _live[handle] = native
    if uses_nvshmem:
        _uses_nvshmem.add(handle)
    return handle


def unregister(handle: int) -> Optional["ext.AllToAllHandle"]:
    _uses_nvshmem.discard(handle)
    return _live.pop(handle, None)


def destroy_nvshmem_users() -> None:
    """Destroys every live all-to-all that holds NVSHMEM memory (before NVSHMEM is finalized under it)."""
    for handle in sorted(_uses_nvshmem):
        found = unregister(handle)
        if found is not None:
            found.destroy()


def native(handle: int) -> "ext.AllToAllHandle":
    found = _live.get(handle)
    if found is None:
        raise RuntimeError(f"expertwire: AllToAll handle {handle} was destroyed (or never created)")
    return found


def _address(tensor: Optional[torch.Tensor]) -> int:
    return 0 if tensor is None else tensor.data_ptr()


# The current stream's raw handle without a torch.cuda.Stream object made for it: a tenth of the host time of
# torch.cuda.current_stream(device).cuda_stream, which a latency-bound call pays on every launch.
_raw_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_stream_handle(device: torch.device) -> int:
    """The cudaStream_t of the current stream on `device` (a CUDA device), as an integer."""
    if _raw_current_stream is None:
        return torch.cuda.current_stream(device).cuda_stream
    return _raw_current_stream(device.index if device.index is not None else torch.cuda.current_device())


def _stream(tensor: torch.Tensor) -> int:
    return current_stream_handle(tensor.device)


def launch_dispatch(
    handle: int,
    out_expert_num_tokens: torch.Tensor,
    out_expert_x: torch.Tensor,
    out_expert_x_scale: Optional[torch.Tensor],
    dp_x: torch.Tensor,
    dp_x_scale: Optional[torch.Tensor],
    indices: torch.Tensor,
    bound_m: Optional[torch.Tensor],
    do_send: bool,
    do_recv: bool,
    fp8_cast: int = 0,
) -> None:
    native(handle).dispatch(
        _address(out_expert_num_tokens),
        _address(out_expert_x),
        _address(out_expert_x_scale),
        _address(dp_x),
        _address(dp_x_scale),
        _address(indices),
        dp_x.shape[0],
        _address(bound_m),
        do_send,
        do_recv,
        _stream(out_expert_x),
        *dispatch_strides(out_expert_x_scale, dp_x_scale, dp_x),
        fp8_cast,
        indices.dtype == torch.int64,
    )


# The ops run the launchers themselves (torch.library wraps the function and leaves it callable as it is).
dispatch = torch.library.custom_op(
    "expertwire::dispatch",
    mutates_args=("out_expert_num_tokens", "out_expert_x", "out_expert_x_scale"),
    device_types="cuda",
)(launch_dispatch)


def launch_combine(
    handle: int,
    out_tokens: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    expert_y: torch.Tensor,
    bound_m: Optional[torch.Tensor],
    do_send: bool,
    do_recv: bool,
) -> None:
    native(handle).combine(
        _address(out_tokens),
        SCALAR_TYPES[out_tokens.dtype],
        _address(indices),
        _address(weights),
        _address(expert_y),
        SCALAR_TYPES[expert_y.dtype],
        indices.shape[0],
        _address(bound_m),
        do_send,
        do_recv,
        _stream(out_tokens),
        indices.dtype == torch.int64,
    )


combine = torch.library.custom_op("expertwire::combine", mutates_args=("out_tokens",), device_types="cuda")(
    launch_combine
)


def _writes_only_its_arguments(*args: object, **kwargs: object) -> None:
    """The ops' fake (meta) implementation: they return nothing and only write tensors they were given."""
    return None


dispatch.register_fake(_writes_only_its_arguments)
combine.register_fake(_writes_only_its_arguments)
