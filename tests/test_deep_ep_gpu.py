"""Multi-rank GPU tests of expertwire.deep_ep.Buffer's low-latency half, called as DeepEP's users call it, against
the reference model: every expert receives exactly its tokens (fp8 values and scales as the reference cast makes
them), and combine returns each token's weighted sum of its experts' outputs. Ranks as test_all_to_all_gpu.py."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter

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


def _inputs(rank: int, num_experts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A rank's tokens (m varies with the rank, one rank may send none), distinct experts per row with about one
    slot in five -1, and weights."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
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
        scales = ((exponents << 23).view(torch.float32)).reshape(values.shape[0], -1)
    return values.float() * scales.float().repeat_interleave(128, dim=1)


def _expected_rows(x: torch.Tensor, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    """What every expert must receive of these tokens: (payload bytes, scale bytes) per token."""
    if not call.use_fp8:
        return x.view(torch.uint8), torch.zeros((x.shape[0], 0), dtype=torch.uint8)
    values, scales = reference.cast_fp8_blocks(x, call.round_scale, call.use_ue8m0)
    return values.view(torch.uint8), scales.contiguous().view(torch.uint8)


def _worker(info: RankInfo, name: str) -> None:
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
            if out is not None:
                assert combined.data_ptr() == out.data_ptr()
            payload_rows = (
                _dequantized(*reference.cast_fp8_blocks(x, call.round_scale, call.use_ue8m0), call)
                if call.use_fp8
                else x.float()
            )
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
    torch.cuda.synchronize()
    assert torch.equal(stats.cpu(), expected_stats)
    buffer.destroy()
    expertwire.nvshmem_finalize()


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", RANK_COUNTS)
@pytest.mark.parametrize("name", list(CALLS))
def test_low_latency_dispatch_and_combine(name: str, world_size: int) -> None:
    reason = why_transport_cannot_run("internode", world_size)
    if reason is not None:
        pytest.skip(reason)
    launch(world_size, _worker, name)
