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

from ._native import ext

_live: dict[int, "ext.AllToAllHandle"] = {}
_uses_nvshmem: set[int] = set()
_next_handle = itertools.count(1)

_SCALAR_TYPES = {
    torch.float32: ext.ScalarType.float32,
    torch.bfloat16: ext.ScalarType.bfloat16,
    torch.float16: ext.ScalarType.float16,
}


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


def _stream(tensor: torch.Tensor) -> int:
    return torch.cuda.current_stream(tensor.device).cuda_stream


def _scale_strides(tensor: torch.Tensor) -> tuple[int, ...]:
    """Byte strides of a scale tensor's dimensions, its 4-byte words' last: a float32 tensor's own strides, and
    a uint8 tensor (whose last dimension is contiguous, checks.py) reads 4 bytes as a word. A dimension of size
    0 or 1 is never stepped along: 0."""
    itemsize = tensor.element_size()
    *outer, last = (stride * itemsize if size > 1 else 0 for stride, size in zip(tensor.stride(), tensor.shape))
    return (*outer, 4 if itemsize == 1 else last)


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
        _scale_strides(out_expert_x_scale) if out_expert_x_scale is not None else (0, 0, 4),
        _scale_strides(dp_x_scale) if dp_x_scale is not None else (0, 4),
        dp_x.stride(0) * dp_x.element_size(),
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
        _SCALAR_TYPES[out_tokens.dtype],
        _address(indices),
        _address(weights),
        _address(expert_y),
        _SCALAR_TYPES[expert_y.dtype],
        indices.shape[0],
        _address(bound_m),
        do_send,
        do_recv,
        _stream(out_tokens),
    )


combine = torch.library.custom_op("expertwire::combine", mutates_args=("out_tokens",), device_types="cuda")(
    launch_combine
)


def _writes_only_its_arguments(*args: object, **kwargs: object) -> None:
    """The ops' fake (meta) implementation: they return nothing and only write tensors they were given."""
    return None


dispatch.register_fake(_writes_only_its_arguments)
combine.register_fake(_writes_only_its_arguments)
