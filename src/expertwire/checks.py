"""Argument checks of dispatch and combine.

What is torch's own is checked here, from tensor metadata: type, dtype, shape, contiguity, device. Everything
else (counts, byte strides, what the kernels can follow) is checked once, in C++ (core/arguments.h): by the
native dispatch and combine themselves, and by check_dispatch / check_combine below through the native layout
checks, which need no storage, so both run on CPU and fake tensors. Each failure is a ValueError that names the
call, the argument, what was expected and what was given. Per argument the torch checks run in that order, the
device last, so a CPU tensor with a wrong dtype reports the dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from ._layout import dispatch_strides
from ._native import ext

# Element types of combine's output and of the expert outputs it reads, as the kernels instantiate them. Rows
# travel at 16 bits: a float32 expert_y's as out_tokens' type, which must then be 16-bit (as in pplx_kernels).
COMBINE_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EXPERT_ROW_DTYPES = (torch.bfloat16, torch.float16)  # also what expert_output_buffer() holds
EXPERT_Y_DTYPES = (*EXPERT_ROW_DTYPES, torch.float32)
# Scales travel as raw bytes; pplx_kernels hands them over as float32, uint8 says "bytes" as plainly.
SCALE_DTYPES = (torch.float32, torch.uint8)
# Expert indices as the kernels read them: pplx_kernels' uint32 (0xFFFFFFFF: no expert) or DeepEP's int64 (-1).
INDEX_DTYPES = (torch.uint32, torch.int64)
# The native element types of combine's tensors.
SCALAR_TYPES = {
    torch.float32: ext.ScalarType.float32,
    torch.bfloat16: ext.ScalarType.bfloat16,
    torch.float16: ext.ScalarType.float16,
}


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


INT64_MAX = 2**63 - 1


def integer(op: str, name: str, value: object, minimum: int = -INT64_MAX - 1, maximum: int = INT64_MAX) -> int:
    """A Python int argument (not a bool) in [minimum, maximum], the range of the native parameter it goes to: what
    the native signature would otherwise refuse with a TypeError listing itself. Ranges the configuration sets are
    the native checks'."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{op}: {name} must be an int, got {type(value).__name__} {value!r}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{op}: {name} must be in [{minimum}, {maximum}], got {value}")
    return value


def flag(op: str, name: str, value: object) -> bool:
    """A bool argument, refused (ValueError) as anything else, 0 and 1 included."""
    if not isinstance(value, bool):
        raise ValueError(f"{op}: {name} must be a bool, got {type(value).__name__}")
    return value


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

    def rows(self, name: str, value: torch.Tensor, shape: Sequence[int]) -> None:
        """A 2-D tensor of `shape` whose rows may lie apart (the native checks say how far: any multiple of 16
        bytes, as AllToAll.dispatch_input_buffer()'s do)."""
        if tuple(value.shape) != tuple(shape):
            raise self.fail(name, f"have shape {list(shape)}", list(value.shape))
        self.on_common_device(name, value)

    def on_common_device(self, name: str, value: torch.Tensor) -> None:
        if value.device.type != "cuda":
            raise self.fail(name, "be on a CUDA device", f"device {value.device}")
        if self.device is None:
            self.device, self.device_source = value.device, name
        elif value.device != self.device:
            raise self.fail(name, f"be on {self.device} like {self.device_source}", f"device {value.device}")

    def scales(self, name: str, value: torch.Tensor, rows: Sequence[int], row_bytes: int) -> None:
        """A scale tensor of shape [*rows, columns] whose first row_bytes bytes a row hold the scales, with any
        strides (as pplx_kernels takes them; the native checks want them in whole 4-byte words, and an output
        without two words at one address): a float32 tensor's words may lie anywhere, a uint8 tensor's bytes of a
        row are contiguous, four to a word."""
        itemsize = value.element_size()
        need = -(-row_bytes // itemsize)
        if value.dim() != len(rows) + 1 or tuple(value.shape[:-1]) != tuple(rows) or value.shape[-1] < need:
            expected = ", ".join([*(str(r) for r in rows), f"at least {need}"])
            raise self.fail(name, f"have shape [{expected}]", list(value.shape))
        if itemsize == 1 and value.shape[-1] > 1 and value.stride(-1) != 1:
            raise self.fail(
                name,
                "have contiguous rows (stride 1 in its last dimension) as uint8",
                f"strides {list(value.stride())}",
            )
        self.on_common_device(name, value)

    def absent(self, name: str, value: object, why: str) -> None:
        if isinstance(value, torch.Tensor):
            raise self.fail(name, f"be None ({why})", f"a {value.dtype} tensor of shape {list(value.shape)}")
        if value is not None:
            raise self.fail(name, f"be None ({why})", type(value).__name__)

    def bound_m(self, value: object) -> None:
        if value is not None:
            self.tensor("bound_m", value, (torch.uint32,), (1,))


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


@functools.lru_cache(maxsize=64)
def _native_config(shape: AllToAllShape) -> "ext.AllToAllConfig":
    """The native configuration of `shape` (as rank 0's: the layout checks do not depend on the rank)."""
    return ext.AllToAllConfig(rank=0, **dataclasses.asdict(shape))


# dispatch's fp8_cast: the names of the native Fp8Cast values (params.h), in their order.
FP8_CASTS = ("none", "block-scales", "power-of-two-scales", "ue8m0-scales")


def fp8_cast_code(op: str, fp8_cast: object) -> int:
    if fp8_cast not in FP8_CASTS:
        raise ValueError(f"{op}: fp8_cast must be one of {', '.join(map(repr, FP8_CASTS))}, got {fp8_cast!r}")
    return FP8_CASTS.index(fp8_cast)  # type: ignore[arg-type]


def check_dispatch_tensors(
    shape: AllToAllShape,
    out_expert_num_tokens: object,
    out_expert_x: object,
    out_expert_x_scale: object,
    dp_x: object,
    dp_x_scale: object,
    indices: object,
    bound_m: object,
    device: Optional[torch.device] = None,
    fp8_cast: int = 0,
) -> int:
    """The torch checks of dispatch's arguments; returns m, the number of tokens in dp_x. `device`: the
    all-to-all's, which every tensor must be on (None: any one CUDA device, the same for all). `fp8_cast`: a
    FP8_CASTS index; with a cast, dp_x is bfloat16 [m, hidden_dim] and dp_x_scale None."""
    c = _Checker("dispatch", device)
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
    cast_name = FP8_CASTS[fp8_cast]
    if fp8_cast != 0:
        if not shape.has_scales:
            raise c.fail("fp8_cast", "be 'none' for an object without scales (hidden_dim_scale_bytes=0)", cast_name)
        c.absent("dp_x_scale", dp_x_scale, f"fp8_cast={cast_name!r} makes the scales")
    if shape.has_scales:
        # With a cast the output's scales only: the cast makes them.
        given = [("out_expert_x_scale", out_expert_x_scale)] + ([] if fp8_cast else [("dp_x_scale", dp_x_scale)])
        why = (
            f"fp8_cast={cast_name!r} makes scales"
            if fp8_cast
            else f"hidden_dim_scale_bytes={shape.hidden_dim_scale_bytes}"
        )
        for name, value in given:
            if value is None:
                raise c.fail(name, f"be a tensor ({why})", None)
            if c.is_tensor(name, value).dtype not in SCALE_DTYPES:
                raise c.fail(name, f"have dtype {dtype_names(SCALE_DTYPES)}", value.dtype)
        c.scales("out_expert_x_scale", out_expert_x_scale, (local, recv), shape.hidden_dim_scale_bytes)
    else:
        c.absent("out_expert_x_scale", out_expert_x_scale, "hidden_dim_scale_bytes=0")
        c.absent("dp_x_scale", dp_x_scale, "hidden_dim_scale_bytes=0")
    if fp8_cast != 0:
        if dp_x.dtype != torch.bfloat16:
            raise c.fail("dp_x", f"have dtype torch.bfloat16 (fp8_cast={cast_name!r} casts it)", dp_x.dtype)
        if dp_x.dim() == 2 and dp_x.shape[1] > 1 and dp_x.stride(1) != 1:
            raise c.fail("dp_x", "have contiguous rows (stride 1 in its last dimension)", list(dp_x.stride()))
        c.rows("dp_x", dp_x, (m, shape.hidden_dim))
    else:
        payload_columns = columns("dp_x", dp_x, shape.hidden_dim_bytes, "hidden_dim_bytes")
        c.rows("dp_x", dp_x, (m, payload_columns))
        if shape.has_scales:
            c.scales("dp_x_scale", dp_x_scale, (m,), shape.hidden_dim_scale_bytes)
    c.tensor("indices", indices, INDEX_DTYPES, (m, shape.experts_per_token))
    c.bound_m(bound_m)
    return m


def check_dispatch(
    shape: AllToAllShape,
    *,
    do_send: bool,
    do_recv: bool,
    device: Optional[torch.device] = None,
    fp8_cast: int = 0,
    **tensors: object,
) -> int:
    """Every check of dispatch's arguments that needs no live all-to-all: the torch checks of `tensors` (dispatch's
    tensor arguments by name, as check_dispatch_tensors takes them), then the native layout checks; returns m.
    AllToAll.dispatch makes the same checks, the native ones in the call itself."""
    m = check_dispatch_tensors(shape, **tensors, device=device, fp8_cast=fp8_cast)  # type: ignore[arg-type]
    ext.check_dispatch_layout(
        _native_config(shape),
        m,
        do_send,
        do_recv,
        shape.has_scales,
        *dispatch_strides(tensors["out_expert_x_scale"], tensors["dp_x_scale"], tensors["dp_x"]),  # type: ignore[arg-type]
        cast=fp8_cast,
    )
    return m


def check_combine_tensors(
    shape: AllToAllShape,
    out_tokens: object,
    indices: object,
    weights: object,
    expert_y: object,
    bound_m: object,
    device: Optional[torch.device] = None,
) -> int:
    """The torch checks of combine's arguments; returns m, the number of tokens in indices. `device` as in
    check_dispatch_tensors."""
    c = _Checker("combine", device)
    m = _token_count(c, "indices", c.is_tensor("indices", indices), shape)
    out_tokens = c.is_tensor("out_tokens", out_tokens)
    # out_tokens may have more rows than this call's tokens (pplx_kernels sizes it max_num_tokens, and ignores
    # the rest); rows >= m are left untouched.
    rows = int(out_tokens.shape[0]) if out_tokens.dim() == 2 else -1
    if rows < m:
        raise c.fail("out_tokens", f"have shape [at least m, {shape.hidden_dim}] with m={m}", list(out_tokens.shape))
    c.tensor("out_tokens", out_tokens, COMBINE_OUT_DTYPES, (rows, shape.hidden_dim))
    c.tensor("indices", indices, INDEX_DTYPES, (m, shape.experts_per_token))
    c.tensor("weights", weights, (torch.float32,), (m, shape.experts_per_token))
    c.tensor("expert_y", expert_y, EXPERT_Y_DTYPES, (shape.num_local_experts, shape.max_recv_tokens, shape.hidden_dim))
    c.bound_m(bound_m)
    return m


def check_combine(
    shape: AllToAllShape, *, do_send: bool, do_recv: bool, device: Optional[torch.device] = None, **tensors: object
) -> int:
    """Every check of combine's arguments that needs no live all-to-all (as check_dispatch); returns m."""
    m = check_combine_tensors(shape, **tensors, device=device)  # type: ignore[arg-type]
    ext.check_combine_layout(
        _native_config(shape),
        m,
        SCALAR_TYPES[tensors["out_tokens"].dtype],  # type: ignore[union-attr]
        SCALAR_TYPES[tensors["expert_y"].dtype],  # type: ignore[union-attr]
        do_send,
        do_recv,
    )
    return m
