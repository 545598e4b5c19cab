"""Multi-rank GPU tests of HighThroughputAllToAll through the Python API: every rank rebuilds every rank's tokens
from the seed and checks its received rows and its combined tokens against a model of the semantics
(csrc/reference/high_throughput.h states them), both layouts, both transports. Skipped, with the reason, where no
GPU is visible or ranks would share a GPU without MPS (scripts/device/run_pytest_gpu.sh starts one).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import expertwire

from .distributed import RankInfo, launch, nvshmem_join, why_transport_cannot_run

RANK_COUNTS = [int(n) for n in os.environ.get("EXPERTWIRE_TEST_RANKS", "2,4").split(",") if n.strip()]
TRANSPORTS = ["internode", "intranode"]
MAX_TOKENS, EXPERTS_PER_RANK, TOP_K, HIDDEN = 96, 4, 4, 256


def _tokens(rank: int, m: int, world: int, seed: int, index_dtype: torch.dtype):
    """Rank `rank`'s tokens: bf16 x, top-k distinct experts with some -1 slots, float32 weights."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    experts = EXPERTS_PER_RANK * world
    x = torch.randn((m, HIDDEN), generator=g).to(torch.bfloat16)
    idx = (
        torch.stack([torch.randperm(experts, generator=g)[:TOP_K] for _ in range(m)]) if m else torch.empty((0, TOP_K))
    )
    idx = idx.to(torch.int64)
    holes = torch.rand((m, TOP_K), generator=g) < 0.2
    idx[holes] = -1
    w = torch.rand((m, TOP_K), generator=g)
    return x, idx.to(index_dtype), w


def _received(rank: int, world: int, sources):
    """Rank-packed model: [(source, token)] in (source, token) order, with local indices and weights."""
    rows, local_idx, local_w = [], [], []
    for s, (_, idx, w) in enumerate(sources):
        for t in range(idx.shape[0]):
            owner = torch.where(idx[t] >= 0, idx[t].to(torch.int64) // EXPERTS_PER_RANK, -1)
            if not (owner == rank).any():
                continue
            rows.append((s, t))
            mine = owner == rank
            local_idx.append(torch.where(mine, idx[t].to(torch.int64) - rank * EXPERTS_PER_RANK, -1))
            local_w.append(torch.where(mine, w[t], 0.0))
    return rows, local_idx, local_w


def ht_factory(transport: str):
    """HighThroughputAllToAll's factory of `transport`."""
    if transport == "internode":
        return expertwire.HighThroughputAllToAll.internode
    return expertwire.HighThroughputAllToAll.intranode


# Rounds of the model check: (m of rank 0, outputs of the worst-case size).
MODEL_ROUNDS = [(40, False), (0, False), (MAX_TOKENS, True), (17, True)]


def model_object(info: RankInfo, factory, layout: str, **options) -> expertwire.HighThroughputAllToAll:
    """The object of the model check for `layout` (`options`: the factory's keyword-only ones)."""
    return factory(
        max_num_tokens=MAX_TOKENS,
        num_experts=EXPERTS_PER_RANK * info.world_size,
        experts_per_token=TOP_K,
        rank=info.rank,
        world_size=info.world_size,
        hidden_dim=HIDDEN,
        hidden_dim_bytes=HIDDEN * 2,
        expert_alignment=model_alignment(layout),
        **options,
    )


def model_alignment(layout: str) -> int:
    return 16 if layout == "expert-contiguous" else 1


def _model_sources(world: int, seed: int, m0: int, active=None):
    """Every rank's tokens of round `seed` (m0: rank 0's m), and each rank's m; a rank whose entry of `active` is 0
    makes no call, so nothing comes from it (its tokens empty)."""
    index_dtype = torch.int32 if seed % 2 else torch.int64
    ms = [min(MAX_TOKENS, m0 + 5 * s) if m0 not in (0, MAX_TOKENS) else m0 for s in range(world)]
    sources = [_tokens(s, ms[s] if active is None or active[s] else 0, world, seed, index_dtype) for s in range(world)]
    return sources, ms


def model_step(
    a2a: expertwire.HighThroughputAllToAll, info: RankInfo, layout: str, seed: int, m0: int, worst: bool, at=None
):
    """One dispatch + experts + combine of round `seed` in `layout`, unchecked; at(point) is called between the
    dispatch and the combine ("between-halves") and right after the combine is launched ("inside-combine").
    Experts: each received row scaled by (1 + its rank), so the combine sums distinguishable rows. Returns the
    dispatch's outputs and the combined tokens."""
    world, rank, device = info.world_size, info.rank, info.device
    sources, _ = _model_sources(world, seed, m0)
    x, idx, w = (t.to(device) for t in sources[rank])
    worst_rows = MAX_TOKENS * world * TOP_K + EXPERTS_PER_RANK * model_alignment(layout) if worst else 0
    # Round 0 of the rank-packed layout goes through the object's own buffers (no copy in or out).
    in_buffers = layout == "rank-packed" and seed == 0
    if in_buffers:
        staged = a2a.dispatch_input_buffer(torch.bfloat16)[: x.shape[0]]
        staged.copy_(x)
        x = staged
    out = a2a.dispatch(x, idx, w, layout=layout, num_worst_tokens=worst_rows)
    if at is not None:
        at("between-halves")
    y = (out.recv_x[: int(out.num_recv_rows)].float() * (1 + rank)).to(torch.bfloat16).contiguous()
    if in_buffers:
        y = a2a.combine_input_buffer()[: y.shape[0]].copy_(y)
    combined = a2a.combine(y, out.handle)
    if at is not None:
        at("inside-combine")
    return out, combined


def model_check(
    info: RankInfo, layout: str, seed: int, m0: int, worst: bool, active, out, combined, received: bool = True
) -> None:
    """A model_step's outputs against the model, every rank whose entry of `active` is 0 left out: its tokens are
    not received and its rows add nothing to the sums. `received`: the dispatch's outputs too, not only the
    combined tokens."""
    world, rank = info.world_size, info.rank
    alignment = model_alignment(layout)
    sources, ms = _model_sources(world, seed, m0, active)
    rows, local_idx, local_w = _received(rank, world, sources)
    counts = [sum(int((li == e).sum()) for li in local_idx) for e in range(EXPERTS_PER_RANK)]
    if received:
        assert out.tokens_per_expert.tolist() == counts
        if not worst:
            assert out.num_recv_tokens_per_expert_list == counts
    if received and layout == "rank-packed":
        assert int(out.num_recv_rows) == len(rows)
        for i, (s, t) in enumerate(rows):
            assert torch.equal(out.recv_x[i].cpu(), sources[s][0][t]), f"row {i} is not token {t} of rank {s}"
            assert torch.equal(out.recv_topk_idx[i].cpu(), local_idx[i])
            assert torch.equal(out.recv_topk_weights[i].cpu(), local_w[i])
    elif received:
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + (c + alignment - 1) // alignment * alignment)
        assert out.expert_offsets.tolist() == starts
        assert int(out.num_recv_rows) == starts[-1]
        filled = [0] * EXPERTS_PER_RANK
        for (s, t), li, lw in zip(rows, local_idx, local_w, strict=True):
            for j in range(TOP_K):
                if li[j] < 0:
                    continue
                e = int(li[j])
                r = starts[e] + filled[e]
                filled[e] += 1
                assert torch.equal(out.recv_x[r].cpu(), sources[s][0][t]), f"row {r}: not token {t} of {s}"
                assert int(out.row_expert[r]) == e and float(out.row_weight[r]) == float(lw[j])
        for e in range(EXPERTS_PER_RANK):
            pad = out.row_expert[starts[e] + counts[e] : starts[e + 1]]
            assert (pad == -1).all(), "padding rows must carry expert -1"
    # Model: every rank r that holds one of token t's experts contributes (1 + r) * x (rank-packed), or the
    # weighted sum of its experts' rows, (1 + r) * x * sum of weights, rounded to bf16 (expert-contiguous). This
    # rank's own tokens are its call's, whatever the mask.
    xs, ids, ws = _model_sources(world, seed, m0)[0][rank]
    expected = torch.zeros((ms[rank], HIDDEN))
    for t in range(ms[rank]):
        for r in range(world):
            owner = torch.where(ids[t] >= 0, ids[t].to(torch.int64) // EXPERTS_PER_RANK, -1)
            mine = owner == r
            if not mine.any() or not active[r]:
                continue
            row = (xs[t].float() * (1 + r)).to(torch.bfloat16).float()
            if layout == "expert-contiguous":
                part = torch.zeros(HIDDEN)
                for j in range(TOP_K):
                    if mine[j]:
                        part += ws[t][j] * row
                row = part.to(torch.bfloat16).float()
            expected[t] += row
    tol = 0.0 if layout == "rank-packed" else 3e-2
    torch.testing.assert_close(combined.float().cpu(), expected.to(torch.bfloat16).float(), atol=tol, rtol=tol)


def model_round(
    a2a: expertwire.HighThroughputAllToAll, info: RankInfo, layout: str, seed: int, m0: int, worst: bool, active
) -> None:
    """model_step, then model_check with `active`."""
    out, combined = model_step(a2a, info, layout, seed, m0, worst)
    torch.cuda.synchronize()
    a2a.check_errors()
    model_check(info, layout, seed, m0, worst, active, out, combined)


def _model_check(info: RankInfo, factory) -> None:
    for layout in ("rank-packed", "expert-contiguous"):
        a2a = model_object(info, factory, layout)
        for seed, (m0, worst) in enumerate(MODEL_ROUNDS):
            model_round(a2a, info, layout, seed, m0, worst, [1] * info.world_size)
        dist.barrier()
        a2a.destroy()


TRAIN_HIDDEN = 64


def _autograd_check(info: RankInfo, factory) -> None:
    """Forward and backward through expertwire.autograd, float32, against autograd over a dense model of the same
    experts on this rank's own tokens: out[t] = sum_j w[t, j] * x[t] @ W[idx[t, j]]."""
    world, rank, device = info.world_size, info.rank, info.device
    experts = EXPERTS_PER_RANK * world
    expert_w = torch.randn((experts, TRAIN_HIDDEN, TRAIN_HIDDEN), generator=torch.Generator().manual_seed(7))
    expert_w /= TRAIN_HIDDEN**0.5
    local_w = expert_w[rank * EXPERTS_PER_RANK : (rank + 1) * EXPERTS_PER_RANK].to(device).requires_grad_()
    for layout in ("rank-packed", "expert-contiguous"):
        alignment = 8 if layout == "expert-contiguous" else 1
        a2a = factory(
            max_num_tokens=MAX_TOKENS,
            num_experts=experts,
            experts_per_token=TOP_K,
            rank=rank,
            world_size=world,
            hidden_dim=TRAIN_HIDDEN,
            hidden_dim_bytes=TRAIN_HIDDEN * 4,
            combine_element_bytes=4,
            expert_alignment=alignment,
        )
        for seed, (m0, worst) in enumerate([(30, False), (MAX_TOKENS, True), (0, False), (11, True)]):
            m = m0 if m0 in (0, MAX_TOKENS) else min(MAX_TOKENS, m0 + 3 * rank)
            _, idx, w = _tokens(rank, m, world, seed + 100, torch.int64)
            g = torch.Generator().manual_seed(seed * 1000 + rank + 17)
            x = torch.randn((m, TRAIN_HIDDEN), generator=g)
            grad_out = torch.randn((m, TRAIN_HIDDEN), generator=g)
            worst_rows = a2a.worst_case_rows(layout) if worst else 0
            xd = x.to(device).requires_grad_()
            wd = w.to(device).requires_grad_()
            d = expertwire.autograd.dispatch(a2a, xd, idx.to(device), wd, layout=layout, num_worst_tokens=worst_rows)
            if layout == "rank-packed":
                y = torch.zeros_like(d.recv_x)
                for le in range(EXPERTS_PER_RANK):
                    weight = (d.recv_topk_weights * (d.recv_topk_idx == le)).sum(dim=1, keepdim=True)
                    y = y + weight * (d.recv_x @ local_w[le])
            else:
                y = torch.zeros_like(d.recv_x)
                for le in range(EXPERTS_PER_RANK):
                    y = torch.where((d.row_expert == le)[:, None], d.recv_x @ local_w[le], y)
            out = expertwire.autograd.combine(a2a, y, d)
            (out * grad_out.to(device)).sum().backward()
            torch.cuda.synchronize()
            a2a.check_errors()

            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            expected = torch.zeros((m, TRAIN_HIDDEN))
            for j in range(TOP_K):
                e = idx[:, j]
                f = torch.einsum("th,thk->tk", xr, expert_w[e.clamp(min=0)])
                expected = expected + torch.where((e >= 0)[:, None], wr[:, j : j + 1] * f, 0)
            (expected * grad_out).sum().backward()
            where = f"{layout}, round {seed}, rank {rank}"
            torch.testing.assert_close(out.detach().cpu(), expected.detach(), atol=1e-4, rtol=1e-4, msg=where)
            torch.testing.assert_close(xd.grad.cpu(), xr.grad, atol=1e-4, rtol=1e-4, msg=f"x.grad, {where}")
            torch.testing.assert_close(wd.grad.cpu(), wr.grad, atol=1e-4, rtol=1e-4, msg=f"weights' grad, {where}")
            # The experts' gradients sum over every rank's tokens (not modelled here); rows past the count and
            # padding rows must not make them NaN.
            assert torch.isfinite(local_w.grad).all(), f"experts' grad, {where}"
            local_w.grad = None
        dist.barrier()
        a2a.destroy()


CHECKS = {"model": _model_check, "autograd": _autograd_check}


def _worker(info: RankInfo, transport: str, check: str) -> None:
    if transport == "internode":
        nvshmem_join(info)
    CHECKS[check](info, ht_factory(transport))
    if transport == "internode":
        expertwire.nvshmem_finalize()


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", RANK_COUNTS)
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("check", list(CHECKS))
def test_high_throughput(check: str, transport: str, world_size: int) -> None:
    """model: received rows and combined tokens against the model; autograd: forward and backward through
    expertwire.autograd against the dense model."""
    reason = why_transport_cannot_run(transport, world_size)
    if reason is not None:
        pytest.skip(reason)
    launch(world_size, _worker, transport, check)
