"""CPU-only: the C++ reference model, reached through Python, against an independent torch computation."""

from __future__ import annotations

import pytest
import torch

from expertwire import reference

from .all_to_all_data import NO_EXPERT, Case, config_of, expert_outputs_table, make_groups

CASES = [
    (Case("fp8", torch.bfloat16, torch.bfloat16), 4),
    (Case("bf16", torch.float16, torch.float32, dp_size=2), 4),
    (Case("bf16", torch.bfloat16, torch.bfloat16, num_experts=8, experts_per_token=8), 8),
]


def _expected_inboxes(groups: list, rank: int, local: int) -> list[list[tuple[int, int]]]:
    """Per local expert of `rank`, the sorted (group, token) pairs whose rows name it (NO_EXPERT names none)."""
    expected: list[list[tuple[int, int]]] = [[] for _ in range(local)]
    for g, data in enumerate(groups):
        for t in range(data.m):
            for e in data.indices[t].to(torch.int64).tolist():
                if e != NO_EXPERT and e // local == rank:
                    expected[e % local].append((g, t))
    return [sorted(inbox) for inbox in expected]


@pytest.mark.parametrize("case, world_size", CASES, ids=lambda v: str(v))
def test_dispatch_delivers_each_token_to_each_of_its_experts(case: Case, world_size: int) -> None:
    groups = make_groups(case, world_size, seed=1)
    local = case.num_experts // world_size
    for rank in range(world_size):
        inboxes = reference.dispatch(config_of(case, rank, world_size), [g.tokens() for g in groups])
        assert inboxes == _expected_inboxes(groups, rank, local)


@pytest.mark.parametrize("case, world_size", CASES, ids=lambda v: str(v))
def test_combine_is_the_weighted_sum_in_k_order(case: Case, world_size: int) -> None:
    groups = make_groups(case, world_size, seed=2)
    table = expert_outputs_table(case, groups)
    for rank in range(0, world_size, case.dp_size):
        g = rank // case.dp_size
        data = groups[g]
        got = reference.combine(config_of(case, rank, world_size), g, data.tokens(), table)
        want = torch.zeros(data.m, case.hidden_dim)
        for k in range(case.experts_per_token):
            rows = table[data.indices[: data.m, k].long(), g, torch.arange(data.m)]
            want = want + data.weights[: data.m, k : k + 1] * rows
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_dispatch_rejects_a_repeated_expert() -> None:
    case = Case("bf16", torch.bfloat16, torch.bfloat16, num_experts=8)
    groups = make_groups(case, 2, seed=3, rows=4)
    groups[1].m = 4
    groups[1].indices[2, 1] = groups[1].indices[2, 0]
    with pytest.raises(ValueError, match=r"group 1, token 2, k 1: expert index \d+ repeats the expert at k 0"):
        reference.dispatch(config_of(case, 0, 2), [g.tokens() for g in groups])


def test_dispatch_rejects_an_expert_out_of_range() -> None:
    case = Case("bf16", torch.bfloat16, torch.bfloat16, num_experts=8)
    groups = make_groups(case, 2, seed=4, rows=3)
    groups[0].m = 3
    groups[0].indices[1, 0] = 8
    with pytest.raises(ValueError, match=r"expert index 8 is out of range \[0, num_experts=8\)"):
        reference.dispatch(config_of(case, 0, 2), [g.tokens() for g in groups])


def test_no_expert_slots_deliver_and_add_nothing() -> None:
    """A slot of 0xFFFFFFFF (-1 as int32, DeepEP's "no expert"), in any number of a row's slots: dispatch sends
    nothing for it and combine adds nothing, with no error."""
    case = Case("bf16", torch.bfloat16, torch.bfloat16, num_experts=8, experts_per_token=4)
    world_size = 2
    groups = make_groups(case, world_size, seed=5, rows=4)
    for data in groups:
        data.m = 4
    no_expert = torch.tensor(-1, dtype=torch.int32).view(torch.uint32)
    groups[0].indices[1, 0] = no_expert
    groups[0].indices[1, 2] = no_expert
    groups[1].indices[3, :] = no_expert
    local = case.num_experts // world_size
    for rank in range(world_size):
        inboxes = reference.dispatch(config_of(case, rank, world_size), [g.tokens() for g in groups])
        assert inboxes == _expected_inboxes(groups, rank, local)
    table = expert_outputs_table(case, groups)
    for g, data in enumerate(groups):
        got = reference.combine(config_of(case, g, world_size), g, data.tokens(), table)
        want = torch.zeros(data.m, case.hidden_dim)
        for t in range(data.m):
            for k in range(case.experts_per_token):
                e = int(data.indices[t, k].to(torch.int64))
                if e != NO_EXPERT:
                    want[t] += data.weights[t, k] * table[e, g, t]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert torch.equal(got[3], torch.zeros(case.hidden_dim))


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="num_experts"):
        reference.AllToAllConfig(
            max_num_tokens=8,
            num_experts=7,
            experts_per_token=2,
            rank=0,
            world_size=2,
            dp_size=1,
            hidden_dim=128,
            hidden_dim_bytes=256,
            hidden_dim_scale_bytes=0,
        )


def test_16_bit_conversions_match_torch() -> None:
    from expertwire import _ext

    values = torch.cat(
        [
            torch.randn(2000, generator=torch.Generator().manual_seed(5)) * 1000,
            torch.tensor([0.0, -0.0, 1.0, 65504.0, 65520.0, 1e-8, 6.1e-5, 3.0e38, float("inf"), -float("inf")]),
        ]
    )
    for value in values.tolist():
        bf16 = torch.tensor([value]).to(torch.bfloat16)
        assert _ext.float_to_bf16(value) == bf16.view(torch.int16).item() & 0xFFFF, value
        assert _ext.bf16_to_float(_ext.float_to_bf16(value)) == bf16.float().item()
        half = torch.tensor([value]).to(torch.float16)
        assert _ext.float_to_half(value) == half.view(torch.int16).item() & 0xFFFF, value
        assert _ext.half_to_float(_ext.float_to_half(value)) == half.float().item()


def _torch_cast_fp8_blocks(x: torch.Tensor, round_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The same cast written with torch operations, as an independent check of the reference's arithmetic."""
    blocks = x.float().view(x.shape[0], -1, 128)
    amax = blocks.abs().amax(dim=-1).clamp(min=1e-4)
    inverse_max = torch.tensor(1.0 / 448.0, dtype=torch.float32)
    if round_scale:
        exponent = torch.ceil(torch.log2(amax * inverse_max))
        scale, scale_inv = torch.exp2(-exponent), torch.exp2(exponent)
    else:
        # A tensor over a tensor: IEEE division (448.0 / amax multiplies by a rounded reciprocal).
        scale, scale_inv = torch.full_like(amax, 448.0) / amax, amax * inverse_max
    scaled = (blocks * scale[..., None]).clamp(-448.0, 448.0)
    return scaled.view(x.shape).to(torch.float8_e4m3fn), scale_inv


@pytest.mark.parametrize("round_scale", [False, True])
def test_cast_fp8_blocks_matches_an_independent_cast(round_scale: bool) -> None:
    generator = torch.Generator().manual_seed(7)
    x = (torch.randn((6, 1024), generator=generator) * torch.logspace(-3, 3, 1024)).to(torch.bfloat16)
    x[2] = 0  # amax floor
    x[3, 0], x[3, 1:128] = 1.0, torch.logspace(-6, -2, 127)  # a block whose small values round to subnormals
    values, scales = reference.cast_fp8_blocks(x, round_scale=round_scale)
    want_values, want_scales = _torch_cast_fp8_blocks(x, round_scale)
    assert values.dtype == torch.float8_e4m3fn and values.shape == (6, 1024) and scales.shape == (6, 8)
    assert torch.equal(values.view(torch.uint8), want_values.view(torch.uint8))
    assert torch.equal(scales, want_scales)
    # What the scales are for: the values times their block's scale give x back to e4m3's precision.
    back = values.float().view(6, 8, 128) * scales[..., None]
    close = (back.view(6, 1024) - x.float()).abs() <= x.float().abs() * 2**-3 + scales.repeat_interleave(128, 1) * 2**-9
    assert bool(close.all())


def test_cast_fp8_blocks_packs_ue8m0_exponents_four_to_a_word() -> None:
    x = torch.zeros((1, 512), dtype=torch.bfloat16)
    for block, amax in enumerate([2.0, 1.0, 448.0, 0.0]):
        x[0, block * 128] = amax
    values, packed = reference.cast_fp8_blocks(x, round_scale=True, use_ue8m0=True)
    # scale_inv: 2^ceil(log2(amax / 448)) = 2^-7, 2^-8, 2^0, 2^-22 (the 1e-4 floor); bytes 127 + exponent.
    assert packed.dtype == torch.int32 and packed.shape == (1, 1)
    assert packed.view(torch.uint8).tolist() == [[120, 119, 127, 105]]
    assert values[0, 256].float().item() == 448.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(x=torch.zeros((2, 256), dtype=torch.float16)), "x must be a 2-D bfloat16 tensor, got torch.float16"),
        (dict(x=torch.zeros((2, 100), dtype=torch.bfloat16)), "hidden_dim must be a multiple of 128, got 100"),
        (dict(x=torch.zeros((2, 256), dtype=torch.bfloat16), use_ue8m0=True), "use_ue8m0 needs round_scale=True"),
        (
            dict(x=torch.zeros((2, 256), dtype=torch.bfloat16), round_scale=True, use_ue8m0=True),
            "hidden must be a multiple of 512, got 256",
        ),
    ],
)
def test_cast_fp8_blocks_refuses_bad_input(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        reference.cast_fp8_blocks(**kwargs)
