"""CPU-only: every argument of dispatch and combine is checked from its metadata (torch's part in Python, the
layout in the native checks), and each failure is a ValueError naming the argument, what was expected and what
was given."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from expertwire._layout import row_strides, scale_strides
from expertwire.checks import AllToAllShape, check_combine, check_dispatch

SHAPE = AllToAllShape(
    max_num_tokens=8,
    num_experts=8,
    experts_per_token=2,
    world_size=4,
    dp_size=1,
    hidden_dim=256,
    hidden_dim_bytes=256,
    hidden_dim_scale_bytes=8,
)
NO_SCALES = AllToAllShape(
    max_num_tokens=8,
    num_experts=8,
    experts_per_token=2,
    world_size=4,
    dp_size=2,
    hidden_dim=256,
    hidden_dim_bytes=512,
    hidden_dim_scale_bytes=0,
)


def dispatch_args(shape: AllToAllShape, m: int = 5, device: str = "cuda") -> dict[str, Any]:
    """Valid dispatch arguments (fp8 payload when the shape has scales, bf16 otherwise), as fake tensors."""
    local, recv = shape.num_local_experts, shape.max_recv_tokens
    payload = torch.float8_e4m3fn if shape.has_scales else torch.bfloat16
    columns = shape.hidden_dim_bytes // torch.empty((), dtype=payload).element_size()
    scale_columns = shape.hidden_dim_scale_bytes // 4
    return dict(
        out_expert_num_tokens=torch.empty(local, dtype=torch.int32, device=device),
        out_expert_x=torch.empty(local, recv, columns, dtype=payload, device=device),
        out_expert_x_scale=torch.empty(local, recv, scale_columns, device=device) if shape.has_scales else None,
        dp_x=torch.empty(m, columns, dtype=payload, device=device),
        dp_x_scale=torch.empty(m, scale_columns, device=device) if shape.has_scales else None,
        indices=torch.empty(m, shape.experts_per_token, dtype=torch.uint32, device=device),
        bound_m=torch.empty(1, dtype=torch.uint32, device=device),
        do_send=True,
        do_recv=True,
    )


def combine_args(
    shape: AllToAllShape, m: int = 5, out_dtype: torch.dtype = torch.bfloat16, device: str = "cuda"
) -> dict[str, Any]:
    return dict(
        out_tokens=torch.empty(shape.max_num_tokens, shape.hidden_dim, dtype=out_dtype, device=device),
        indices=torch.empty(m, shape.experts_per_token, dtype=torch.uint32, device=device),
        weights=torch.empty(m, shape.experts_per_token, device=device),
        expert_y=torch.empty(
            shape.num_local_experts, shape.max_recv_tokens, shape.hidden_dim, dtype=torch.bfloat16, device=device
        ),
        bound_m=None,
        do_send=True,
        do_recv=True,
    )


@pytest.fixture
def fake_cuda():
    """CUDA tensors with metadata only: the checks never touch data, so no GPU is needed."""
    with FakeTensorMode():
        yield


def _raises(fn: Any, pattern: str, **kwargs: Any) -> None:
    with pytest.raises(ValueError, match=pattern):
        fn(**kwargs)


@pytest.mark.parametrize("shape", [SHAPE, NO_SCALES], ids=["fp8+scales", "bf16"])
def test_valid_arguments_pass_and_return_m(fake_cuda: None, shape: AllToAllShape) -> None:
    assert check_dispatch(shape, **dispatch_args(shape, m=5)) == 5
    assert check_dispatch(shape, **{**dispatch_args(shape, m=0), "bound_m": None}) == 0
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert check_combine(shape, **combine_args(shape, m=3, out_dtype=out_dtype)) == 3


def test_cpu_tensors_are_rejected_naming_device() -> None:
    args = dispatch_args(SHAPE, device="cpu")
    _raises(
        lambda **kw: check_dispatch(SHAPE, **kw),
        r"dispatch: out_expert_num_tokens must be on a CUDA device, got device cpu",
        **args,
    )
    args = combine_args(SHAPE, device="cpu")
    _raises(
        lambda **kw: check_combine(SHAPE, **kw), r"combine: out_tokens must be on a CUDA device, got device cpu", **args
    )


@pytest.mark.parametrize(
    "name, value, message",
    [
        (
            "out_expert_num_tokens",
            lambda: torch.empty(2, dtype=torch.int64, device="cuda"),
            "out_expert_num_tokens must have dtype torch.int32, got torch.int64",
        ),
        (
            "out_expert_num_tokens",
            lambda: torch.empty(3, dtype=torch.int32, device="cuda"),
            r"out_expert_num_tokens must have shape \[2\], got \[3\]",
        ),
        (
            "out_expert_x",
            lambda: torch.empty(2, 8, 256, dtype=torch.float8_e4m3fn, device="cuda"),
            r"out_expert_x must have shape \[2, 32, 256\], got \[2, 8, 256\]",
        ),
        (
            "out_expert_x",
            lambda: torch.empty(2, 32, 256, dtype=torch.bfloat16, device="cuda"),
            r"out_expert_x must have shape \[2, 32, 128\], got \[2, 32, 256\]",
        ),
        (
            "out_expert_x_scale",
            lambda: None,
            r"out_expert_x_scale must be a tensor \(hidden_dim_scale_bytes=8\), got None",
        ),
        (
            "out_expert_x_scale",
            lambda: torch.empty(2, 32, 2, dtype=torch.float16, device="cuda"),
            "out_expert_x_scale must have dtype torch.float32 or torch.uint8, got torch.float16",
        ),
        (
            "dp_x",
            lambda: torch.empty(9, 256, dtype=torch.float8_e4m3fn, device="cuda"),
            "dp_x must have at most max_num_tokens=8 rows, got 9",
        ),
        (
            "dp_x",
            lambda: torch.empty(5, 256, 1, dtype=torch.float8_e4m3fn, device="cuda"),
            r"dp_x must be 2-dimensional \[tokens, ...\], got shape \[5, 256, 1\]",
        ),
        ("dp_x", lambda: "not a tensor", "dp_x must be a torch.Tensor, got str"),
        (
            "dp_x",
            lambda: torch.empty(5, 512, dtype=torch.float8_e4m3fn, device="cuda")[:, ::2],
            r"dp_x's bytes must be contiguous within a row \(element stride 1 byte\), got an element stride of 2 bytes",
        ),
        (  # rows 8 bytes further apart than their 256: not a whole 16-byte vector
            "dp_x",
            lambda: torch.empty(5, 264, dtype=torch.float8_e4m3fn, device="cuda")[:, :256],
            r"dp_x's rows must lie a multiple of 16 bytes apart, at least hidden_dim_bytes=256, got a row stride of "
            r"264 bytes",
        ),
        (
            "dp_x_scale",
            lambda: torch.empty(5, 1, device="cuda"),
            r"dp_x_scale must have shape \[5, at least 2\], got \[5, 1\]",
        ),
        (
            "dp_x_scale",
            lambda: torch.empty(5, 16, dtype=torch.uint8, device="cuda")[:, ::2],
            r"dp_x_scale must have contiguous rows \(stride 1 in its last dimension\) as uint8, got strides \[16, 2\]",
        ),
        (
            "dp_x_scale",
            lambda: torch.empty(5, 9, dtype=torch.uint8, device="cuda")[:, :8],
            r"dp_x_scale: row stride must be a multiple of 4 bytes, got 9",
        ),
        (
            "out_expert_x_scale",
            lambda: torch.empty(1, 1, 2, device="cuda").expand(2, 32, 2),
            r"out_expert_x_scale must not overlap itself \(two words at one address\), got byte strides \(0, 0, 4\) "
            r"over shape \[2, 32, 2\]",
        ),
        (  # rows 1 word apart but 2 words wide: not only stride 0 overlaps
            "out_expert_x_scale",
            lambda: torch.empty(2 * 32 + 1, device="cuda").as_strided((2, 32, 2), (32, 1, 1)),
            r"out_expert_x_scale must not overlap itself \(two words at one address\), got byte strides "
            r"\(128, 4, 4\) over shape \[2, 32, 2\]",
        ),
        (
            "out_expert_x_scale",
            lambda: torch.empty(2, 16, 2, device="cuda"),
            r"out_expert_x_scale must have shape \[2, 32, at least 2\], got \[2, 16, 2\]",
        ),
        (
            "dp_x_scale",
            lambda: torch.empty(5, 2, dtype=torch.float64, device="cuda"),
            "dp_x_scale must have dtype torch.float32 or torch.uint8, got torch.float64",
        ),
        (
            "indices",
            lambda: torch.empty(5, 2, dtype=torch.int32, device="cuda"),
            "indices must have dtype torch.uint32 or torch.int64, got torch.int32",
        ),
        (
            "indices",
            lambda: torch.empty(4, 2, dtype=torch.uint32, device="cuda"),
            r"indices must have shape \[5, 2\], got \[4, 2\]",
        ),
        (
            "indices",
            lambda: torch.empty(2, 5, dtype=torch.uint32, device="cuda").t(),
            r"indices must be contiguous, got strides \[1, 5\]",
        ),
        (
            "bound_m",
            lambda: torch.empty(1, dtype=torch.int32, device="cuda"),
            "bound_m must have dtype torch.uint32, got torch.int32",
        ),
        (
            "bound_m",
            lambda: torch.empty((), dtype=torch.uint32, device="cuda"),
            r"bound_m must have shape \[1\], got \[\]",
        ),
    ],
)
def test_dispatch_argument_errors_name_the_argument(
    fake_cuda: None, name: str, value: Callable[[], object], message: str
) -> None:
    args = {**dispatch_args(SHAPE, m=5), name: value()}
    _raises(lambda **kw: check_dispatch(SHAPE, **kw), "^dispatch: " + message + "$", **args)


def test_dispatch_scales_must_be_absent_without_scale_bytes(fake_cuda: None) -> None:
    args = {**dispatch_args(NO_SCALES), "dp_x_scale": torch.empty(5, 2, device="cuda")}
    _raises(
        lambda **kw: check_dispatch(NO_SCALES, **kw),
        re.escape(
            "dispatch: dp_x_scale must be None (hidden_dim_scale_bytes=0), got a torch.float32 tensor of shape [5, 2]"
        ),
        **args,
    )


def test_dispatch_payload_itemsize_must_divide_hidden_dim_bytes(fake_cuda: None) -> None:
    shape = AllToAllShape(8, 8, 2, 4, 1, hidden_dim=255, hidden_dim_bytes=255, hidden_dim_scale_bytes=0)
    args = {
        **dispatch_args(NO_SCALES),
        "out_expert_x": torch.empty(2, 32, 255, dtype=torch.uint8, device="cuda"),
        "dp_x": torch.empty(5, 128, dtype=torch.bfloat16, device="cuda"),
    }
    _raises(
        lambda **kw: check_dispatch(shape, **kw),
        re.escape(
            "dispatch: dp_x must have an element size that divides hidden_dim_bytes=255, "
            "got dtype torch.bfloat16 (2 bytes)"
        ),
        **args,
    )


def test_a_scale_dtype_outside_the_list_is_named_before_its_element_size(fake_cuda: None) -> None:
    """float64's 8 bytes do not divide 4 scale bytes; the message names the dtype, which is what is wrong."""
    shape = AllToAllShape(8, 8, 2, 4, 1, hidden_dim=256, hidden_dim_bytes=256, hidden_dim_scale_bytes=4)
    args = {**dispatch_args(shape), "dp_x_scale": torch.empty(5, 1, dtype=torch.float64, device="cuda")}
    _raises(
        lambda **kw: check_dispatch(shape, **kw),
        re.escape("dispatch: dp_x_scale must have dtype torch.float32 or torch.uint8, got torch.float64"),
        **args,
    )


def test_payload_and_scales_move_as_bytes_whatever_their_types(fake_cuda: None) -> None:
    """fp8 in and uint8 out, float32 scales in and uint8 scales out: each tensor's columns follow its own element
    size, as pplx_kernels copies bytes."""
    args = {
        **dispatch_args(SHAPE),
        "out_expert_x": torch.empty(2, 32, 256, dtype=torch.uint8, device="cuda"),
        "out_expert_x_scale": torch.empty(2, 32, 8, dtype=torch.uint8, device="cuda"),
        "dp_x_scale": torch.empty(5, 8, dtype=torch.uint8, device="cuda"),
    }
    assert check_dispatch(SHAPE, **args) == 5


def test_scales_take_any_word_strides_as_pplx_kernels_does(fake_cuda: None) -> None:
    """vLLM's per-token fp8 pads out_expert_x_scale's rows (round_up(hidden_dim, 4) words, 2 used here), DeepGEMM
    reads scales column-major, and a per-tensor scale may be broadcast to every token (row stride 0)."""
    padded = torch.empty(2, 32, 256, device="cuda")
    column_major = torch.empty(2, 2, 32, device="cuda").transpose(1, 2)
    broadcast = torch.empty(1, 2, device="cuda").expand(5, 2)
    for out_scale, dp_scale in ((padded, broadcast), (column_major, torch.empty(2, 5, device="cuda").t())):
        args = {**dispatch_args(SHAPE), "out_expert_x_scale": out_scale, "dp_x_scale": dp_scale}
        assert check_dispatch(SHAPE, **args) == 5


def test_dp_x_rows_may_lie_apart_as_in_the_dispatch_input_buffer(fake_cuda: None) -> None:
    """AllToAll.dispatch_input_buffer() gives rows that lie further apart than their bytes; any caller's dp_x may
    too, a multiple of 16 bytes apart."""
    padded = torch.empty(5, 256 + 48, dtype=torch.float8_e4m3fn, device="cuda")[:, :256]
    assert check_dispatch(SHAPE, **{**dispatch_args(SHAPE), "dp_x": padded}) == 5


def test_strides_of_dimensions_of_size_0_or_1_are_not_used(fake_cuda: None) -> None:
    """One token in a slice of a wider uint8 buffer, and no token at all in a transposed one."""
    shape = AllToAllShape(8, 8, 2, 4, 1, hidden_dim=256, hidden_dim_bytes=256, hidden_dim_scale_bytes=8)
    one_row = {**dispatch_args(shape, m=1), "dp_x_scale": torch.empty(9, 9, dtype=torch.uint8, device="cuda")[:1, :8]}
    assert check_dispatch(shape, **one_row) == 1
    no_rows = {**dispatch_args(shape, m=0), "dp_x_scale": torch.empty(8, 0, dtype=torch.uint8, device="cuda").t()}
    assert check_dispatch(shape, **no_rows) == 0


def test_scale_strides_are_passed_in_bytes_with_the_word_stride_last() -> None:
    column_major = torch.empty(2, 2, 32).transpose(1, 2)
    assert scale_strides(column_major) == (256, 4, 128)
    assert scale_strides(torch.empty(1, 2).expand(5, 2)) == (0, 4)
    assert scale_strides(torch.empty(5, 12, dtype=torch.uint8)[:, :8]) == (12, 4)
    assert scale_strides(torch.empty(9, 9, dtype=torch.uint8)[:1, :8]) == (0, 4)


def test_payload_strides_are_bytes_with_packed_rows_as_element_stride_1() -> None:
    """The native dispatch moves a row's bytes as they are: a row of packed elements of any size is packed bytes."""
    assert row_strides(torch.empty(5, 256, dtype=torch.bfloat16)) == (512, 1)
    assert row_strides(torch.empty(5, 304, dtype=torch.float8_e4m3fn)[:, :256]) == (304, 1)
    assert row_strides(torch.empty(5, 512, dtype=torch.bfloat16)[:, ::2]) == (1024, 4)


def test_tensors_must_be_on_the_all_to_alls_device(fake_cuda: None) -> None:
    args = dispatch_args(SHAPE)
    assert check_dispatch(SHAPE, **args, device=torch.device("cuda", 0)) == 5
    _raises(
        lambda **kw: check_dispatch(SHAPE, **kw, device=torch.device("cuda", 1)),
        re.escape("dispatch: out_expert_num_tokens must be on cuda:1 like this AllToAll, got device cuda:0"),
        **args,
    )
    _raises(
        lambda **kw: check_combine(SHAPE, **kw, device=torch.device("cuda", 1)),
        re.escape("combine: out_tokens must be on cuda:1 like this AllToAll, got device cuda:0"),
        **combine_args(SHAPE),
    )


def test_devices_must_agree(fake_cuda: None) -> None:
    args = {**dispatch_args(SHAPE), "indices": torch.empty(5, 2, dtype=torch.uint32, device="cuda:1")}
    _raises(
        lambda **kw: check_dispatch(SHAPE, **kw),
        re.escape("dispatch: indices must be on cuda:0 like out_expert_num_tokens, got device cuda:1"),
        **args,
    )


def test_split_needs_a_half(fake_cuda: None) -> None:
    args = {**dispatch_args(SHAPE), "do_send": False, "do_recv": False}
    _raises(
        lambda **kw: check_dispatch(SHAPE, **kw), "^dispatch: do_send or do_recv must be True, got both False$", **args
    )
    args = {**combine_args(SHAPE), "do_send": False, "do_recv": False}
    _raises(
        lambda **kw: check_combine(SHAPE, **kw), "^combine: do_send or do_recv must be True, got both False$", **args
    )


@pytest.mark.parametrize(
    "name, value, message",
    [
        (
            "out_tokens",
            lambda: torch.empty(8, 256, dtype=torch.float64, device="cuda"),
            "out_tokens must have dtype torch.float32 or torch.bfloat16 or torch.float16, got torch.float64",
        ),
        (
            "out_tokens",
            lambda: torch.empty(4, 256, dtype=torch.bfloat16, device="cuda"),
            re.escape("out_tokens must have shape [at least m, 256] with m=5, got [4, 256]"),
        ),
        (
            "out_tokens",
            lambda: torch.empty(8, 128, dtype=torch.bfloat16, device="cuda"),
            re.escape("out_tokens must have shape [8, 256], got [8, 128]"),
        ),
        (
            "indices",
            lambda: torch.empty(9, 2, dtype=torch.uint32, device="cuda"),
            "indices must have at most max_num_tokens=8 rows, got 9",
        ),
        (
            "indices",
            lambda: torch.empty(5, 2, dtype=torch.int32, device="cuda"),
            "indices must have dtype torch.uint32 or torch.int64, got torch.int32",
        ),
        (
            "weights",
            lambda: torch.empty(5, 2, dtype=torch.bfloat16, device="cuda"),
            "weights must have dtype torch.float32, got torch.bfloat16",
        ),
        ("weights", lambda: torch.empty(5, 3, device="cuda"), re.escape("weights must have shape [5, 2], got [5, 3]")),
        (
            "expert_y",
            lambda: torch.empty(2, 32, 256, dtype=torch.float64, device="cuda"),
            "expert_y must have dtype torch.bfloat16 or torch.float16 or torch.float32, got torch.float64",
        ),
        (
            "expert_y",
            lambda: torch.empty(2, 16, 256, dtype=torch.bfloat16, device="cuda"),
            re.escape("expert_y must have shape [2, 32, 256], got [2, 16, 256]"),
        ),
    ],
)
def test_combine_argument_errors_name_the_argument(
    fake_cuda: None, name: str, value: Callable[[], object], message: str
) -> None:
    args = {**combine_args(SHAPE, m=5), name: value()}
    _raises(lambda **kw: check_combine(SHAPE, **kw), "^combine: " + message + "$", **args)


def test_float32_expert_y_needs_16_bit_out_tokens(fake_cuda: None) -> None:
    """pplx_kernels takes a float32 expert_y with bfloat16 or float16 out_tokens; its rows travel as that type."""
    y = torch.empty(SHAPE.num_local_experts, SHAPE.max_recv_tokens, SHAPE.hidden_dim, device="cuda")
    for out_dtype in (torch.bfloat16, torch.float16):
        assert check_combine(SHAPE, **{**combine_args(SHAPE, out_dtype=out_dtype), "expert_y": y}) == 5
    _raises(
        lambda **kw: check_combine(SHAPE, **kw),
        re.escape(
            "combine: a float32 expert_y needs bfloat16 or float16 out_tokens (its rows travel as that type), got "
            "float32 out_tokens"
        ),
        **{**combine_args(SHAPE, out_dtype=torch.float32), "expert_y": y},
    )


def test_out_tokens_may_have_more_rows_than_max_num_tokens(fake_cuda: None) -> None:
    """Rows past m are left untouched, as pplx_kernels leaves them."""
    args = {**combine_args(SHAPE, m=3), "out_tokens": torch.empty(20, 256, dtype=torch.bfloat16, device="cuda")}
    assert check_combine(SHAPE, **args) == 3


def _cast_args(shape: AllToAllShape, m: int = 5) -> dict[str, Any]:
    """Valid arguments of a dispatch that casts bf16 tokens to fp8 on the way."""
    args = dispatch_args(shape, m)
    args["dp_x"] = torch.empty(m, shape.hidden_dim, dtype=torch.bfloat16, device="cuda")
    args["dp_x_scale"] = None
    return args


@pytest.mark.usefixtures("fake_cuda")
def test_dispatch_with_an_fp8_cast() -> None:
    cast_shape = dataclasses.replace(SHAPE, hidden_dim=512, hidden_dim_bytes=512, hidden_dim_scale_bytes=16)
    assert check_dispatch(cast_shape, fp8_cast=1, **_cast_args(cast_shape)) == 5
    assert check_dispatch(cast_shape, fp8_cast=2, **_cast_args(cast_shape)) == 5
    with pytest.raises(ValueError, match=r"dp_x_scale must be None \(fp8_cast='block-scales' makes the scales\)"):
        check_dispatch(
            cast_shape, fp8_cast=1, **{**_cast_args(cast_shape), "dp_x_scale": torch.empty(5, 4, device="cuda")}
        )
    fp8_rows = {**_cast_args(cast_shape), "dp_x": torch.empty(5, 512, dtype=torch.float8_e4m3fn, device="cuda")}
    with pytest.raises(ValueError, match=r"dp_x must have dtype torch.bfloat16"):
        check_dispatch(cast_shape, fp8_cast=1, **fp8_rows)
    # UE8M0 scales take a quarter of the words: this shape's 16 bytes are block scales.
    with pytest.raises(ValueError, match=r"needs hidden_dim_scale_bytes=4, got 16"):
        check_dispatch(cast_shape, fp8_cast=3, **_cast_args(cast_shape))
    bf16_payload = dataclasses.replace(SHAPE, hidden_dim_bytes=512)
    with pytest.raises(ValueError, match=r"needs hidden_dim_bytes = hidden_dim=256 \(one e4m3 byte a value\), got 512"):
        check_dispatch(bf16_payload, fp8_cast=1, **_cast_args(bf16_payload))
