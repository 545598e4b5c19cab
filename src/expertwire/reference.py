"""The C++ CPU reference model of dispatch and combine (the oracle of the GPU tests), on CPU tensors.

Semantics: expert e lives on rank e // num_local_experts. Dispatch delivers every token t < m of every DP group
once to each expert in its row of `indices`; combine gives out[t] = sum_k weights[t, k] * y(indices[t, k], t),
summed in fp32 in k order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from ._native import ext

AllToAllConfig = ext.AllToAllConfig


@dataclass(frozen=True)
class GroupTokens:
    """The tokens one DP group holds for one call (CPU tensors)."""

    x: torch.Tensor  # [m, ...] payload of hidden_dim_bytes per row, any dtype
    indices: torch.Tensor  # [m, experts_per_token] uint32
    x_scale: Optional[torch.Tensor] = None  # [m, ...] hidden_dim_scale_bytes per row
    weights: Optional[torch.Tensor] = None  # [m, experts_per_token] float32, for combine


def _row_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as [rows, bytes per row] uint8, as the native reference reads it."""
    row_bytes = math.prod(tensor.shape[1:]) * tensor.element_size()
    return tensor.detach().cpu().contiguous().view(torch.uint8).reshape(tensor.shape[0], row_bytes)


def dispatch(config: AllToAllConfig, groups: Sequence[GroupTokens]) -> list[list[tuple[int, int]]]:
    """For each local expert of config.rank, the (source DP group, token) pairs it receives, sorted."""
    arrays = []
    for group in groups:
        scale = None if group.x_scale is None else _row_bytes(group.x_scale)
        indices = group.indices.detach().cpu().contiguous()
        arrays.append((int(group.x.shape[0]), _row_bytes(group.x), scale, indices))
    return [list(inbox) for inbox in ext.reference_dispatch(config, arrays)]


def combine(config: AllToAllConfig, group: int, tokens: GroupTokens, expert_outputs: torch.Tensor) -> torch.Tensor:
    """out [m, hidden_dim] float32 for DP group `group`. expert_outputs[e, g, t] is expert e's output row for token
    t of group g: float32 [num_experts, num_dp_groups, max_num_tokens, hidden_dim], values as the GPU holds them
    (already rounded to the 16-bit expert_y type)."""
    if tokens.weights is None:
        raise ValueError("reference.combine: tokens.weights must be a float32 tensor, got None")
    m = int(tokens.indices.shape[0])
    out = torch.zeros((m, config.hidden_dim), dtype=torch.float32)
    ext.reference_combine(
        config,
        group,
        m,
        tokens.indices.detach().cpu().contiguous(),
        tokens.weights.detach().cpu().contiguous().to(torch.float32),
        expert_outputs.detach().cpu().contiguous().to(torch.float32),
        out,
    )
    return out
