"""Training through the high-throughput all-to-all: a torch.autograd.Function pair.

    d = expertwire.autograd.dispatch(a2a, x, topk_idx, topk_weights, layout="expert-contiguous")
    y = experts(d.recv_x, d.row_expert)          # one output row per expert row, padding rows included
    out = expertwire.autograd.combine(a2a, y, d)  # [m, hidden]; backward reaches x, topk_weights and the experts

The backward of the combine is a dispatch of out's gradient along the forward's routes (each expert row gets its
token's gradient; with the expert-contiguous layout, times the row's weight, and the weight's gradient is the dot
product of the row and that gradient). The backward of the dispatch is a combine of the received rows' gradients
(summed unweighted per token) that carries the weights' gradients back beside them, each slot's from the rank of
its expert. Both run on the same object, so its calls keep alternating: forward dispatch, combine; backward
dispatch, combine (with the forward's handle).

Rank-packed: d.recv_topk_weights is differentiable and combine sums the caller's rows as they are (weight them in
the expert code). Expert-contiguous: d.row_weight is differentiable and combine weights the rows by it. The rows'
payload is x's dtype (bfloat16, float16 or float32), so the object needs hidden_dim_bytes >= hidden_dim * x's
element size, combine_element_bytes >= that size, and no scales. Rows past d.num_recv_rows (worst-case sizing) and
padding rows are zeros here (not left as they were) and get zero gradients. If neither x nor topk_weights needs a
gradient, the combine's backward still dispatches (for the experts' gradients) and then combines zeros, so that
the calls keep alternating.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .high_throughput import LAYOUTS, HighThroughputAllToAll, HighThroughputDispatch

_FLOAT_TYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass
class DifferentiableDispatch(HighThroughputDispatch):
    """A HighThroughputDispatch whose recv_x and weights (recv_topk_weights, or row_weight) are outputs of the
    autograd graph, with the routes the combine's backward dispatches along."""

    topk_idx: Optional[torch.Tensor] = None
    topk_weights: Optional[torch.Tensor] = None
    layout: str = "rank-packed"


def _valid_rows(d: HighThroughputDispatch, rows: int) -> torch.Tensor:
    """[rows] bool on the device: rows that hold a received token (not past the count, not padding)."""
    valid = torch.arange(rows, device=d.num_recv_rows.device) < d.num_recv_rows.to(torch.int64)
    if d.row_expert is not None:
        valid &= d.row_expert[:rows] >= 0
    return valid


class HighThroughputDispatchFunction(torch.autograd.Function):
    """forward(a2a, layout, num_worst_tokens, box, x, topk_idx, topk_weights) -> (recv_x, weights); the full
    HighThroughputDispatch is appended to `box`. backward: a combine of the gradients."""

    @staticmethod
    def forward(ctx, a2a, layout, num_worst_tokens, box, x, topk_idx, topk_weights):
        d = a2a.dispatch(x, topk_idx, topk_weights, layout=layout, num_worst_tokens=num_worst_tokens)
        box.append(d)
        ctx.a2a, ctx.handle, ctx.x_dtype, ctx.rows = a2a, d.handle, x.dtype, d.recv_x.shape[0]
        weights = d.row_weight if layout == "expert-contiguous" else d.recv_topk_weights
        # Rows past the count and padding rows hold anything: zeros instead, so that 0 * garbage cannot turn the
        # experts' gradients into NaN.
        if num_worst_tokens > 0 or layout == "expert-contiguous":
            invalid = ~_valid_rows(d, ctx.rows)
            d.recv_x.masked_fill_(invalid[:, None], 0)
            weights.masked_fill_(invalid if weights.dim() == 1 else invalid[:, None], 0)
        return d.recv_x, weights

    @staticmethod
    def backward(ctx, grad_recv_x, grad_weights):
        a2a, handle = ctx.a2a, ctx.handle
        rows, hidden = ctx.rows, a2a._fields["hidden_dim"]
        device = a2a._device
        if grad_recv_x is None:
            grad_recv_x = torch.zeros((rows, hidden), dtype=ctx.x_dtype, device=device)
        if grad_weights is None:
            shape = (rows,) if handle.expert_contiguous else (rows, a2a._fields["experts_per_token"])
            grad_weights = torch.zeros(shape, dtype=torch.float32, device=device)
        ones = torch.ones((rows,), dtype=torch.float32, device=device) if handle.expert_contiguous else None
        grad_x, grad_topk_weights = a2a.combine(
            grad_recv_x.to(ctx.x_dtype).contiguous(),
            handle,
            row_weight=ones,
            topk_weights=grad_weights.float().contiguous(),
        )
        return None, None, None, None, grad_x, None, grad_topk_weights


class HighThroughputCombineFunction(torch.autograd.Function):
    """forward(a2a, d, expert_out, row_weight, topk_idx) -> [m, hidden]. backward: a dispatch of the gradient along
    d's routes."""

    @staticmethod
    def forward(ctx, a2a, d, expert_out, row_weight, topk_idx):
        out = a2a.combine(expert_out, d.handle, row_weight=row_weight)  # None for a rank-packed dispatch
        ctx.a2a, ctx.d = a2a, d
        # The dispatch's backward (a combine) follows ours (a dispatch) only if gradients flow into the dispatch;
        # if not, ours issues a combine of its own so that the object's calls keep alternating.
        ctx.dispatch_backward_follows = d.recv_x.requires_grad
        ctx.save_for_backward(expert_out, row_weight, topk_idx)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        a2a, d = ctx.a2a, ctx.d
        expert_out, row_weight, topk_idx = ctx.saved_tensors
        rows = expert_out.shape[0]
        back = a2a.dispatch(
            grad_out.to(expert_out.dtype).contiguous(),
            topk_idx,
            d.topk_weights.detach(),
            layout=d.layout,
            num_worst_tokens=rows,
        )
        if not ctx.dispatch_backward_follows:
            a2a.combine(torch.zeros_like(back.recv_x), back.handle)
        valid = _valid_rows(back, rows)[:, None]
        token_grad = back.recv_x[:rows]
        if row_weight is None:
            return None, None, torch.where(valid, token_grad, 0), None, None
        grad_expert_out = torch.where(valid, token_grad.float() * row_weight[:, None], 0).to(expert_out.dtype)
        grad_row_weight = torch.where(valid, expert_out.float() * token_grad.float(), 0).sum(dim=1)
        return None, None, grad_expert_out, grad_row_weight, None


def _check_trainable(op: str, a2a: HighThroughputAllToAll, dtype: torch.dtype) -> None:
    fields = a2a._fields
    if fields["hidden_dim_scale_bytes"] != 0:
        raise ValueError(f"{op}: training needs an object without scales (hidden_dim_scale_bytes=0)")
    if dtype not in _FLOAT_TYPES:
        raise ValueError(f"{op}: x must be bfloat16, float16 or float32 to be differentiable, got {dtype}")
    size = dtype.itemsize
    if fields["hidden_dim_bytes"] < fields["hidden_dim"] * size or fields["combine_element_bytes"] < size:
        raise ValueError(
            f"{op}: {dtype} rows of hidden_dim={fields['hidden_dim']} need hidden_dim_bytes >= "
            f"{fields['hidden_dim'] * size} and combine_element_bytes >= {size}; the object has "
            f"{fields['hidden_dim_bytes']} and {fields['combine_element_bytes']}"
        )


def dispatch(
    a2a: HighThroughputAllToAll,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    layout: str = "rank-packed",
    num_worst_tokens: int = 0,
) -> DifferentiableDispatch:
    """a2a.dispatch(x, topk_idx, topk_weights, layout=, num_worst_tokens=) in the autograd graph: x [m, hidden_dim]
    of a float type at hidden_dim elements a row, topk_weights float32. Gradients reach x and topk_weights."""
    op = "expertwire.autograd.dispatch"
    if layout not in LAYOUTS:
        raise ValueError(f"{op}: layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != a2a._fields["hidden_dim"]:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: x must be a [m, {a2a._fields['hidden_dim']}] tensor, got {shape}")
    _check_trainable(op, a2a, x.dtype)
    box: list = []
    recv_x, weights = HighThroughputDispatchFunction.apply(
        a2a, layout, num_worst_tokens, box, x, topk_idx, topk_weights
    )
    d = box[0]
    fields = dict(d.__dict__)
    fields["recv_x"] = recv_x
    fields["row_weight" if layout == "expert-contiguous" else "recv_topk_weights"] = weights
    return DifferentiableDispatch(**fields, topk_idx=topk_idx, topk_weights=topk_weights, layout=layout)


def combine(a2a: HighThroughputAllToAll, expert_out: torch.Tensor, d: DifferentiableDispatch) -> torch.Tensor:
    """a2a.combine(expert_out, d.handle) in the autograd graph (expert-contiguous rows weighted by d.row_weight).
    Gradients reach expert_out and, through d, x and topk_weights."""
    op = "expertwire.autograd.combine"
    if not isinstance(d, DifferentiableDispatch):
        raise ValueError(f"{op}: d must be what expertwire.autograd.dispatch returned, got {type(d).__name__}")
    if not isinstance(expert_out, torch.Tensor):
        raise ValueError(f"{op}: expert_out must be a torch.Tensor, got {type(expert_out).__name__}")
    _check_trainable(op, a2a, expert_out.dtype)
    return HighThroughputCombineFunction.apply(a2a, d, expert_out.contiguous(), d.row_weight, d.topk_idx)
