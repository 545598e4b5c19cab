"""CPU-only: expertwire.deep_ep matches DeepEP's Buffer API by name, argument and default, names what it does not
provide, checks its arguments before touching a GPU, and its fp8 cast is the reference's bit for bit."""

from __future__ import annotations

import inspect
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from expertwire import deep_ep, reference
from expertwire.deep_ep import Buffer, EventOverlap


def signature(fn: object) -> list[tuple[str, object]]:
    return [
        (name, p.default)
        for name, p in inspect.signature(fn).parameters.items()  # type: ignore[arg-type]
        if name not in ("self", "cls")
    ]


EMPTY = inspect.Parameter.empty


def test_signatures_are_deep_eps() -> None:
    assert signature(Buffer.__init__) == [
        ("group", EMPTY),
        ("num_nvl_bytes", 0),
        ("num_rdma_bytes", 0),
        ("low_latency_mode", False),
        ("num_qps_per_rank", 24),
        ("allow_nvlink_for_low_latency_mode", True),
        ("allow_mnnvl", False),
        ("explicitly_destroy", False),
        ("enable_shrink", False),
        ("comm", None),
    ]
    assert signature(Buffer.low_latency_dispatch) == [
        ("x", EMPTY),
        ("topk_idx", EMPTY),
        ("num_max_dispatch_tokens_per_rank", EMPTY),
        ("num_experts", EMPTY),
        ("cumulative_local_expert_recv_stats", None),
        ("dispatch_wait_recv_cost_stats", None),
        ("use_fp8", True),
        ("round_scale", False),
        ("use_ue8m0", False),
        ("async_finish", False),
        ("return_recv_hook", False),
    ]
    assert signature(Buffer.low_latency_combine) == [
        ("x", EMPTY),
        ("topk_idx", EMPTY),
        ("topk_weights", EMPTY),
        ("handle", EMPTY),
        ("use_logfmt", False),
        ("zero_copy", False),
        ("async_finish", False),
        ("return_recv_hook", False),
        ("out", None),
        ("combine_wait_recv_cost_stats", None),
    ]
    assert signature(Buffer.get_low_latency_rdma_size_hint) == [
        ("num_max_dispatch_tokens_per_rank", EMPTY),
        ("hidden", EMPTY),
        ("num_ranks", EMPTY),
        ("num_experts", EMPTY),
    ]
    assert signature(Buffer.clean_low_latency_buffer) == [
        ("num_max_dispatch_tokens_per_rank", EMPTY),
        ("hidden", EMPTY),
        ("num_experts", EMPTY),
    ]
    assert signature(Buffer.get_next_low_latency_combine_buffer) == [("handle", EMPTY)]
    assert signature(EventOverlap.__init__) == [("event", None), ("extra_tensors", None)]
    assert deep_ep.topk_idx_t is torch.int64
    assert Buffer.num_sms == 20


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(group=None), ValueError, "either group or comm must be provided"),
        (dict(group=None, comm=object()), NotImplementedError, "an mpi4py communicator"),
        (dict(group=object(), low_latency_mode=True, num_rdma_bytes=-1), ValueError, "num_rdma_bytes must be in"),
        (dict(group=object(), low_latency_mode=True, num_nvl_bytes=1.5), ValueError, "num_nvl_bytes must be an int"),
        (dict(group=object(), low_latency_mode=True, num_qps_per_rank=0), ValueError, "num_qps_per_rank must be in"),
        (dict(group=object(), low_latency_mode=1), ValueError, "low_latency_mode must be a bool"),
        (dict(group=object(), low_latency_mode=True, enable_shrink=True), NotImplementedError, "enable_shrink"),
        (dict(group=object()), NotImplementedError, "the high-throughput half of Buffer"),
        (dict(group=object(), low_latency_mode=True), ValueError, "group must be a torch.distributed.ProcessGroup"),
    ],
)
def test_constructor_refuses_before_touching_a_gpu(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        Buffer(**kwargs)


def test_what_is_not_provided_is_named() -> None:
    for static in (Buffer.get_dispatch_config, Buffer.get_combine_config):
        with pytest.raises(NotImplementedError, match="the high-throughput half"):
            static(8)
    buffer = Buffer.__new__(Buffer)  # a Buffer's methods that refuse need none of its state
    for method in ("get_dispatch_layout", "dispatch", "combine", "internode_dispatch", "internode_combine"):
        with pytest.raises(NotImplementedError, match=f"Buffer.{method} \\(the high-throughput half\\)"):
            getattr(buffer, method)()
    for method, args in (
        ("low_latency_update_mask_buffer", (0,)),
        ("low_latency_query_mask_buffer", (torch.zeros(2),)),
        ("low_latency_clean_mask_buffer", ()),
    ):
        with pytest.raises(NotImplementedError, match="masking ranks"):
            getattr(buffer, method)(*args)
    with pytest.raises(NotImplementedError, match="get_local_buffer_tensor"):
        buffer.get_local_buffer_tensor(torch.bfloat16, (1,))


def test_set_num_sms_takes_even_counts() -> None:
    before = Buffer.num_sms
    try:
        Buffer.set_num_sms(24)
        assert Buffer.num_sms == 24
        with pytest.raises(ValueError, match="new_num_sms must be even, got 25"):
            Buffer.set_num_sms(25)
        assert Buffer.num_sms == 24
    finally:
        Buffer.num_sms = before


def test_size_hint_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="num_max_dispatch_tokens_per_rank must be in"):
        Buffer.get_low_latency_rdma_size_hint(0, 7168, 8, 256)
    with pytest.raises(ValueError, match="hidden must be an int"):
        Buffer.get_low_latency_rdma_size_hint(128, "7168", 8, 256)


def test_event_overlap_without_an_event() -> None:
    event = EventOverlap()
    with pytest.raises(ValueError, match="no event"):
        event.current_stream_wait()
    with event as entered:  # leaving waits for nothing
        assert entered is event
    calls: list[int] = []
    event.register_hook_after_wait(lambda: calls.append(1))
    with pytest.raises(ValueError, match="a hook is already registered"):
        event.register_hook_after_wait(lambda: None)


def _tokens(m: int, hidden: int, seed: int) -> torch.Tensor:
    """bf16 rows whose blocks span magnitudes: some all zero (the amax floor), some tiny (subnormal e4m3), some
    large, and exact ties of e4m3's rounding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((m, hidden), generator=g) * torch.logspace(-6, 3, m)[:, None]
    x[0, :128] = 0
    x[1, 128:256] = 1e-6
    x[2, :8] = torch.tensor([448.0, -448.0, 1.0625, 1.1875, 0.0, -0.0, 3e-5, 460.0])
    x[3, 5] = float("nan")  # stays a NaN; the rest of its block is scaled by the other values
    x[3, 300] = -float("nan")
    return x.to(torch.bfloat16)


@pytest.mark.parametrize("round_scale, use_ue8m0", [(False, False), (True, False), (True, True)])
def test_fp8_cast_is_the_references_bit_for_bit(round_scale: bool, use_ue8m0: bool) -> None:
    x = _tokens(16, 1024, seed=3)
    values, scales = deep_ep.cast_fp8_blocks(x, round_scale, use_ue8m0)
    want_values, want_scales = reference.cast_fp8_blocks(x, round_scale, use_ue8m0)
    assert values.dtype == torch.float8_e4m3fn and values.shape == (16, 1024)
    assert torch.equal(values.view(torch.uint8), want_values.view(torch.uint8))
    assert scales.dtype == want_scales.dtype and scales.shape == want_scales.shape
    assert torch.equal(scales.view(torch.int32), want_scales.view(torch.int32))


def test_config_is_named_as_not_provided() -> None:
    with pytest.raises(NotImplementedError, match="deep_ep.Config"):
        deep_ep.Config(20, 6, 256, 6, 128)


def test_the_optional_shim_serves_import_deep_ep(tmp_path: pathlib.Path) -> None:
    """shims/deep_ep installs the module name deep_ep, whose Buffer is expertwire's (never installed by default)."""
    shim = pathlib.Path(__file__).resolve().parent.parent / "shims" / "deep_ep"
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(shim),
        ],
        check=True,
    )
    probe = "import deep_ep, expertwire.deep_ep as e; assert deep_ep.Buffer is e.Buffer; print(deep_ep.__file__)"
    env = dict(os.environ, PYTHONPATH=str(target))
    found = subprocess.run([sys.executable, "-c", probe], check=True, env=env, capture_output=True, text=True)
    assert found.stdout.strip().startswith(str(target))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.zeros(2, 256), round_scale=False, use_ue8m0=False), "x must be a 2-D torch.bfloat16 tensor"),
        (dict(x=torch.zeros(2, 200, dtype=torch.bfloat16), round_scale=False, use_ue8m0=False), "multiple of 128"),
        (dict(x=torch.zeros(2, 256, dtype=torch.bfloat16), round_scale=True, use_ue8m0=True), "multiple of 512"),
        (dict(x=torch.zeros(2, 512, dtype=torch.bfloat16), round_scale=False, use_ue8m0=True), "needs round_scale"),
    ],
)
def test_fp8_cast_checks_its_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        deep_ep.cast_fp8_blocks(**kwargs)


def test_event_overlap_release_handle_by_call() -> None:
    event = EventOverlap()
    assert event(release_handle=True) is event
    with event:
        pass
