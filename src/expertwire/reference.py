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


def cast_fp8_blocks(
    x: torch.Tensor, round_scale: bool = False, use_ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp8 cast of DeepEP's low-latency dispatch, on the CPU, bit for bit: every 128 values of a token's bf16
    row scaled so that the block's largest magnitude (at least 1e-4) maps to 448, then rounded to e4m3 (nearest
    even, saturated). Returns (float8_e4m3fn [m, hidden], scales): float32 [m, hidden // 128] (the factor back to
    x; powers of two with `round_scale`), or with `use_ue8m0` their exponent bytes packed four to an int32,
    block 4p + j in byte j of word p: int32 [m, hidden // 512]."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16 or x.dim() != 2:
        got = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"cast_fp8_blocks: x must be a 2-D bfloat16 tensor, got {got}")
    if use_ue8m0 and not round_scale:
        raise ValueError("cast_fp8_blocks: use_ue8m0 needs round_scale=True (UE8M0 holds powers of two only)")
    m, hidden = x.shape
    if use_ue8m0 and hidden % 512 != 0:
        raise ValueError(
            f"cast_fp8_blocks: use_ue8m0 packs four 128-value blocks per int32: hidden must be a multiple "
            f"of 512, got {hidden}"
        )
    bits = x.detach().cpu().contiguous().view(torch.int16).numpy().view("uint16")
    out = torch.empty((m, hidden), dtype=torch.uint8)
    scale_inv = torch.empty((m, hidden // 128), dtype=torch.float32)
    ue8m0 = torch.empty((m, hidden // 128), dtype=torch.uint8) if use_ue8m0 else None
    ext.reference_cast_fp8_blocks(
        bits, round_scale, out.numpy(), scale_inv.numpy(), None if ue8m0 is None else ue8m0.numpy()
    )
    values = out.view(torch.float8_e4m3fn)
    return (values, scale_inv) if ue8m0 is None else (values, ue8m0.view(torch.int32))
