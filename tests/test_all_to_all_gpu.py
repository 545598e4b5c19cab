"""Multi-rank GPU tests: N rank processes (N GPUs, or N ranks sharing one GPU under CUDA MPS) run dispatch and
combine through the Python API and compare every rank's outputs with the C++ reference model, for both
transports. Skipped, with the reason, where no GPU is visible or ranks would share a GPU without MPS.

Rank counts: EXPERTWIRE_TEST_RANKS (comma-separated, default "2,4"). scripts/device/run_pytest_gpu.sh runs these
tests under a fresh MPS daemon.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist

import expertwire

from .all_to_all_data import (
    Case,
    GroupData,
    check_combine,
    check_dispatch,
    local_expert_factors,
    make_groups,
    run_experts,
)
from .distributed import RankInfo, launch, nvshmem_join, why_transport_cannot_run

RANK_COUNTS = [int(n) for n in os.environ.get("EXPERTWIRE_TEST_RANKS", "2,4").split(",") if n.strip()]
TRANSPORTS = ["internode", "intranode"]


def _require_ranks(world_size: int, transport: str = "internode") -> None:
    reason = why_transport_cannot_run(transport, world_size)
    if reason is not None:
        pytest.skip(reason)


def _cases(world_size: int) -> list[Case]:
    cases = [
        Case("fp8", torch.bfloat16, torch.bfloat16, scale_layout="padded"),
        Case("bf16", torch.bfloat16, torch.float32, index_dtype=torch.int64),
        Case("bf16", torch.float16, torch.float16, use_bound_m=False),
        Case("fp8", torch.float16, torch.float32, split=True, scale_layout="column-major", index_dtype=torch.int64),
        Case("bf16", torch.float32, torch.bfloat16),
    ]
    if world_size >= 4:
        cases += [
            Case("fp8", torch.bfloat16, torch.bfloat16, dp_size=2),
            Case("bf16", torch.bfloat16, torch.float16, dp_size=2, split=True),
        ]
    return cases


def make_all_to_all(transport: str, case: Case, info: RankInfo, **options: bool) -> expertwire.AllToAll:
    """An object of `case` on `transport`; `options`: the factory's keywords (fault_tolerant)."""
    factory = expertwire.AllToAll.internode if transport == "internode" else expertwire.AllToAll.intranode
    return factory(
        max_num_tokens=case.max_num_tokens,
        num_experts=case.num_experts,
        experts_per_token=case.experts_per_token,
        rank=info.rank,
        world_size=info.world_size,
        dp_size=case.dp_size,
        hidden_dim=case.hidden_dim,
        hidden_dim_bytes=case.hidden_dim_bytes,
        hidden_dim_scale_bytes=case.hidden_dim_scale_bytes,
        **options,
    )


def scale_tensor(case: Case, rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A zeroed float32 [*rows, scale_columns] view laid out as case.scale_layout says."""
    columns = case.scale_columns
    if case.scale_layout == "padded":
        return torch.zeros((*rows, (case.hidden_dim + 3) // 4 * 4), device=device)[..., :columns]
    if case.scale_layout == "column-major":
        return torch.zeros((*rows[:-1], columns, rows[-1]), device=device).transpose(-1, -2)
    return torch.zeros((*rows, columns), device=device)


class RankBuffers:
    """This rank's inputs (on the GPU) and outputs for one case."""

    def __init__(self, case: Case, info: RankInfo, mine: GroupData) -> None:
        device = info.device
        local = case.num_experts // info.world_size
        recv = case.max_num_tokens * (info.world_size // case.dp_size)
        self.expert_num_tokens = torch.full((local,), -1, dtype=torch.int32, device=device)
        self.expert_x = torch.zeros((local, recv, case.hidden_dim), dtype=case.payload_dtype, device=device)
        self.expert_x_scale = None if case.payload != "fp8" else scale_tensor(case, (local, recv), device)
        self.dp_x = mine.x.to(device)
        self.dp_x_scale = None
        if mine.x_scale is not None:
            self.dp_x_scale = scale_tensor(case, (mine.rows,), device)
            self.dp_x_scale.copy_(mine.x_scale)
        self.indices = mine.indices.to(device=device, dtype=case.index_dtype)
        self.weights = mine.weights.to(device)
        self.bound_m = torch.tensor([mine.m], dtype=torch.uint32, device=device) if case.use_bound_m else None
        self.out_tokens = torch.full((mine.rows, case.hidden_dim), float("nan"), dtype=case.out_dtype, device=device)
        self.expert_factors = local_expert_factors(info.rank, local, device)

    def load(self, mine: GroupData) -> None:
        """Copies another draw of tokens into the same tensors (same row count), as a graph replay needs."""
        self.dp_x.copy_(mine.x)
        if self.dp_x_scale is not None and mine.x_scale is not None:
            self.dp_x_scale.copy_(mine.x_scale)
        self.indices.copy_(mine.indices)
        self.weights.copy_(mine.weights)
        if self.bound_m is not None:
            self.bound_m.fill_(mine.m)
        self.out_tokens.fill_(float("nan"))


def dispatch_and_combine(a2a: expertwire.AllToAll, case: Case, b: RankBuffers, in_buffer: bool = False) -> None:
    """One dispatch, the test experts, one combine; with `in_buffer`, the tokens go to a2a.dispatch_input_buffer()
    (their scales to dispatch_input_scale_buffer(), when contiguous) and the experts' outputs to
    a2a.expert_output_buffer(), and the calls read them from there."""
    halves = [(True, False), (False, True)] if case.split else [(True, True)]
    dp_x, dp_x_scale = b.dp_x, b.dp_x_scale
    if in_buffer:
        # Garbage first: the last call staged these very tokens there, which would hide a copy that never landed.
        a2a.dispatch_input_buffer(torch.uint8).fill_(0xFF)
        dp_x = a2a.dispatch_input_buffer(dp_x.dtype)[: dp_x.shape[0]].copy_(dp_x)
        if dp_x_scale is not None and case.scale_layout == "contiguous":
            a2a.dispatch_input_scale_buffer().fill_(float("nan"))
            dp_x_scale = a2a.dispatch_input_scale_buffer()[: dp_x_scale.shape[0]].copy_(dp_x_scale)
    for do_send, do_recv in halves:
        a2a.dispatch(
            b.expert_num_tokens,
            b.expert_x,
            b.expert_x_scale,
            dp_x,
            dp_x_scale,
            b.indices,
            b.bound_m,
            do_send=do_send,
            do_recv=do_recv,
        )
    expert_y = run_experts(case, b.expert_x, b.expert_factors)
    if in_buffer:
        expert_y = a2a.expert_output_buffer(expert_y.dtype).copy_(expert_y)
    for do_send, do_recv in halves:
        a2a.combine(b.out_tokens, b.indices, b.weights, expert_y, b.bound_m, do_send=do_send, do_recv=do_recv)


def _check(case: Case, info: RankInfo, groups: list[GroupData], b: RankBuffers) -> None:
    check_dispatch(case, info.rank, info.world_size, groups, b.expert_num_tokens, b.expert_x, b.expert_x_scale)
    if case.scale_layout == "padded" and b.expert_x_scale is not None:
        # Only the scales are written: vLLM's padding past them stays as allocated.
        rows = b.expert_x_scale.shape[:-1]
        padded = b.expert_x_scale.as_strided((*rows, b.expert_x_scale.stride(-2)), b.expert_x_scale.stride())
        assert not padded[..., case.scale_columns :].any(), "out_expert_x_scale written past its scale columns"
    check_combine(case, info.rank, info.world_size, groups, b.out_tokens)


def _calls_on_one_object(
    transport: str, case: Case, info: RankInfo, seed: int, in_buffer_per_call: tuple[bool, ...]
) -> None:
    """dispatch + experts + combine on one object, once per entry of in_buffer_per_call (see dispatch_and_combine),
    each checked against the reference: a later call proves the one before left every signal and counter reset."""
    groups = make_groups(case, info.world_size, seed)
    a2a = make_all_to_all(transport, case, info)
    buffers = RankBuffers(case, info, groups[info.rank // case.dp_size])
    for in_buffer in in_buffer_per_call:
        buffers.out_tokens.fill_(float("nan"))
        dispatch_and_combine(a2a, case, buffers, in_buffer)
        torch.cuda.synchronize()
        a2a.check_errors()
        _check(case, info, groups, buffers)
    dist.barrier()
    a2a.destroy()


def _with_transport(info: RankInfo, transport: str, body: Callable[[], None]) -> None:
    if transport == "internode":
        nvshmem_join(info)
    body()
    # Only after success: finalizing is collective, and a rank that failed must exit so the launcher stops the rest.
    if transport == "internode":
        expertwire.nvshmem_finalize()


def _join_by_current_form(info: RankInfo) -> None:
    """pplx_kernels' current nvshmem_init: the unique id travels over torch.distributed inside the call."""
    assert expertwire.nvshmem_init(info.rank, info.local_rank, info.world_size, info.device) == 0
    assert torch.cuda.current_device() == info.device.index
    assert (expertwire.nvshmem_my_pe(), expertwire.nvshmem_n_pes()) == (info.rank, info.world_size)
    # Again, by keyword: NVSHMEM runs as this rank already, so nothing joins twice.
    again = dict(global_rank=info.rank, local_rank=info.local_rank, world_size=info.world_size, device=info.device)
    assert expertwire.nvshmem_init(**again) == 0
    empty = expertwire.nvshmem_alloc_empty_unique_id()
    with pytest.raises(ValueError, match=f"already runs in this process as rank {info.rank} of {info.world_size}"):
        expertwire.nvshmem_init(info.rank, info.local_rank, info.world_size + 1, info.device, uid=empty)


def _join_through_nvshmem4py(info: RankInfo, call_nvshmem_init: bool) -> None:
    """NVIDIA's nvshmem4py starts NVSHMEM; expertwire.nvshmem_init then joins nothing and attaches its kernels
    (without it, the first AllToAll.internode attaches them)."""
    import numpy as np
    import nvshmem.core as nvshmem4py
    from cuda.core import Device

    device = Device(info.device.index)
    device.set_current()
    uid = nvshmem4py.get_unique_id(empty=info.rank != 0)
    carried = torch.from_numpy(uid._data.view(np.int8))
    dist.broadcast(carried, src=0)  # gloo: in place on the CPU array nvshmem4py reads
    nvshmem4py.init(device=device, uid=uid, rank=info.rank, nranks=info.world_size, initializer_method="uid")
    assert expertwire.nvshmem.ext.nvshmem_initialized()
    if call_nvshmem_init:
        assert expertwire.nvshmem_init(info.rank, info.local_rank, info.world_size, info.device) == 0
    else:
        torch.cuda.set_device(info.device)
    assert (expertwire.nvshmem_my_pe(), expertwire.nvshmem_n_pes()) == (info.rank, info.world_size)


def _worker_joined_by(info: RankInfo, join: str) -> None:
    """One internode case through every path after joining NVSHMEM by `join`; then expertwire's finalize, which
    leaves an NVSHMEM that nvshmem4py started running for nvshmem4py to finalize."""
    if join == "current-form":
        _join_by_current_form(info)
    else:
        _join_through_nvshmem4py(info, call_nvshmem_init=join == "nvshmem4py")
    _calls_on_one_object("internode", Case("fp8", torch.bfloat16, torch.bfloat16), info, 300, (False, True))
    expertwire.nvshmem_finalize()
    if join != "current-form":
        import nvshmem.core as nvshmem4py

        assert expertwire.nvshmem.ext.nvshmem_initialized(), "expertwire finalized nvshmem4py's NVSHMEM"
        nvshmem4py.finalize()
    assert not expertwire.nvshmem.ext.nvshmem_initialized()


def _worker_eager(info: RankInfo, transport: str) -> None:
    def body() -> None:
        for seed, case in enumerate(_cases(info.world_size)):
            # The second call takes the tokens and the experts' outputs from the communication buffer (16-bit rows
            # there).
            _calls_on_one_object(transport, case, info, seed, (False, case.expert_dtype != torch.float32))

    _with_transport(info, transport, body)


def _worker_cuda_graph(info: RankInfo, transport: str) -> None:
    """Captures dispatch + experts + combine in one CUDA graph, then replays it on new tokens and new bound_m."""

    def body() -> None:
        case = Case("fp8", torch.bfloat16, torch.bfloat16)
        # A graph replays fixed shapes: every draw has max_num_tokens rows; bound_m and the data change.
        rows = case.max_num_tokens
        groups = make_groups(case, info.world_size, seed=100, rows=rows)
        a2a = make_all_to_all(transport, case, info)
        buffers = RankBuffers(case, info, groups[info.rank // case.dp_size])
        dispatch_and_combine(a2a, case, buffers)  # eager warm-up
        torch.cuda.synchronize()
        dist.barrier()

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            dispatch_and_combine(a2a, case, buffers)
        for seed in (101, 102, 103):
            groups = make_groups(case, info.world_size, seed, rows=rows)
            buffers.load(groups[info.rank // case.dp_size])
            torch.cuda.synchronize()
            dist.barrier()  # every rank's inputs are in place before any rank's replay reads a peer's
            graph.replay()
            torch.cuda.synchronize()
            a2a.check_errors()
            _check(case, info, groups, buffers)
        dist.barrier()
        del graph
        a2a.destroy()

    _with_transport(info, transport, body)


def _worker_compile(info: RankInfo, transport: str) -> None:
    """dispatch + experts + combine under torch.compile(fullgraph=True): the custom ops trace as single nodes."""

    def body() -> None:
        case = Case("bf16", torch.bfloat16, torch.float32)
        groups = make_groups(case, info.world_size, seed=200)
        a2a = make_all_to_all(transport, case, info)
        buffers = RankBuffers(case, info, groups[info.rank // case.dp_size])
        step = torch.compile(lambda: dispatch_and_combine(a2a, case, buffers), fullgraph=True)
        step()
        torch.cuda.synchronize()
        a2a.check_errors()
        _check(case, info, groups, buffers)
        dist.barrier()
        a2a.destroy()

    _with_transport(info, transport, body)


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", RANK_COUNTS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_dispatch_combine_matches_reference(transport: str, world_size: int) -> None:
    _require_ranks(world_size, transport)
    launch(world_size, _worker_eager, transport)


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", RANK_COUNTS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cuda_graph_capture_and_replay(transport: str, world_size: int) -> None:
    _require_ranks(world_size, transport)
    launch(world_size, _worker_cuda_graph, transport)


@pytest.mark.gpu
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_torch_compile(transport: str) -> None:
    world_size = RANK_COUNTS[0]
    _require_ranks(world_size, transport)
    launch(world_size, _worker_compile, transport)


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", RANK_COUNTS)
@pytest.mark.parametrize("join", ["current-form", "nvshmem4py", "nvshmem4py-without-nvshmem_init"])
def test_nvshmem_init_current_form_and_nvshmem4py(join: str, world_size: int) -> None:
    _require_ranks(world_size)
    if join != "current-form":
        pytest.importorskip("nvshmem.core", reason="nvshmem4py (nvshmem4py-cu13) is not installed")
    launch(world_size, _worker_joined_by, join)


def _worker_nvshmem_alltoall(info: RankInfo) -> None:
    """The benchmark's NVSHMEM baseline moves the right blocks: block r of rank s lands in block s of rank r."""
    nvshmem_join(info)
    assert (expertwire.nvshmem_my_pe(), expertwire.nvshmem_n_pes()) == (info.rank, info.world_size)
    world = info.world_size
    source = expertwire.nvshmem_malloc((world, 64), torch.int32, info.device)
    dest = expertwire.nvshmem_malloc((world, 64), torch.int32, info.device)
    assert source.shape == (world, 64) and source.dtype == torch.int32 and source.device == info.device
    source.copy_((info.rank * 1000 + torch.arange(world, dtype=torch.int32))[:, None].expand(world, 64))
    expertwire.nvshmem_barrier_all()
    expertwire.nvshmem_alltoall(dest, source)
    torch.cuda.synchronize()
    want = (torch.arange(world, dtype=torch.int32) * 1000 + info.rank)[:, None].expand(world, 64)
    assert torch.equal(dest.cpu(), want), f"rank {info.rank}: {dest[:, 0].tolist()}"
    del source, dest  # collective frees, in the same order on every rank
    expertwire.nvshmem_finalize()


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", RANK_COUNTS)
def test_nvshmem_malloc_and_alltoall(world_size: int) -> None:
    _require_ranks(world_size)
    launch(world_size, _worker_nvshmem_alltoall)
