"""Test data and checks shared by the GPU tests: every rank rebuilds every DP group's tokens from one seed, so
each rank can ask the reference model what it must receive and what combine must produce."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

import expertwire
from expertwire import reference

SCALE_BLOCK = 128  # fp8 payloads carry one float32 scale per 128 elements, as DeepSeek-style quantization does


@dataclasses.dataclass(frozen=True)
class Case:
    payload: str  # "fp8" (float8_e4m3fn + float32 scales) or "bf16"
    expert_dtype: torch.dtype  # expert_y
    out_dtype: torch.dtype  # combine's out_tokens
    dp_size: int = 1
    split: bool = False  # send and receive halves as separate calls
    use_bound_m: bool = True
    max_num_tokens: int = 24
    num_experts: int = 16
    experts_per_token: int = 4
    hidden_dim: int = 256
    # How the scale tensors are laid out: "contiguous"; "padded", rows wider than the scales, as vLLM's
    # per-token fp8 allocates out_expert_x_scale (round_up(hidden_dim, 4) words a row); "column-major", as
    # DeepGEMM reads them.
    scale_layout: str = "contiguous"
    # The indices' type on the GPU: uint32 (pplx_kernels') or int64 (DeepEP's topk_idx), both read as they are.
    index_dtype: torch.dtype = torch.uint32

    @property
    def row_dtype(self) -> torch.dtype:
        """The type expert rows travel and are summed as: a float32 expert_y's are rounded to out_dtype."""
        return self.out_dtype if self.expert_dtype == torch.float32 else self.expert_dtype

    @property
    def payload_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.payload == "fp8" else torch.bfloat16

    @property
    def hidden_dim_bytes(self) -> int:
        return self.hidden_dim * torch.empty((), dtype=self.payload_dtype).element_size()

    @property
    def scale_columns(self) -> int:
        return (self.hidden_dim + SCALE_BLOCK - 1) // SCALE_BLOCK if self.payload == "fp8" else 0

    @property
    def hidden_dim_scale_bytes(self) -> int:
        return self.scale_columns * 4

    def __str__(self) -> str:
        parts = [
            self.payload,
            f"y={str(self.expert_dtype)[6:]}",
            f"out={str(self.out_dtype)[6:]}",
            f"dp={self.dp_size}",
        ]
        if self.scale_layout != "contiguous":
            parts.append(f"scales={self.scale_layout}")
        if self.index_dtype != torch.uint32:
            parts.append(f"indices={str(self.index_dtype)[6:]}")
        return " ".join(parts + (["split"] if self.split else []) + ([] if self.use_bound_m else ["no-bound_m"]))


@dataclasses.dataclass
class GroupData:
    """One DP group's tokens (CPU): `rows` rows in dp_x, of which the first `m` are sent (bound_m)."""

    m: int
    x: torch.Tensor
    x_scale: Optional[torch.Tensor]
    indices: torch.Tensor
    weights: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    def tokens(self) -> reference.GroupTokens:
        m = self.m
        scale = None if self.x_scale is None else self.x_scale[:m]
        return reference.GroupTokens(x=self.x[:m], indices=self.indices[:m], x_scale=scale, weights=self.weights[:m])


def make_groups(case: Case, world_size: int, seed: int, rows: Optional[int] = None) -> list[GroupData]:
    """Each group's tokens: `rows` rows (default: a random count), of which a random m are sent with bound_m."""
    groups = []
    for group in range(world_size // case.dp_size):
        gen = torch.Generator().manual_seed(seed * 7919 + group)
        group_rows = rows if rows is not None else int(torch.randint(1, case.max_num_tokens + 1, (1,), generator=gen))
        m = int(torch.randint(0, group_rows + 1, (1,), generator=gen)) if case.use_bound_m else group_rows
        x = torch.randn(group_rows, case.hidden_dim, generator=gen).to(case.payload_dtype)
        x_scale = torch.rand(group_rows, case.scale_columns, generator=gen) if case.payload == "fp8" else None
        # Distinct experts per row: the first top-k of a random permutation.
        order = torch.rand(group_rows, case.num_experts, generator=gen).argsort(dim=1)
        indices = order[:, : case.experts_per_token]
        weights = torch.rand(group_rows, case.experts_per_token, generator=gen)
        groups.append(GroupData(m, x, x_scale, indices.to(torch.uint32), weights))
    return groups


NO_EXPERT = 0xFFFFFFFF


def masked_groups(case: Case, groups: list[GroupData], active: list[int]) -> list[GroupData]:
    """What the fault-tolerant mode must deliver once the ranks whose `active` entry is 0 are masked out (dp_size
    1): as if those ranks sent no tokens and owned no experts, i.e. their groups send none (m = 0) and every other
    group's slots that name one of their experts name none."""
    local = case.num_experts // len(active)
    lost_experts = torch.tensor([active[e // local] == 0 for e in range(case.num_experts)])
    masked = []
    for rank, data in enumerate(groups):
        named = data.indices.to(torch.int64)
        lost = (named < case.num_experts) & lost_experts[named.clamp(max=case.num_experts - 1)]
        indices = torch.where(lost, torch.full_like(named, NO_EXPERT), named).to(torch.uint32)
        masked.append(dataclasses.replace(data, m=data.m if active[rank] else 0, indices=indices))
    return masked


def expert_factor(expert: int) -> float:
    """What the test's expert e multiplies its tokens by: exact in every 16-bit type."""
    return 1.0 + expert / 8.0


def expert_outputs_table(case: Case, groups: list[GroupData]) -> torch.Tensor:
    """[num_experts, num_dp_groups, max_num_tokens, hidden_dim] float32: expert e's output for each token, rounded
    to expert_dtype and then to row_dtype, as the GPU sums it."""
    table = torch.zeros(case.num_experts, len(groups), case.max_num_tokens, case.hidden_dim)
    for g, data in enumerate(groups):
        for e in range(case.num_experts):
            rows = (data.x.float() * expert_factor(e)).to(case.expert_dtype).to(case.row_dtype)
            table[e, g, : data.rows] = rows.float()
    return table


def config_of(case: Case, rank: int, world_size: int) -> "expertwire.reference.AllToAllConfig":
    return reference.AllToAllConfig(
        max_num_tokens=case.max_num_tokens,
        num_experts=case.num_experts,
        experts_per_token=case.experts_per_token,
        rank=rank,
        world_size=world_size,
        dp_size=case.dp_size,
        hidden_dim=case.hidden_dim,
        hidden_dim_bytes=case.hidden_dim_bytes,
        hidden_dim_scale_bytes=case.hidden_dim_scale_bytes,
    )


def _row_bytes(rows: torch.Tensor) -> list[bytes]:
    row_bytes = math.prod(rows.shape[1:]) * rows.element_size()
    flat = rows.detach().cpu().contiguous().view(torch.uint8).reshape(rows.shape[0], row_bytes)
    return [bytes(row.tolist()) for row in flat]


def check_dispatch(
    case: Case,
    rank: int,
    world_size: int,
    groups: list[GroupData],
    expert_num_tokens: torch.Tensor,
    expert_x: torch.Tensor,
    expert_x_scale: Optional[torch.Tensor],
) -> None:
    """Each local expert got exactly the reference's tokens, payload and scales byte for byte (in any order)."""
    config = config_of(case, rank, world_size)
    inboxes = reference.dispatch(config, [g.tokens() for g in groups])
    counts = expert_num_tokens.cpu().tolist()
    for local, inbox in enumerate(inboxes):
        assert counts[local] == len(inbox), (
            f"rank {rank} [{case}]: local expert {local} received {counts[local]} tokens, expected {len(inbox)}"
        )
        got = _row_bytes(expert_x[local, : len(inbox)])
        want = [_row_bytes(groups[g].x[t : t + 1])[0] for g, t in inbox]
        if expert_x_scale is not None:
            got = [a + b for a, b in zip(got, _row_bytes(expert_x_scale[local, : len(inbox)]), strict=False)]
            want = [a + _row_bytes(groups[g].x_scale[t : t + 1])[0] for a, (g, t) in zip(want, inbox, strict=False)]  # type: ignore[index]
        assert sorted(got) == sorted(want), f"rank {rank} [{case}]: local expert {local} received other rows"


def local_expert_factors(rank: int, num_local_experts: int, device: torch.device) -> torch.Tensor:
    """[num_local_experts, 1, 1] float32: expert_factor of each of this rank's experts."""
    first = rank * num_local_experts
    factors = [expert_factor(first + i) for i in range(num_local_experts)]
    return torch.tensor(factors, device=device).reshape(-1, 1, 1)


def run_experts(case: Case, expert_x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """expert_y for this rank: each local expert scales its rows by its factor."""
    return (expert_x.float() * factors).to(case.expert_dtype)


def check_combine(case: Case, rank: int, world_size: int, groups: list[GroupData], out_tokens: torch.Tensor) -> None:
    """out_tokens[:m] matches the reference (fp32 sums; FMA against separate multiply-add, one unit in the last
    place after rounding to a 16-bit type); rows from m on still hold the NaN they were filled with."""
    group = rank // case.dp_size
    data = groups[group]
    want = reference.combine(
        config_of(case, rank, world_size), group, data.tokens(), expert_outputs_table(case, groups)
    )
    got = out_tokens.cpu()
    rtol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[case.out_dtype]
    torch.testing.assert_close(
        got[: data.m].float(),
        want.to(case.out_dtype).float(),
        rtol=rtol,
        atol=1e-5,
        msg=lambda text: f"rank {rank} [{case}] combine: {text}",
    )
    assert torch.all(got[data.m :].float().isnan()), (
        f"rank {rank} [{case}]: combine wrote rows from bound_m={data.m} on"
    )
