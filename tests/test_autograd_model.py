"""expertwire.autograd's backward formulas on the CPU, over a one-rank stand-in for the high-throughput object that
follows the documented semantics (csrc/reference/high_throughput.h), against autograd over the dense model.
The multi-rank GPU test (test_high_throughput_gpu.py) runs the same check through the kernels."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import expertwire
from expertwire.high_throughput import HighThroughputDispatch

EXPERTS, TOP_K, HIDDEN, MAX_TOKENS = 6, 3, 16, 20


class OneRankModel:
    """One rank holding every expert; rows past the count and padding rows are filled with NaN, as the GPU may leave
    them with anything."""

    def __init__(self, alignment: int) -> None:
        self._device = torch.device("cpu")
        self._fields = dict(
            hidden_dim=HIDDEN,
            hidden_dim_bytes=HIDDEN * 4,
            hidden_dim_scale_bytes=0,
            combine_element_bytes=4,
            experts_per_token=TOP_K,
        )
        self.alignment = alignment
        self.calls: list[str] = []

    def worst_case_rows(self, layout: str) -> int:
        return MAX_TOKENS if layout == "rank-packed" else MAX_TOKENS * TOP_K + EXPERTS * (self.alignment - 1)

    def dispatch(self, x, topk_idx, topk_weights, layout="rank-packed", num_worst_tokens=0):
        self.calls.append("dispatch")
        m = x.shape[0]
        if layout == "rank-packed":
            rows = num_worst_tokens or m
            recv_x = torch.full((rows, HIDDEN), float("nan"), dtype=x.dtype)
            recv_x[:m] = x
            recv_w = torch.full((rows, TOP_K), float("nan"))
            recv_w[:m] = torch.where(topk_idx >= 0, topk_weights, 0.0)
            recv_idx = torch.full((rows, TOP_K), -7, dtype=torch.int64)
            recv_idx[:m] = topk_idx
            handle = SimpleNamespace(m=m, expert_contiguous=False, rows=list(range(m)))
            return HighThroughputDispatch(
                recv_x, None, recv_idx, recv_w, None, None, None, None, torch.tensor([m]), None, handle
            )
        slots, starts = [], [0]
        for e in range(EXPERTS):
            mine = [(t, j) for t in range(m) for j in range(TOP_K) if int(topk_idx[t, j]) == e]
            slots += mine + [None] * ((-len(mine)) % self.alignment)
            starts.append(len(slots))
        rows = num_worst_tokens or len(slots)
        recv_x = torch.full((rows, HIDDEN), float("nan"), dtype=x.dtype)
        row_expert = torch.full((rows,), -1, dtype=torch.int32)
        row_weight = torch.full((rows,), float("nan"))
        for r, slot in enumerate(slots):
            if slot is None:
                row_weight[r] = 0.0
                continue
            t, j = slot
            recv_x[r], row_expert[r], row_weight[r] = x[t], int(topk_idx[t, j]), topk_weights[t, j]
        handle = SimpleNamespace(m=m, expert_contiguous=True, slots=slots, row_weight=row_weight.clone())
        return HighThroughputDispatch(
            recv_x, None, None, None, row_expert, row_weight, None, None, torch.tensor([len(slots)]), None, handle
        )

    def combine(self, expert_out, handle, row_weight=None, topk_weights=None):
        self.calls.append("combine")
        out = torch.zeros((handle.m, HIDDEN), dtype=expert_out.dtype)
        combined_w = torch.zeros((handle.m, TOP_K))
        if not handle.expert_contiguous:
            out += expert_out[: handle.m]
            if topk_weights is not None:
                combined_w = topk_weights[: handle.m].clone()
        else:
            row_weight = handle.row_weight if row_weight is None else row_weight
            for r, slot in enumerate(handle.slots):
                if slot is None:
                    continue
                t, j = slot
                out[t] += row_weight[r] * expert_out[r]
                if topk_weights is not None:
                    combined_w[t, j] = topk_weights[r]
        return out if topk_weights is None else (out, combined_w)


@pytest.mark.parametrize("layout", ["rank-packed", "expert-contiguous"])
@pytest.mark.parametrize("worst", [False, True])
@pytest.mark.parametrize("inputs_need_grad", [True, False])
def test_autograd_pair_matches_dense_model(layout: str, worst: bool, inputs_need_grad: bool) -> None:
    a2a = OneRankModel(alignment=4)
    g = torch.Generator().manual_seed(3)
    m = 13
    x = torch.randn((m, HIDDEN), generator=g)
    idx = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOP_K] for _ in range(m)])
    idx[torch.rand((m, TOP_K), generator=g) < 0.25] = -1
    w = torch.rand((m, TOP_K), generator=g)
    expert_w = torch.randn((EXPERTS, HIDDEN, HIDDEN), generator=g) / HIDDEN**0.5
    grad_out = torch.randn((m, HIDDEN), generator=g)

    xd, wd = x.clone().requires_grad_(inputs_need_grad), w.clone().requires_grad_(inputs_need_grad)
    ew = expert_w.clone().requires_grad_()
    worst_rows = a2a.worst_case_rows(layout) if worst else 0
    d = expertwire.autograd.dispatch(a2a, xd, idx, wd, layout=layout, num_worst_tokens=worst_rows)
    y = torch.zeros_like(d.recv_x)
    for e in range(EXPERTS):
        if layout == "rank-packed":
            weight = (d.recv_topk_weights * (d.recv_topk_idx == e)).sum(dim=1, keepdim=True)
            y = y + weight * (d.recv_x @ ew[e])
        else:
            y = torch.where((d.row_expert == e)[:, None], d.recv_x @ ew[e], y)
    out = expertwire.autograd.combine(a2a, y, d)
    (out * grad_out).sum().backward()
    assert a2a.calls == ["dispatch", "combine", "dispatch", "combine"]

    xr, wr, ewr = x.clone().requires_grad_(), w.clone().requires_grad_(), expert_w.clone().requires_grad_()
    expected = torch.zeros((m, HIDDEN))
    for j in range(TOP_K):
        f = torch.einsum("th,thk->tk", xr, ewr[idx[:, j].clamp(min=0)])
        expected = expected + torch.where((idx[:, j] >= 0)[:, None], wr[:, j : j + 1] * f, 0)
    (expected * grad_out).sum().backward()
    torch.testing.assert_close(out.detach(), expected.detach())
    torch.testing.assert_close(ew.grad, ewr.grad)  # rows past the count and padding rows must not poison it
    if inputs_need_grad:
        torch.testing.assert_close(xd.grad, xr.grad)
        torch.testing.assert_close(wd.grad, wr.grad)


def test_autograd_refuses_what_it_cannot_train() -> None:
    a2a = OneRankModel(alignment=1)
    a2a._fields["hidden_dim_scale_bytes"] = 8
    x = torch.zeros((2, HIDDEN))
    idx = torch.zeros((2, TOP_K), dtype=torch.int64)
    w = torch.zeros((2, TOP_K))
    with pytest.raises(ValueError, match="without scales"):
        expertwire.autograd.dispatch(a2a, x, idx, w)
    a2a._fields["hidden_dim_scale_bytes"] = 0
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        expertwire.autograd.dispatch(a2a, x.double(), idx, w)
    a2a._fields["hidden_dim_bytes"] = HIDDEN * 2
    with pytest.raises(ValueError, match=f"hidden_dim_bytes >= {HIDDEN * 4}"):
        expertwire.autograd.dispatch(a2a, x, idx, w)
    with pytest.raises(ValueError, match="layout must be one of"):
        expertwire.autograd.dispatch(a2a, x, idx, w, layout="padded")
    with pytest.raises(ValueError, match="what expertwire.autograd.dispatch returned"):
        expertwire.autograd.combine(a2a, x, object())
