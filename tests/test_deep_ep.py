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

from expertwire import _deep_ep_high_throughput, deep_ep, reference
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
        (dict(group=object(), low_latency_mode=True, enable_shrink=1), ValueError, "enable_shrink must be a bool"),
        (dict(group=object()), ValueError, "group must be a torch.distributed.ProcessGroup"),
        (dict(group=object(), low_latency_mode=True), ValueError, "group must be a torch.distributed.ProcessGroup"),
    ],
)
def test_constructor_refuses_before_touching_a_gpu(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        Buffer(**kwargs)


def test_what_is_not_provided_is_named() -> None:
    buffer = Buffer.__new__(Buffer)  # a Buffer's methods that refuse need none of its state
    with pytest.raises(NotImplementedError, match="get_local_buffer_tensor"):
        buffer.get_local_buffer_tensor(torch.bfloat16, (1,))


class _ObjectStub:
    """A low-latency object's fault-tolerant mask, in host memory."""

    def __init__(self, active: list[int]) -> None:
        self.active_ranks = torch.tensor(active, dtype=torch.int32)


class _PairStub:
    def __init__(self, *objects: _ObjectStub) -> None:
        self.objects = list(objects)

    def active_ranks(self, index: int) -> torch.Tensor:
        return self.objects[index].active_ranks


def _shrink_buffer(rank: int, world: int, enable_shrink: bool = True) -> Buffer:
    """A Buffer's mask state on the CPU (the mask calls need nothing else of it)."""
    buffer = Buffer.__new__(Buffer)
    buffer.rank, buffer.group_size, buffer._destroyed = rank, world, False
    buffer._device = torch.device("cpu")
    buffer._mask = torch.zeros(world, dtype=torch.int32) if enable_shrink else None
    buffer._pairs = {}
    return buffer


def test_mask_calls_need_enable_shrink() -> None:
    buffer = _shrink_buffer(0, 4, enable_shrink=False)
    for method, args in (
        ("low_latency_update_mask_buffer", (1, True)),
        ("low_latency_query_mask_buffer", (torch.zeros(4, dtype=torch.int32),)),
        ("low_latency_clean_mask_buffer", ()),
    ):
        with pytest.raises(ValueError, match=f"Buffer.{method}: the Buffer must be built with enable_shrink=True"):
            getattr(buffer, method)(*args)


def test_shrink_mask_folds_every_objects_losses_and_never_unmasks() -> None:
    buffer = _shrink_buffer(1, 4)
    first, second = _ObjectStub([1, 1, 1, 0]), _ObjectStub([1, 1, 1, 1])  # a wait of `first` masked rank 3
    buffer._pairs = {"config": _PairStub(first, second)}
    status = torch.full((4,), 7, dtype=torch.int32)
    buffer.low_latency_query_mask_buffer(status)
    assert status.tolist() == [0, 0, 0, 1]
    buffer.low_latency_update_mask_buffer(0, True)  # the caller masks rank 0
    buffer.low_latency_update_mask_buffer(2, False)  # not masked: nothing to do
    buffer.low_latency_query_mask_buffer(status)
    assert status.tolist() == [1, 0, 0, 1]
    # The next call of `second` takes the whole mask; it can only clear its entries.
    buffer._shrink(buffer._pairs["config"], 1)
    assert second.active_ranks.tolist() == [0, 1, 1, 0]
    # A call's own losses join the mask: a wait of `second` masks rank 2.
    second.active_ranks[2] = 0
    buffer._shrink(buffer._pairs["config"], 1)
    assert buffer._mask.tolist() == [1, 0, 1, 1] and second.active_ranks.tolist() == [0, 1, 0, 0]
    with pytest.raises(NotImplementedError, match="unmasking a masked rank"):
        buffer.low_latency_update_mask_buffer(3, False)
    with pytest.raises(NotImplementedError, match=r"ranks \[0, 2, 3\] masked"):
        buffer.low_latency_clean_mask_buffer()
    with pytest.raises(ValueError, match="rank 1 cannot mask itself out"):
        buffer.low_latency_update_mask_buffer(1, True)
    with pytest.raises(ValueError, match="rank_to_mask must be in"):
        buffer.low_latency_update_mask_buffer(4, True)
    with pytest.raises(ValueError, match="mask_status"):
        buffer.low_latency_query_mask_buffer(torch.zeros(4, dtype=torch.int64))
    assert buffer._mask.tolist() == [1, 0, 1, 1]


def test_clean_mask_with_no_rank_masked_does_nothing() -> None:
    buffer = _shrink_buffer(0, 2)
    buffer._pairs = {"config": _PairStub(_ObjectStub([1, 1]))}
    buffer.low_latency_clean_mask_buffer()
    assert buffer._mask.tolist() == [0, 0]


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


def test_config_checks_as_deep_ep_and_hints_grow_with_its_tokens() -> None:
    assert signature(deep_ep.Config.__init__) == [
        ("num_sms", 20),
        ("num_max_nvl_chunked_send_tokens", 6),
        ("num_max_nvl_chunked_recv_tokens", 256),
        ("num_max_rdma_chunked_send_tokens", 6),
        ("num_max_rdma_chunked_recv_tokens", 256),
    ]
    config = deep_ep.Config(24, 6, 256, 6, 100)
    assert config.num_max_rdma_chunked_recv_tokens == 102  # rounded up to a multiple of the send chunk
    for args, match in (
        ((-2, 6, 256, 6, 128), r"num_sms must be in \[0, "),
        ((20, 0, 256, 6, 128), r"num_max_nvl_chunked_send_tokens must be in \[1, "),
        ((20, 256, 256, 6, 128), "num_max_nvl_chunked_send_tokens must be <"),
        ((20, 6, 256, 8, 8), "at most half"),
        ((20, 6.0, 256, 6, 128), "must be an int"),
    ):
        with pytest.raises(ValueError, match=match):
            deep_ep.Config(*args)
    small, large = deep_ep.Config(20, 6, 128, 6, 128), deep_ep.Config(40, 6, 256, 6, 128)
    assert (small.hint_tokens_per_rank(), large.hint_tokens_per_rank()) == (1280, 5120)
    assert 0 < small.get_nvl_buffer_size_hint(14336, 8) < large.get_nvl_buffer_size_hint(14336, 8)
    # The put path's rows come on top.
    assert large.get_rdma_buffer_size_hint(14336, 8) > large.get_nvl_buffer_size_hint(14336, 8)
    with pytest.raises(ValueError, match="hidden_bytes must be a multiple of 16"):
        large.get_nvl_buffer_size_hint(14330, 8)


def test_recommended_configs_are_deep_eps() -> None:
    dispatch, combine = Buffer.get_dispatch_config(8), Buffer.get_combine_config(8)
    assert (dispatch.num_sms, dispatch.num_max_nvl_chunked_send_tokens, dispatch.num_max_nvl_chunked_recv_tokens) == (
        Buffer.num_sms,
        6,
        256,
    )
    assert (combine.num_max_nvl_chunked_send_tokens, combine.num_max_rdma_chunked_recv_tokens) == (4, 132)
    assert Buffer.get_dispatch_config(2).num_max_nvl_chunked_send_tokens == 24
    with pytest.raises(ValueError, match="num_ranks must be one of"):
        Buffer.get_combine_config(3)


def _layout_by_loops(topk_idx: torch.Tensor, num_experts: int, ranks: int, nodes: int):
    local = num_experts // ranks
    n = topk_idx.shape[0]
    in_rank = torch.zeros((n, ranks), dtype=torch.bool)
    per_expert = torch.zeros(num_experts, dtype=torch.int32)
    for t in range(n):
        for e in topk_idx[t].tolist():
            if e >= 0:
                in_rank[t, e // local] = True
                per_expert[e] += 1
    per_node = None
    if nodes > 1:
        per_node = torch.tensor(
            [
                sum(bool(in_rank[t, r * (ranks // nodes) : (r + 1) * (ranks // nodes)].any()) for t in range(n))
                for r in range(nodes)
            ],
            dtype=torch.int32,
        )
    return in_rank.sum(0, dtype=torch.int32), per_node, per_expert, in_rank


@pytest.mark.parametrize("ranks, nodes", [(4, 1), (8, 2), (16, 4)])
def test_dispatch_layout_counts_tokens_per_rank_node_and_expert(ranks: int, nodes: int) -> None:
    g = torch.Generator().manual_seed(ranks)
    num_experts, n, k = 4 * ranks, 37, 6
    topk_idx = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(n)])
    topk_idx[torch.rand((n, k), generator=g) < 0.25] = -1
    topk_idx[3] = -1  # a token that goes nowhere
    got = _deep_ep_high_throughput.layout_of(topk_idx, num_experts, ranks, nodes)
    want = _layout_by_loops(topk_idx, num_experts, ranks, nodes)
    for g_tensor, w_tensor in zip(got, want, strict=True):
        assert (g_tensor is None) == (w_tensor is None)
        if g_tensor is not None:
            assert g_tensor.dtype == w_tensor.dtype and torch.equal(g_tensor, w_tensor)


def test_most_tokens_is_the_largest_that_fits() -> None:
    def size(tokens: int) -> int:
        return 1000 + 37 * tokens + (tokens // 10) * 5

    for free in (0, 1036, 1037, 5000, 123456):
        best = _deep_ep_high_throughput._most_tokens(size, free)
        assert (best == 0 or size(best) <= free) and size(best + 1) > free


class _FakeBuffer:
    """What the high-throughput half reads of its Buffer before any kernel runs, on the CPU."""

    _device = torch.device("cpu")
    group_size = 4
    rank = 0
    _num_hosts = 1

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> deep_ep.Config:
        return Buffer.get_dispatch_config(num_ranks)

    @staticmethod
    def _pool_bytes_in_use(pool: str) -> int:
        return 0

    @staticmethod
    def get_combine_config(num_ranks: int) -> deep_ep.Config:
        return Buffer.get_combine_config(num_ranks)


def _half() -> _deep_ep_high_throughput.HighThroughputHalf:
    return _deep_ep_high_throughput.HighThroughputHalf(_FakeBuffer(), {"nvl": 1 << 20, "rdma": 0}, None, None)


def _dispatch_arguments(m: int = 3, k: int = 2, ranks: int = 4, experts: int = 16) -> dict:
    topk_idx = torch.zeros((m, k), dtype=torch.int64)
    return dict(
        x=torch.zeros((m, 64), dtype=torch.bfloat16),
        handle=None,
        num_tokens_per_rank=torch.zeros(ranks, dtype=torch.int32),
        num_tokens_per_rdma_rank=None,
        is_token_in_rank=torch.zeros((m, ranks), dtype=torch.bool),
        num_tokens_per_expert=torch.zeros(experts, dtype=torch.int32),
        topk_idx=topk_idx,
        topk_weights=torch.zeros((m, k), dtype=torch.float32),
        expert_alignment=1,
        num_worst_tokens=0,
        config=None,
        previous_event=None,
        async_finish=False,
        allocate_on_comm_stream=False,
    )


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(x=torch.zeros((3, 60), dtype=torch.bfloat16)), ValueError, "multiple of 16 bytes"),
        (dict(x=torch.zeros((3, 64, 2), dtype=torch.bfloat16)), ValueError, "x must be a 2-D tensor"),
        (dict(x=(torch.zeros((3, 64), dtype=torch.bfloat16), torch.zeros(3, 1))), ValueError, "values of one byte"),
        (dict(x=(torch.zeros((3, 128), dtype=torch.float8_e4m3fn), torch.zeros(2, 1))), ValueError, r"x\[1\]"),
        (dict(topk_idx=None), NotImplementedError, "without topk_idx"),
        (dict(is_token_in_rank=None), ValueError, "is_token_in_rank is required"),
        (dict(topk_idx=torch.zeros((3, 2), dtype=torch.int32)), ValueError, "topk_idx must be torch.int64"),
        (dict(topk_weights=torch.zeros((3, 3))), ValueError, r"topk_weights must be torch.float32 of shape \[3, 2\]"),
        (dict(num_tokens_per_rank=torch.zeros(3, dtype=torch.int32)), ValueError, "num_tokens_per_rank must be"),
        (dict(is_token_in_rank=torch.zeros((3, 4))), ValueError, "is_token_in_rank must be torch.bool"),
        (dict(num_tokens_per_expert=torch.zeros(14, dtype=torch.int32)), ValueError, "multiple of the group's 4"),
        (dict(num_tokens_per_rdma_rank=torch.zeros(1, dtype=torch.int32)), ValueError, "must be None within one"),
        (dict(expert_alignment=0), ValueError, r"expert_alignment must be in \[1, "),
        (dict(num_worst_tokens=-1), ValueError, r"num_worst_tokens must be in \[0, "),
        (dict(config=object()), ValueError, "config must be a deep_ep Config"),
        (dict(handle=object(), topk_idx=None, topk_weights=None), ValueError, "handle must be the handle"),
        (dict(handle=object()), ValueError, "topk_idx and topk_weights must be None with a handle"),
    ],
)
def test_high_throughput_dispatch_checks_its_arguments(change: dict, error: type, match: str) -> None:
    arguments = _dispatch_arguments()
    arguments.update(change)
    with pytest.raises(error, match=match):
        _half().dispatch(**arguments)


def test_high_throughput_combine_names_what_it_does_not_provide() -> None:
    with pytest.raises(NotImplementedError, match=r"combine\(bias=...\)"):
        _half().combine(
            torch.zeros((1, 64), dtype=torch.bfloat16), object(), None, torch.zeros(1), None, None, False, False
        )
    with pytest.raises(ValueError, match="handle must be the handle dispatch returned"):
        _half().combine(torch.zeros((1, 64), dtype=torch.bfloat16), object(), None, None, None, None, False, False)


def test_high_throughput_buffer_bytes_are_required() -> None:
    half = _deep_ep_high_throughput.HighThroughputHalf(_FakeBuffer(), {"nvl": 0, "rdma": 0}, None, None)
    with pytest.raises(ValueError, match="need num_nvl_bytes > 0"):
        half._entry("dispatch", (16, 2, 64, 128, 0), 20, 3)
    two_tokens = _half()._sizer(16, 2, 64, 128, 0, "nvl")(2)
    half = _deep_ep_high_throughput.HighThroughputHalf(_FakeBuffer(), {"nvl": two_tokens, "rdma": 0}, None, None)
    with pytest.raises(ValueError, match=r"3 tokens of this configuration need \d+ bytes of num_nvl_bytes"):
        half._entry("dispatch", (16, 2, 64, 128, 0), 20, 3)


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


class _FakeObject:
    """A high-throughput object that records its making and its tokens, for the pools' policy."""

    made: list = []

    def __init__(self, **fields: object) -> None:
        self._fields = fields
        self.destroyed = False
        _FakeObject.made.append(fields["hidden_dim"])

    @classmethod
    def intranode(cls, group_name: str, **fields: object) -> "_FakeObject":
        return cls(**fields)

    def destroy(self) -> None:
        self.destroyed = True


class _PoolBuffer(_FakeBuffer):
    """A Buffer whose pool holds what its high-throughput objects take."""

    group = type("Group", (), {"group_name": "fake"})()

    def __init__(self) -> None:
        self.half: _deep_ep_high_throughput.HighThroughputHalf = None  # type: ignore[assignment]

    def _pool_bytes_in_use(self, pool: str) -> int:  # type: ignore[override]
        return self.half.bytes_in_use(pool)


class _Pool:
    """A high-throughput half over a pool of `budget` bytes whose objects are _FakeObjects."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
        monkeypatch.setattr(_deep_ep_high_throughput, "HighThroughputAllToAll", _FakeObject)
        _FakeObject.made = []
        buffer = _PoolBuffer()
        self.half = buffer.half = _deep_ep_high_throughput.HighThroughputHalf(
            buffer, {"nvl": budget, "rdma": 0}, None, None
        )

    def tokens(self, key: tuple) -> int:
        """The tokens per rank of configuration `key`'s object."""
        return self.half.entries[key].a2a._fields["max_num_tokens"]

    def most(self, key: tuple, free: int) -> int:
        """The most tokens per rank an object of configuration `key` holds in `free` bytes."""
        return _deep_ep_high_throughput._most_tokens(self.half._sizer(*key, "nvl"), free)


def test_configurations_taking_turns_share_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    budget = 1 << 24
    pool = _Pool(monkeypatch, budget)
    half, tokens, most = pool.half, pool.tokens, pool.most
    first, second = (16, 2, 256, 512, 0), (16, 2, 512, 1024, 0)

    half._entry("dispatch", first, 20, 1)
    assert tokens(first) == most(first, budget)  # alone: the whole pool
    half._entry("dispatch", second, 20, 1)  # the idle first gives its bytes back
    assert first not in half.entries and tokens(second) == most(second, budget // 2)
    half._entry("dispatch", first, 20, 1)
    assert tokens(first) == most(first, budget // 2)
    for _ in range(3):  # from now on both stay
        half._entry("dispatch", second, 20, 1)
        half._entry("dispatch", first, 20, 1)
    assert _FakeObject.made == [256, 512, 256]
    assert half.bytes_in_use("nvl") <= budget
    # Another num_sms makes the idle object again; a dispatch awaiting its combine keeps it.
    half._entry("dispatch", first, 24, 1)
    assert half.entries[first].num_sms == 24 and _FakeObject.made == [256, 512, 256, 256]
    half.entries[first].awaiting_combine = True
    with pytest.raises(ValueError, match="num_sms=20, but this configuration's buffer was made for num_sms=24"):
        half._entry("dispatch", first, 20, 1)
    with pytest.raises(ValueError, match=r"\d+ tokens of this configuration need \d+ bytes of num_nvl_bytes"):
        half._entry("dispatch", (16, 2, 1024, 2048, 0), 20, 1 << 20)


def test_a_configuration_given_back_no_longer_takes_a_share(monkeypatch: pytest.MonkeyPatch) -> None:
    budget = 1 << 24
    pool = _Pool(monkeypatch, budget)
    half, tokens, most = pool.half, pool.tokens, pool.most
    first, second, once = (16, 2, 256, 512, 0), (16, 2, 512, 1024, 0), (16, 2, 384, 768, 0)

    for key in (first, second, once, first, second):  # `once` is evicted for the second's remake
        half._entry("dispatch", key, 20, 1)
    assert once not in half.entries
    # A remade object shares the pool with the one other holder, not with every configuration ever seen.
    half._entry("dispatch", first, 24, 1)
    assert tokens(first) == most(first, budget // 2)
    assert half.bytes_in_use("nvl") <= budget
