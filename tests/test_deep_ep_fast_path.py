"""CPU tests of deep_ep's low-latency fast paths: a Buffer made without NVSHMEM or a GPU, its objects fakes."""

import types

import pytest
import torch

from expertwire import deep_ep
from expertwire.deep_ep import Buffer


class _FakeA2A:
    """An AllToAll whose launches do nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def _launch_checked_dispatch(self, *args):
        pass

    def _launch_checked_combine(self, *args, **kwargs):
        pass

    def expert_output_buffer(self):
        return torch.zeros((4, 8, 128), dtype=torch.bfloat16)

    def destroy(self):
        pass


class _Half:
    def bytes_in_use(self, pool):
        return 0

    def release_idle(self, pool):
        pass

    def destroy(self):
        pass


@pytest.fixture
def buffer(monkeypatch):
    monkeypatch.setattr(deep_ep.AllToAll, "internode", staticmethod(lambda *a, **k: _FakeA2A()))
    fake_ext = types.SimpleNamespace(
        AllToAllHandle=types.SimpleNamespace(internode_symmetric_bytes=lambda config: 1 << 20),
        AllToAllConfig=lambda **fields: fields,
    )
    monkeypatch.setattr(deep_ep, "ext", fake_ext)
    b = Buffer.__new__(Buffer)
    b.low_latency_mode = True
    b.allow_nvlink_for_low_latency_mode = True
    b.explicitly_destroy = True
    b.enable_shrink, b._mask = False, None
    b.num_rdma_bytes = 1 << 30
    b.rank, b.group_size = 0, 2
    b._device = torch.device("cpu")
    b._pairs = {}
    b._destroyed = False
    b._high_throughput = _Half()
    return b


NUM_MAX, HIDDEN, EXPERTS, TOP_K = 4, 128, 8, 2


def _args(**change):
    args = dict(
        x=torch.zeros((3, HIDDEN), dtype=torch.bfloat16),
        topk_idx=torch.zeros((3, TOP_K), dtype=torch.int64),
        num_max_dispatch_tokens_per_rank=NUM_MAX,
        num_experts=EXPERTS,
        use_fp8=False,
    )
    args.update(change)
    return args


def _error(call):
    try:
        call()
    except Exception as e:  # noqa: BLE001
        return type(e), str(e)
    return None


def _combine_args(handle, change=None):
    args = dict(
        x=torch.zeros(handle[0].expert_rows_shape, dtype=torch.bfloat16),
        topk_idx=torch.zeros((3, TOP_K), dtype=torch.int64),
        topk_weights=torch.zeros((3, TOP_K)),
        handle=handle,
    )
    args.update({k: (v(handle) if callable(v) else v) for k, v in (change or {}).items()})
    return args


BAD_DISPATCH = [
    dict(x=torch.zeros((3, HIDDEN), dtype=torch.float16)),
    dict(x=torch.zeros((HIDDEN, 3), dtype=torch.bfloat16).t()),
    dict(x=torch.zeros((5, HIDDEN), dtype=torch.bfloat16)),
    dict(x=torch.zeros((3, HIDDEN), dtype=torch.bfloat16, device="meta")),
    dict(topk_idx=torch.zeros((3, TOP_K), dtype=torch.int32)),
    dict(topk_idx=torch.zeros((3, TOP_K), dtype=torch.int64, device="meta")),
    dict(topk_idx=torch.zeros((2, TOP_K), dtype=torch.int64)),
    dict(use_fp8=1),
    dict(async_finish=1),
    dict(return_recv_hook=0),
    dict(round_scale=None),
    dict(use_ue8m0=True),
    dict(dispatch_wait_recv_cost_stats=torch.zeros(2)),
    dict(cumulative_local_expert_recv_stats=torch.zeros(4, dtype=torch.int64)),
    dict(cumulative_local_expert_recv_stats=torch.zeros(3, dtype=torch.int32)),
    dict(cumulative_local_expert_recv_stats=torch.zeros((4, 1), dtype=torch.int32)),
    dict(cumulative_local_expert_recv_stats=torch.zeros(4, dtype=torch.int32, device="meta")),
    dict(cumulative_local_expert_recv_stats=[0, 0, 0, 0]),
    dict(num_max_dispatch_tokens_per_rank=True),
    dict(async_finish=True, return_recv_hook=True),
]


@pytest.mark.parametrize("change", BAD_DISPATCH, ids=[str(sorted(c)) for c in BAD_DISPATCH])
def test_second_dispatch_refuses_as_the_first(buffer, change):
    first = _error(lambda: buffer.low_latency_dispatch(**_args(**change)))
    assert first is not None
    buffer._pairs.clear()
    recv, count, handle, event, hook = buffer.low_latency_dispatch(**_args())  # makes the configuration
    buffer.low_latency_combine(**_combine_args(handle))
    assert buffer._pairs
    assert _error(lambda: buffer.low_latency_dispatch(**_args(**change))) == first


COMBINE_CASES = [
    (dict(topk_idx=torch.zeros((3, TOP_K), dtype=torch.int32)), "topk_idx must be a 2-D torch.int64"),
    (dict(topk_idx=torch.zeros((2, TOP_K), dtype=torch.int64)), "topk_idx must have the 3 rows"),
    (dict(topk_weights=torch.zeros((3, TOP_K), dtype=torch.float64)), "topk_weights must be torch.float32"),
    (dict(x=torch.zeros((4, 8, 128), dtype=torch.float16)), "x must be torch.bfloat16"),
    (dict(x=torch.zeros((4, 128, 8), dtype=torch.bfloat16).transpose(1, 2)), "x must be contiguous"),
    (dict(out=torch.zeros((3, HIDDEN), dtype=torch.float32)), "out must be torch.bfloat16"),
    (dict(use_logfmt=True), "use_logfmt"),
    (dict(zero_copy=1), "zero_copy must be a bool"),
    (dict(async_finish=True, return_recv_hook=True), "cannot both be set"),
    (dict(handle=lambda h: (h[0], None, NUM_MAX + 1, HIDDEN, EXPERTS)), "are not those of its dispatch"),
]


@pytest.mark.parametrize("change, match", COMBINE_CASES, ids=[m for _, m in COMBINE_CASES])
def test_combine_after_a_good_one_refuses_as_ever(buffer, change, match):
    for _ in range(2):  # the second round's configuration and handle have been through the fast path
        _, _, handle, _, _ = buffer.low_latency_dispatch(**_args())
        with pytest.raises((ValueError, NotImplementedError), match=match):
            buffer.low_latency_combine(**_combine_args(handle, change))
        buffer.low_latency_combine(**_combine_args(handle))  # the good call still passes


def test_combine_refuses_stale_handles(buffer):
    _, _, handle, _, _ = buffer.low_latency_dispatch(**_args())
    buffer.low_latency_combine(**_combine_args(handle))
    with pytest.raises(ValueError, match="combined already"):
        buffer.low_latency_combine(**_combine_args(handle))
    _, _, handle, _, _ = buffer.low_latency_dispatch(**_args())
    other = Buffer.__new__(Buffer)
    other.__dict__.update(buffer.__dict__)
    other._pairs = dict(buffer._pairs)
    with pytest.raises(ValueError, match="another Buffer"):
        other.low_latency_combine(**_combine_args(handle))
    buffer.destroy()
    with pytest.raises(RuntimeError, match="was destroyed"):
        buffer.low_latency_combine(**_combine_args(handle))
    with pytest.raises(RuntimeError, match="was destroyed"):
        buffer.low_latency_dispatch(**_args())
