"""Argument checks of dispatch and combine.

Pure functions of tensor metadata (type, dtype, shape, contiguity, device): they never touch tensor data or the
GPU, so they run on CPU tensors in CI and on fake tensors under torch.compile. Each failure is a ValueError that
names the call, the argument, what was expected and what was given. Checks run in that order per argument, the
device last, so a CPU tensor with a wrong dtype reports the dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

# Element types of combine's output and of the expert outputs it reads, as the kernels instantiate them. Rows
# travel at 16 bits: a float32 expert_y's as out_tokens' type, which must then be 16-bit (as in pplx_kernels).
COMBINE_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EXPERT_ROW_DTYPES = (torch.bfloat16, torch.float16)  # also what expert_output_buffer() holds
EXPERT_Y_DTYPES = (*EXPERT_ROW_DTYPES, torch.float32)
# Scales travel as raw bytes; pplx_kernels hands them over as float32, uint8 says "bytes" as plainly.
SCALE_DTYPES = (torch.float32, torch.uint8)


@dataclass(frozen=True)
class AllToAllShape:
    """The sizes every tensor argument is checked against (the fields of an all-to-all's configuration)."""

    max_num_tokens: int
    num_experts: int
    experts_per_token: int
    world_size: int
    dp_size: int
    hidden_dim: int
    hidden_dim_bytes: int
    hidden_dim_scale_bytes: int

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.world_size

    @property
    def max_recv_tokens(self) -> int:
        return self.max_num_tokens * (self.world_size // self.dp_size)

    @property
    def has_scales(self) -> bool:
        return self.hidden_dim_scale_bytes > 0


def dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d) for d in dtypes)


class _Checker:
    """Checks the arguments of one call; `op` prefixes every message ("dispatch", "combine")."""

    def __init__(self, op: str, device: Optional[torch.device]) -> None:
        self.op = op
        self.device = device
        self.device_source = "this AllToAll"

    def fail(self, name: str, expected: str, given: object) -> ValueError:
        return ValueError(f"{self.op}: {name} must {expected}, got {given}")

    def is_tensor(self, name: str, value: object) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise self.fail(name, "be a torch.Tensor", type(value).__name__)
        return value

    def tensor(
        self,
        name: str,
        value: object,
        dtypes: Optional[Sequence[torch.dtype]],
        shape: Sequence[int],
    ) -> torch.Tensor:
        """`dtypes` None: any (bytes that the kernels move as they are)."""
        value = self.is_tensor(name, value)
        if dtypes is not None and value.dtype not in dtypes:
            raise self.fail(name, f"have dtype {dtype_names(dtypes)}", value.dtype)
        if tuple(value.shape) != tuple(shape):
            raise self.fail(name, f"have shape {list(shape)}", list(value.shape))
        if not value.is_contiguous():
            raise self.fail(name, "be contiguous", f"strides {list(value.stride())}")
        self.on_common_device(name, value)
        return value

    def rows(self, name: str, value: torch.Tensor, shape: Sequence[int], row_bytes: int) -> None:
        """A 2-D tensor of `shape` with contiguous rows that lie any multiple of 16 bytes apart (at least
        row_bytes), as pplx_kernels' contiguous ones and AllToAll.dispatch_input_buffer()'s do."""
        if tuple(value.shape) != tuple(shape):
            raise self.fail(name, f"have shape {list(shape)}", list(value.shape))
        rows, columns = shape
        given = f"strides {list(value.stride())} of {value.element_size()}-byte elements"
        if columns > 1 and value.stride(1) != 1:
            raise self.fail(name, "have contiguous rows (stride 1 in its last dimension)", given)
        row_stride = value.stride(0) * value.element_size()
        if rows > 1 and (row_stride % 16 != 0 or row_stride < row_bytes):
            raise self.fail(name, f"have rows a multiple of 16 bytes apart, at least {row_bytes}", given)
        self.on_common_device(name, value)

    def on_common_device(self, name: str, value: torch.Tensor) -> None:
        if value.device.type != "cuda":
            raise self.fail(name, "be on a CUDA device", f"device {value.device}")
        if self.device is None:
            self.device, self.device_source = value.device, name
        elif value.device != self.device:
            raise self.fail(name, f"be on {self.device} like {self.device_source}", f"device {value.device}")

    def scales(self, name: str, value: torch.Tensor, rows: Sequence[int], row_bytes: int, written: bool) -> None:
        """A scale tensor of shape [*rows, columns] whose first row_bytes bytes a row hold the scales, with any
        strides (as pplx_kernels takes them): a float32 tensor's words may lie anywhere, a uint8 tensor's rows
        are contiguous bytes; every stride in bytes a multiple of 4. An output may not have two elements at one
        address. Strides of dimensions of size 0 or 1 are never used, and not checked."""
        itemsize = value.element_size()
        need = -(-row_bytes // itemsize)
        if value.dim() != len(rows) + 1 or tuple(value.shape[:-1]) != tuple(rows) or value.shape[-1] < need:
            expected = ", ".join([*(str(r) for r in rows), f"at least {need}"])
            raise self.fail(name, f"have shape [{expected}]", list(value.shape))
        strides = value.stride()
        given = f"strides {list(strides)}"
        used = [(stride, size) for stride, size in zip(strides, value.shape) if size > 1]
        if itemsize == 1 and value.shape[-1] > 1 and strides[-1] != 1:
            raise self.fail(name, "have contiguous rows (stride 1 in its last dimension) as uint8", given)
        if any(stride * itemsize % 4 for stride, size in zip(strides[:-1], value.shape[:-1]) if size > 1):
            raise self.fail(name, "have strides of whole 4-byte words", f"{given} of {itemsize}-byte elements")
        if written:
            # No two elements at one address: with the dimensions in stride order, each stride must reach past
            # every element of the dimensions before it.
            reach = 0
            for stride, size in sorted(used):
                if stride <= reach:
                    raise self.fail(name, "not overlap itself (two elements at one address)", given)
                reach += stride * (size - 1)
        self.on_common_device(name, value)

    def absent(self, name: str, value: object, why: str) -> None:
        if isinstance(value, torch.Tensor):
            raise self.fail(name, f"be None ({why})", f"a {value.dtype} tensor of shape {list(value.shape)}")
        if value is not None:
            raise self.fail(name, f"be None ({why})", type(value).__name__)

    def bound_m(self, value: object) -> None:
        if value is not None:
            self.tensor("bound_m", value, (torch.uint32,), (1,))

    def split(self, do_send: bool, do_recv: bool) -> None:
        if not (do_send or do_recv):
            raise self.fail("do_send or do_recv", "be True", "both False")


def _payload_columns(checker: _Checker, name: str, tensor: torch.Tensor, row_bytes: int, what: str) -> int:
    """Columns a tensor of this dtype needs to hold `row_bytes` bytes per row."""
    itemsize = tensor.element_size()
    if row_bytes % itemsize != 0:
        raise checker.fail(
            name, f"have an element size that divides {what}={row_bytes}", f"dtype {tensor.dtype} ({itemsize} bytes)"
        )
    return row_bytes // itemsize


def _token_count(checker: _Checker, name: str, tensor: torch.Tensor, shape: AllToAllShape) -> int:
    if tensor.dim() != 2:
        raise checker.fail(name, "be 2-dimensional [tokens, ...]", f"shape {list(tensor.shape)}")
    m = int(tensor.shape[0])
    if m > shape.max_num_tokens:
        raise checker.fail(name, f"have at most max_num_tokens={shape.max_num_tokens} rows", m)
    return m


def check_dispatch(
    shape: AllToAllShape,
    out_expert_num_tokens: object,
    out_expert_x: object,
    out_expert_x_scale: object,
    dp_x: object,
    dp_x_scale: object,
    indices: object,
    bound_m: object,
    do_send: bool,
    do_recv: bool,
    device: Optional[torch.device] = None,
) -> int:
    """Checks dispatch's arguments and returns m, the number of tokens in dp_x. `device`: the all-to-all's,
    which every tensor must be on (None: any one CUDA device, the same for all)."""
    c = _Checker("dispatch", device)
    c.split(do_send, do_recv)
    dp_x = c.is_tensor("dp_x", dp_x)
    m = _token_count(c, "dp_x", dp_x, shape)
    local, recv = shape.num_local_experts, shape.max_recv_tokens

    # Payloads and scales move as bytes: each tensor's own element size sets its columns (fp8 in, uint8 out is
    # fine, as in pplx_kernels).
    def columns(name: str, tensor: object, row_bytes: int, what: str) -> int:
        return _payload_columns(c, name, c.is_tensor(name, tensor), row_bytes, what)

    c.tensor("out_expert_num_tokens", out_expert_num_tokens, (torch.int32,), (local,))
    out_columns = columns("out_expert_x", out_expert_x, shape.hidden_dim_bytes, "hidden_dim_bytes")
    c.tensor("out_expert_x", out_expert_x, None, (local, recv, out_columns))
    if shape.has_scales:
        for name, value in (("out_expert_x_scale", out_expert_x_scale), ("dp_x_scale", dp_x_scale)):
            if value is None:
                raise c.fail(name, f"be a tensor (hidden_dim_scale_bytes={shape.hidden_dim_scale_bytes})", None)
            if c.is_tensor(name, value).dtype not in SCALE_DTYPES:
                raise c.fail(name, f"have dtype {dtype_names(SCALE_DTYPES)}", value.dtype)
        c.scales("out_expert_x_scale", out_expert_x_scale, (local, recv), shape.hidden_dim_scale_bytes, written=True)
    else:
        c.absent("out_expert_x_scale", out_expert_x_scale, "hidden_dim_scale_bytes=0")
        c.absent("dp_x_scale", dp_x_scale, "hidden_dim_scale_bytes=0")
    payload_columns = columns("dp_x", dp_x, shape.hidden_dim_bytes, "hidden_dim_bytes")
    c.rows("dp_x", dp_x, (m, payload_columns), shape.hidden_dim_bytes)
    if shape.has_scales:
        c.scales("dp_x_scale", dp_x_scale, (m,), shape.hidden_dim_scale_bytes, written=False)
    c.tensor("indices", indices, (torch.uint32,), (m, shape.experts_per_token))
    c.bound_m(bound_m)
    return m


def check_combine(
    shape: AllToAllShape,
    out_tokens: object,
    indices: object,
    weights: object,
    expert_y: object,
    bound_m: object,
    do_send: bool,
    do_recv: bool,
    device: Optional[torch.device] = None,
) -> int:
    """Checks combine's arguments and returns m, the number of tokens in indices. `device` as in
    check_dispatch."""
    c = _Checker("combine", device)
    c.split(do_send, do_recv)
    m = _token_count(c, "indices", c.is_tensor("indices", indices), shape)
    out_tokens = c.is_tensor("out_tokens", out_tokens)
    # out_tokens may have more rows than this call's tokens (pplx_kernels sizes it max_num_tokens, and ignores
    # the rest); rows >= m are left untouched.
    rows = int(out_tokens.shape[0]) if out_tokens.dim() == 2 else -1
    if rows < m:
        raise c.fail("out_tokens", f"have shape [at least m, {shape.hidden_dim}] with m={m}", list(out_tokens.shape))
    c.tensor("out_tokens", out_tokens, COMBINE_OUT_DTYPES, (rows, shape.hidden_dim))
    c.tensor("indices", indices, (torch.uint32,), (m, shape.experts_per_token))
    c.tensor("weights", weights, (torch.float32,), (m, shape.experts_per_token))
    c.tensor("expert_y", expert_y, EXPERT_Y_DTYPES, (shape.num_local_experts, shape.max_recv_tokens, shape.hidden_dim))
    if expert_y.dtype == torch.float32 and out_tokens.dtype not in EXPERT_ROW_DTYPES:  # type: ignore[union-attr]
        raise c.fail(
            "out_tokens",
            f"have dtype {dtype_names(EXPERT_ROW_DTYPES)} with a float32 expert_y (its rows travel as that type)",
            out_tokens.dtype,
        )
    c.bound_m(bound_m)
    return m
