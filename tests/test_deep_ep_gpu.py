"""Multi-rank GPU tests of expertwire.deep_ep.Buffer's low-latency half, called as DeepEP's users call it, against
the reference model: every expert receives exactly its tokens (fp8 values and scales as the reference cast makes
them), and combine returns each token's weighted sum of its experts' outputs. Ranks as test_all_to_all_gpu.py."""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections import Counter
from typing import Optional

import pytest
import torch
import torch.distributed as dist

import expertwire
from expertwire import reference
from expertwire.deep_ep import Buffer

from .distributed import RankInfo, launch, why_transport_cannot_run

RANK_COUNTS = [int(n) for n in os.environ.get("EXPERTWIRE_TEST_RANKS", "2,4").split(",") if n.strip()]
NUM_MAX, HIDDEN, TOP_K = 16, 1024, 4


@dataclasses.dataclass(frozen=True)
class Call:
    use_fp8: bool = True
    round_scale: bool = False
    use_ue8m0: bool = False
    return_recv_hook: bool = False
    zero_copy: bool = False
    async_finish: bool = False
    into_out: bool = False


CALLS = {
    "fp8": Call(),
    "fp8-ue8m0-hooks-zero-copy": Call(round_scale=True, use_ue8m0=True, return_recv_hook=True, zero_copy=True),
    "fp8-round-scale-async": Call(round_scale=True, async_finish=True),
    "bf16-out": Call(use_fp8=False, into_out=True),
    # vLLM's DeepEP low-latency prepare/finalize: fp8 dispatch without hook or async, combine into its output.
    "vllm-fp8-out": Call(into_out=True),
    # SGLang's DeepEP dispatcher without hooks: async_finish=not return_recv_hook, then the event's wait.
    "sglang-fp8-async": Call(async_finish=True),
}


def _inputs(
    rank: int, num_experts: int, seed: int, m: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A rank's tokens (unless m is given, m varies with the rank and one rank may send none), distinct experts
    per row with about one slot in five -1, and weights."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    if m is None:
        m = (rank * 7 + seed) % (NUM_MAX + 1)
    x = (torch.randn((m, HIDDEN), generator=g) * torch.logspace(-2, 2, HIDDEN)[None, :]).to(torch.bfloat16)
    rows = [torch.randperm(num_experts, generator=g)[:TOP_K] for _ in range(m)]
    idx = torch.stack(rows) if rows else torch.empty((0, TOP_K), dtype=torch.int64)
    idx[torch.rand((m, TOP_K), generator=g) < 0.2] = -1
    weights = torch.rand((m, TOP_K), generator=g)
    # The cast's edges in the first tokens: a zero block (the amax floor), a tiny one, e4m3's largest value and a
    # tie, a saturating value, signed zeros and NaNs.
    edges = torch.tensor([448.0, -448.0, 1.0625, 1.1875, 0.0, -0.0, 460.0, float("nan"), -float("nan")])
    x = x.float()
    if m > 0:
        x[0, :128] = 0.0
        x[0, 128:256] = 1e-6
    if m > 1:
        x[1, : edges.numel()] = edges
    return x.to(torch.bfloat16), idx.to(torch.int64), weights


def _expert_factor(expert: int, num_experts: int) -> float:
    return 0.5 + expert / num_experts


def _dequantized(values: torch.Tensor, scales: torch.Tensor, call: Call) -> torch.Tensor:
    """fp8 rows [n, HIDDEN] back to float32 by their scales (float32 [n, HIDDEN/128], or UE8M0 int32 [n,
    HIDDEN/512])."""
    if call.use_ue8m0:
        exponents = scales.contiguous().view(torch.uint8).to(torch.int32)
        scales = ((exponents << 23).view(torch.float32)).reshape(values.shape[0], values.shape[1] // 128)  # n may be 0
    return values.float() * scales.float().repeat_interleave(128, dim=1)


def _expected_rows(x: torch.Tensor, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    """What every expert must receive of these tokens: (payload bytes, scale bytes) per token."""
    if not call.use_fp8:
        return x.view(torch.uint8), torch.zeros((x.shape[0], 0), dtype=torch.uint8)
    values, scales = reference.cast_fp8_blocks(x, call.round_scale, call.use_ue8m0)
    return values.view(torch.uint8), scales.contiguous().view(torch.uint8)


def _meet() -> None:
    """Every rank's checks done before any rank's combine waits for its peers, so that the test's host-side work
    never runs into the combine's timeout."""
    torch.cuda.synchronize()
    dist.barrier()


def _no_device_error(a2a) -> None:
    """A timed-out wait leaves the call's outputs incomplete and is recorded for the next call: raise it here,
    as a DeviceError naming the wait, before the values are compared."""
    torch.cuda.synchronize()
    a2a.check_errors()


def _assert_combined(
    combined: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, call: Call, num_experts: int
) -> None:
    """combined holds each token's weighted sum of its experts' outputs: the dispatched payload (dequantized)
    times the expert's factor, rounded to bf16 as the experts return it."""
    if call.use_fp8:
        payload_rows = _dequantized(*reference.cast_fp8_blocks(x, call.round_scale, call.use_ue8m0), call)
    else:
        payload_rows = x.float()
    want = torch.zeros((x.shape[0], HIDDEN))
    for t in range(x.shape[0]):
        for k in range(TOP_K):
            e = int(idx[t, k])
            if e >= 0:
                row = (payload_rows[t] * _expert_factor(e, num_experts)).to(torch.bfloat16).float()
                want[t] += weights[t, k] * row
    torch.testing.assert_close(
        combined.cpu().float(), want.to(torch.bfloat16).float(), rtol=2**-7, atol=1e-6, equal_nan=True
    )


def _low_latency_pattern(info: RankInfo, name: str) -> None:
    call = CALLS[name]
    world, rank, device = info.world_size, info.rank, info.device
    num_experts = 4 * world
    local = num_experts // world
    hint = Buffer.get_low_latency_rdma_size_hint(NUM_MAX, HIDDEN, world, num_experts)
    buffer = Buffer(dist.group.WORLD, num_rdma_bytes=hint, low_latency_mode=True, explicitly_destroy=True)
    stats = torch.zeros(local, dtype=torch.int32, device=device)
    expected_stats = torch.zeros(local, dtype=torch.int32)
    # Two dispatches before their combines: the two objects of the configuration in turn, as DeepEP allows.
    for seeds in ((1, 2), (3, 4)):
        rounds = []
        for seed in seeds:
            x, idx, weights = _inputs(rank, num_experts, seed)
            everyone: list = [None] * world
            dist.all_gather_object(everyone, (x, idx))
            recv, count, handle, event, hook = buffer.low_latency_dispatch(
                x.to(device),
                idx.to(device),
                NUM_MAX,
                num_experts,
                cumulative_local_expert_recv_stats=stats,
                use_fp8=call.use_fp8,
                round_scale=call.round_scale,
                use_ue8m0=call.use_ue8m0,
                async_finish=call.async_finish,
                return_recv_hook=call.return_recv_hook,
            )
            assert (hook is not None) == call.return_recv_hook and (event.event is not None) == call.async_finish
            if hook is not None:
                hook()
            if call.async_finish:
                event.current_stream_wait()
            rounds.append((x, idx, weights, everyone, recv, count, handle))
        for x, idx, weights, everyone, recv, count, handle in rounds:
            values, scales = recv if call.use_fp8 else (recv, None)
            assert values.shape == (local, NUM_MAX * world, HIDDEN)
            if call.use_fp8:
                columns = HIDDEN // (512 if call.use_ue8m0 else 128)
                assert scales.shape == (local, NUM_MAX * world, columns) and scales.stride()[1] == 1
                assert scales.dtype == (torch.int32 if call.use_ue8m0 else torch.float32)
            counts = count.cpu()
            if call.use_fp8 and not call.use_ue8m0:
                # vLLM reads the scales as contiguous [experts, rows * hidden / 128, 1] blocks of its fp8 rows.
                assert values.is_contiguous()
                blocks = values.to(torch.float32).view(local, -1, 128) * scales.contiguous().view(local, -1, 1)
                dequantized = blocks.view(values.shape)
            else:
                dequantized = None
            expert_out = buffer.get_next_low_latency_combine_buffer(handle) if call.zero_copy else None
            y = torch.empty((local, NUM_MAX * world, HIDDEN), dtype=torch.bfloat16, device=device)
            for le in range(local):
                e = rank * local + le
                want: Counter = Counter()
                for sx, sidx in everyone:
                    payload, scale_bytes = _expected_rows(sx, call)
                    for t in range(sx.shape[0]):
                        if e in sidx[t].tolist():
                            want[bytes(payload[t].numpy()) + bytes(scale_bytes[t].numpy())] += 1
                n = int(counts[le])
                assert n == sum(want.values()), f"rank {rank} expert {e}: {n} tokens, expected {sum(want.values())}"
                expected_stats[le] += n
                got_values = values[le, :n].cpu()
                got_rows = got_values.view(torch.uint8)
                got_scales = (
                    scales[le, :n].cpu().contiguous().view(torch.uint8)
                    if call.use_fp8
                    else torch.zeros((n, 0), dtype=torch.uint8)
                )
                got = Counter(bytes(got_rows[j].numpy()) + bytes(got_scales[j].numpy()) for j in range(n))
                assert got == want, f"rank {rank} expert {e}: received rows differ from the reference's"
                rows = _dequantized(got_values, scales[le, :n].cpu(), call) if call.use_fp8 else got_values.float()
                if dequantized is not None:  # the same values (NaN where the token had one)
                    torch.testing.assert_close(dequantized[le, :n].cpu(), rows, rtol=0, atol=0, equal_nan=True)
                y[le, :n] = (rows * _expert_factor(e, num_experts)).to(torch.bfloat16).to(device)
            if expert_out is not None:
                expert_out.copy_(y)
            out = torch.full((x.shape[0], HIDDEN), 7.0, dtype=torch.bfloat16, device=device) if call.into_out else None
            _meet()
            combined, event, hook = buffer.low_latency_combine(
                y,
                idx.to(device),
                weights.to(device),
                handle,
                zero_copy=call.zero_copy,
                async_finish=call.async_finish,
                return_recv_hook=call.return_recv_hook,
                out=out,
            )
            if hook is not None:
                hook()
            if call.async_finish:
                event.current_stream_wait()
            _no_device_error(handle[0].a2a)
            if out is not None:
                assert combined.data_ptr() == out.data_ptr()
            _assert_combined(combined, x, idx, weights, call, num_experts)
    torch.cuda.synchronize()
    assert torch.equal(stats.cpu(), expected_stats)
    buffer.destroy()


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", RANK_COUNTS)
def test_low_latency_dispatch_and_combine(world_size: int) -> None:
    """Each of CALLS in turn, on the same ranks."""
    _launch(world_size, "low-latency", list(CALLS))


def _graph_pattern(info: RankInfo, hooks: str) -> None:
    """dispatch + experts + combine of the low-latency half captured in one CUDA graph (with return_recv_hook,
    each hook called inside the capture), then replayed on new tokens of the same shape."""
    with_hooks = hooks == "hooks"
    world, rank, device = info.world_size, info.rank, info.device
    num_experts = 4 * world
    local = num_experts // world
    hint = Buffer.get_low_latency_rdma_size_hint(NUM_MAX, HIDDEN, world, num_experts)
    buffer = Buffer(dist.group.WORLD, num_rdma_bytes=hint, low_latency_mode=True, explicitly_destroy=True)
    x_in = torch.empty((NUM_MAX, HIDDEN), dtype=torch.bfloat16, device=device)
    idx_in = torch.empty((NUM_MAX, TOP_K), dtype=torch.int64, device=device)
    weights_in = torch.empty((NUM_MAX, TOP_K), dtype=torch.float32, device=device)
    factors = torch.tensor([_expert_factor(rank * local + le, num_experts) for le in range(local)], device=device).view(
        local, 1, 1
    )

    def load(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, idx, weights = _inputs(rank, num_experts, seed, m=NUM_MAX)  # a graph replays one shape
        x_in.copy_(x)
        idx_in.copy_(idx)
        weights_in.copy_(weights)
        return x, idx, weights

    def step() -> tuple[torch.Tensor, torch.Tensor, tuple]:
        (values, scales), count, handle, _, hook = buffer.low_latency_dispatch(
            x_in, idx_in, NUM_MAX, num_experts, use_fp8=True, return_recv_hook=with_hooks
        )
        if hook is not None:
            hook()
        # The experts: each received row dequantized and scaled by its expert's factor.
        y = (values.float() * scales.repeat_interleave(128, dim=2) * factors).to(torch.bfloat16)
        combined, _, hook = buffer.low_latency_combine(y, idx_in, weights_in, handle, return_recv_hook=with_hooks)
        if hook is not None:
            hook()
        return combined, count, handle

    def check(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, combined: torch.Tensor, count) -> None:
        everyone: list = [None] * world
        dist.all_gather_object(everyone, idx)
        for le in range(local):
            e = rank * local + le
            want = sum(int((sidx == e).any(dim=1).sum()) for sidx in everyone)
            assert int(count[le]) == want, f"rank {rank} expert {e}: {int(count[le])} tokens, expected {want}"
        _assert_combined(combined, x, idx, weights, Call(), num_experts)

    inputs = load(1)
    _meet()
    combined, count, handle = step()  # eager, before the capture
    _no_device_error(handle[0].a2a)
    check(*inputs, combined, count)
    _meet()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        combined, count, handle = step()
    for seed in (2, 3, 4):
        inputs = load(seed)
        _meet()  # every rank's inputs are in place before any rank's replay reads them
        graph.replay()
        _no_device_error(handle[0].a2a)
        check(*inputs, combined, count)
    _meet()
    del graph
    buffer.destroy()


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", RANK_COUNTS)
def test_low_latency_cuda_graph(world_size: int) -> None:
    """The capture with return_recv_hook, then without."""
    _launch(world_size, "cuda-graph", ["hooks", "no-hooks"])


def _shrink_step(buffer: Buffer, info: RankInfo, num_experts: int, seed: int, masked: list[int], group) -> None:
    """One fp8 dispatch + experts + combine in the shrink mode, checked with the ranks of `masked` left out: each
    local expert gets the tokens of the other ranks naming it, and combine sums no term of a masked rank's
    experts. `group`: the ranks taking part."""
    call, world, rank, device = Call(), info.world_size, info.rank, info.device
    local = num_experts // world
    x, idx, weights = _inputs(rank, num_experts, seed)
    members = [r for r in range(world) if r not in masked]
    gathered: list = [None] * len(members)
    dist.all_gather_object(gathered, idx, group=group)
    recv, count, handle, _, _ = buffer.low_latency_dispatch(x.to(device), idx.to(device), NUM_MAX, num_experts)
    values, scales = recv
    counts = count.cpu()
    y = torch.zeros((local, NUM_MAX * world, HIDDEN), dtype=torch.bfloat16, device=device)
    for le in range(local):
        e = rank * local + le
        want = sum(int((sidx == e).any(dim=1).sum()) for sidx in gathered)
        n = int(counts[le])
        assert n == want, f"rank {rank} expert {e}: {n} tokens with ranks {masked} masked, expected {want}"
        rows = _dequantized(values[le, :n].cpu(), scales[le, :n].cpu(), call)
        y[le, :n] = (rows * _expert_factor(e, num_experts)).to(torch.bfloat16).to(device)
    torch.cuda.synchronize()
    dist.barrier(group=group)
    combined, _, _ = buffer.low_latency_combine(y, idx.to(device), weights.to(device), handle)
    _no_device_error(handle[0].a2a)
    kept = idx.clone()
    for r in masked:
        kept[(idx >= r * local) & (idx < (r + 1) * local)] = -1
    _assert_combined(combined, x, kept, weights, call, num_experts)


def _shrink_pattern(info: RankInfo, name: str) -> None:
    """DeepEP's shrink mode: every rank; then a middle rank stops calling, and the others' first call masks it (its
    waits run out) and goes on without it; then (4 ranks or more) the others mask the last rank too
    (low_latency_update_mask_buffer), which stops calling as well. Each step checked without the masked ranks; the
    mask calls' answers and refusals."""
    os.environ["EXPERTWIRE_TIMEOUT_MS"] = "2000"  # read as the Buffer makes its objects, at the first call
    world, rank, device = info.world_size, info.rank, info.device
    num_experts = 4 * world
    hint = Buffer.get_low_latency_rdma_size_hint(NUM_MAX, HIDDEN, world, num_experts)
    buffer = Buffer(
        dist.group.WORLD, num_rdma_bytes=hint, low_latency_mode=True, explicitly_destroy=True, enable_shrink=True
    )
    stuck, last = world // 2, world - 1
    without_stuck = dist.new_group([r for r in range(world) if r != stuck])
    without_both = dist.new_group([r for r in range(world) if r not in (stuck, last)]) if world >= 4 else None
    status = torch.full((world,), 7, dtype=torch.int32, device=device)
    for seed in (1, 2):
        _shrink_step(buffer, info, num_experts, seed, [], dist.group.WORLD)
    buffer.low_latency_query_mask_buffer(status)
    assert status.tolist() == [0] * world
    buffer.low_latency_clean_mask_buffer()  # nothing masked: nothing to do
    dist.barrier()
    if rank != stuck:
        for seed in (3, 4, 5):  # both objects of the configuration, the first call masking the stuck rank
            started = time.perf_counter()
            _shrink_step(buffer, info, num_experts, seed, [stuck], without_stuck)
            # The mask reached the configuration's other object: no later wait runs out on the stuck rank again.
            assert seed == 3 or time.perf_counter() - started < 1.5, f"step {seed} waited for the masked rank"
        buffer.low_latency_query_mask_buffer(status)
        assert status.tolist() == [int(r == stuck) for r in range(world)], status.tolist()
        with pytest.raises(NotImplementedError, match="unmasking"):
            buffer.low_latency_update_mask_buffer(stuck, False)
        if without_both is not None and rank != last:
            buffer.low_latency_update_mask_buffer(last, True)
            for seed in (6, 7):
                _shrink_step(buffer, info, num_experts, seed, [stuck, last], without_both)
            buffer.low_latency_query_mask_buffer(status)
            assert status.tolist() == [int(r in (stuck, last)) for r in range(world)], status.tolist()
    dist.barrier()
    buffer.destroy()


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", RANK_COUNTS)
def test_shrink_mode_masks_a_rank(world_size: int) -> None:
    _launch(world_size, "shrink", ["stuck-then-masked"])


def _patterns(info: RankInfo, kind: str, names: list[str]) -> None:
    """Runs each named pattern of `kind` in turn on these ranks (each with a Buffer of its own; rank processes
    and NVSHMEM start once for all of them). The first failure ends the run, naming its pattern: the ranks that
    did not fail would wait for the failed one in the next pattern's collectives."""
    for name in names:
        try:
            PATTERNS[kind](info, name)
        except Exception as error:
            raise AssertionError(f"{kind} pattern {name!r}, rank {info.rank} of {info.world_size}: {error}") from error
    expertwire.nvshmem_finalize()


def _launch(world_size: int, kind: str, names: list[str]) -> None:
    """Runs the patterns on world_size ranks through NVSHMEM, or skips with the reason it cannot run."""
    reason = why_transport_cannot_run("internode", world_size)
    if reason is not None:
        pytest.skip(reason)
    launch(world_size, _patterns, kind, names)


# ------------------------------------------------------------------------------------------------------------
# The high-throughput half: get_dispatch_layout, dispatch, combine, as vLLM's DeepEP high-throughput
# prepare/finalize and SGLang's normal dispatcher call them.

HT_ALIGNMENT = 128


@dataclasses.dataclass(frozen=True)
class HtCall:
    fp8: bool = False  # (fp8 values, float32 scales) tuples, as vLLM passes block-quantized tokens
    async_finish: bool = False  # SGLang: previous_event=Buffer.capture(), async_finish, then the event's wait
    num_worst_tokens: bool = False  # outputs of the worst case, no host synchronization
    cached: bool = False  # a second dispatch with the handle (DeepEP's cached layout), then its combine
    combine_weights: bool = False  # combine carries topk_weights back


HT_CALLS = {
    "vllm-bf16": HtCall(),
    "vllm-fp8": HtCall(fp8=True),
    "sglang-async-fp8": HtCall(fp8=True, async_finish=True),
    "worst-tokens": HtCall(num_worst_tokens=True),
    "cached-with-weights": HtCall(cached=True, combine_weights=True),
}


def _ht_payload(x: torch.Tensor, call: HtCall):
    """What a rank passes as dispatch's x: bf16 rows, or their fp8 cast and float32 scales."""
    if not call.fp8:
        return x
    values, scales = reference.cast_fp8_blocks(x, False, False)
    return values, scales


def _high_throughput_pattern(info: RankInfo, name: str) -> None:
    call = HT_CALLS[name]
    world, rank, device = info.world_size, info.rank, info.device
    num_experts = 4 * world
    local = num_experts // world
    buffer = Buffer(dist.group.WORLD, num_nvl_bytes=1 << 28, num_rdma_bytes=1 << 28, explicitly_destroy=True)
    hosts: list = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    nodes = len(set(hosts))
    for seed in (1, 2, 3):
        x, idx, weights = _inputs(rank, num_experts, seed)
        everyone: list = [None] * world
        dist.all_gather_object(everyone, (x, idx, weights))
        per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx.to(device), num_experts)
        # The layout against the routing.
        want_in_rank = torch.zeros((x.shape[0], world), dtype=torch.bool)
        for t in range(x.shape[0]):
            for e in idx[t].tolist():
                if e >= 0:
                    want_in_rank[t, e // local] = True
        assert torch.equal(in_rank.cpu(), want_in_rank)
        # DeepEP's RDMA ranks are the group's nodes: tokens per node where the group spans several, else None.
        if nodes == 1:
            assert per_rdma is None
        else:
            want_per_node = want_in_rank.view(x.shape[0], nodes, world // nodes).any(2).sum(0, dtype=torch.int32)
            assert torch.equal(per_rdma.cpu(), want_per_node), (per_rdma, want_per_node)
        assert torch.equal(per_rank.cpu(), want_in_rank.sum(0).to(torch.int32))
        want_per_expert = torch.bincount(idx[idx >= 0], minlength=num_experts).to(torch.int32)
        assert torch.equal(per_expert.cpu(), want_per_expert)

        payload = _ht_payload(x, call)
        on_device = tuple(p.to(device) for p in payload) if call.fp8 else payload.to(device)
        idx_on_device, weights_on_device = idx.to(device), weights.to(device)
        previous = Buffer.capture() if call.async_finish else None  # after every input's copy
        recv, recv_idx, recv_w, counts, handle, event = buffer.dispatch(
            on_device,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=idx_on_device,
            topk_weights=weights_on_device,
            expert_alignment=HT_ALIGNMENT,
            num_worst_tokens=world * NUM_MAX if call.num_worst_tokens else 0,
            config=Buffer.get_dispatch_config(world),
            previous_event=previous,
            async_finish=call.async_finish,
        )
        if call.async_finish:
            event.current_stream_wait()
        # What this rank must receive: every token with an expert here, by source rank then token.
        want = [
            (s, t)
            for s, (sx, sidx, _) in enumerate(everyone)
            for t in range(sx.shape[0])
            if any(0 <= e and e // local == rank for e in sidx[t].tolist())
        ]
        values = recv[0] if call.fp8 else recv
        rows = values.shape[0]
        assert rows == (world * NUM_MAX if call.num_worst_tokens else len(want))
        got_idx, got_w = recv_idx.cpu(), recv_w.cpu()
        for j, (s, t) in enumerate(want):
            source = _ht_payload(everyone[s][0], call)
            want_row = source[0][t] if call.fp8 else source[t]
            assert torch.equal(values[j].cpu().view(torch.uint8), want_row.view(torch.uint8)), (s, t)
            if call.fp8:
                assert torch.equal(recv[1][j].cpu(), source[1][t])
            sidx, sw = everyone[s][1][t], everyone[s][2][t]
            mine = (sidx >= 0) & (sidx // local == rank)
            assert torch.equal(got_idx[j], torch.where(mine, sidx - rank * local, -1)), (s, t)
            assert torch.equal(got_w[j], torch.where(mine, sw, 0.0)), (s, t)
        if call.num_worst_tokens:
            assert counts == [] and (got_idx[len(want) :] == -1).all()
        else:
            per_local = [int(((got_idx == le).sum())) for le in range(local)]
            assert counts == [(c + HT_ALIGNMENT - 1) // HT_ALIGNMENT * HT_ALIGNMENT for c in per_local]

        # The experts: each received token's rows summed over its local slots with their weights (what vLLM's
        # TopKWeightAndReduce does before combine), one row per received token.
        rows_in = torch.zeros((rows, HIDDEN), dtype=torch.bfloat16)
        for j, (s, t) in enumerate(want):
            token = _ht_payload(everyone[s][0][t : t + 1], call)
            row = _dequantized(token[0], token[1], Call()) if call.fp8 else token.float()
            acc = torch.zeros(HIDDEN)
            for k in range(TOP_K):
                le = int(got_idx[j, k])
                if le >= 0:
                    acc += float(got_w[j, k]) * row[0] * _expert_factor(rank * local + le, num_experts)
            rows_in[j] = acc.to(torch.bfloat16)
        carried = recv_w if call.combine_weights else None
        _meet()
        combined, combined_w, event = buffer.combine(
            rows_in.to(device),
            handle,
            topk_weights=carried,
            config=Buffer.get_combine_config(world),
            previous_event=Buffer.capture() if call.async_finish else None,
            async_finish=call.async_finish,
        )
        if call.async_finish:
            event.current_stream_wait()
        _no_device_error(handle.entry.a2a)
        # Each token: the sum over the ranks it went to of their rows, in fp32, then bf16.
        own = _ht_payload(x, call)
        own_rows = _dequantized(own[0], own[1], Call()) if call.fp8 else x.float()
        want_out = torch.zeros((x.shape[0], HIDDEN))
        for r in range(world):
            for t in range(x.shape[0]):
                acc = torch.zeros(HIDDEN)
                slots = [k for k in range(TOP_K) if idx[t, k] >= 0 and idx[t, k] // local == r]
                for k in slots:
                    acc += float(weights[t, k]) * own_rows[t] * _expert_factor(int(idx[t, k]), num_experts)
                if slots:
                    want_out[t] += acc.to(torch.bfloat16).float()
        torch.testing.assert_close(
            combined.cpu().float(), want_out.to(torch.bfloat16).float(), rtol=2**-7, atol=1e-6, equal_nan=True
        )
        if call.combine_weights:
            assert torch.equal(combined_w.cpu(), torch.where(idx >= 0, weights, 0.0))
        else:
            assert combined_w is None
        if call.cached:
            # A training backward: the handle's layout dispatched again, then combined again.
            again, *rest, _ = buffer.dispatch(on_device, handle=handle)
            assert rest == [None, None, None, None]
            again_values = again[0] if call.fp8 else again
            assert torch.equal(again_values.cpu().view(torch.uint8), values.cpu().view(torch.uint8))
            _meet()
            combined_again, _, _ = buffer.combine(rows_in.to(device), handle)
            _no_device_error(handle.entry.a2a)
            # The same values, NaN where the first combine had one.
            torch.testing.assert_close(combined_again.cpu(), combined.cpu(), rtol=0, atol=0, equal_nan=True)
    torch.cuda.synchronize()
    buffer.destroy()


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", RANK_COUNTS)
def test_high_throughput_dispatch_and_combine(world_size: int) -> None:
    """Each of HT_CALLS in turn, on the same ranks."""
    _launch(world_size, "high-throughput", list(HT_CALLS))


PATTERNS = {
    "low-latency": _low_latency_pattern,
    "cuda-graph": _graph_pattern,
    "high-throughput": _high_throughput_pattern,
    "shrink": _shrink_pattern,
}
