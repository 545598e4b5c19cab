"""The fault-tolerant mode on the GPU without a failure, in both all-to-all kinds: with every rank active it matches
the reference as the default mode does, and a rank that the others mask out (set_active_ranks) is left out of
every later call, as the reference (the high-throughput model) with that rank masked says. Killed and stuck ranks:
tests/survive_rank.py (a launcher of its own).

Rank counts: EXPERTWIRE_TEST_RANKS, as test_all_to_all_gpu.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import expertwire

from .all_to_all_data import Case, make_groups, masked_groups
from .distributed import RankInfo, launch
from .test_all_to_all_gpu import (
    RANK_COUNTS,
    TRANSPORTS,
    RankBuffers,
    _check,
    _require_ranks,
    _with_transport,
    dispatch_and_combine,
    make_all_to_all,
)
from .test_high_throughput_gpu import MODEL_ROUNDS, ht_factory, model_object, model_round

CASES = [
    Case("fp8", torch.bfloat16, torch.bfloat16, max_num_tokens=16, num_experts=16),
    Case("bf16", torch.bfloat16, torch.float32, split=True, index_dtype=torch.int64, num_experts=16),
]


def _steps(a2a: expertwire.AllToAll, case: Case, info: RankInfo, seeds: range, active: list[int]) -> None:
    """One dispatch + experts + combine per seed, each checked against the reference with `active`'s masked ranks
    left out, and the object's mask checked to be `active`."""
    for seed in seeds:
        groups = make_groups(case, info.world_size, seed)
        buffers = RankBuffers(case, info, groups[info.rank])
        dispatch_and_combine(a2a, case, buffers)
        torch.cuda.synchronize()
        a2a.check_errors()
        _check(case, info, masked_groups(case, groups, active), buffers)
        assert a2a.active_ranks.cpu().tolist() == active, f"rank {info.rank}: mask {a2a.active_ranks.tolist()}"


def _worker_every_rank_active(info: RankInfo, transport: str) -> None:
    def body() -> None:
        for number, case in enumerate(CASES):
            a2a = make_all_to_all(transport, case, info, fault_tolerant=True)
            assert a2a.fault_tolerant
            _steps(a2a, case, info, range(10 * number, 10 * number + 3), [1] * info.world_size)
            dist.barrier()
            a2a.destroy()

    _with_transport(info, transport, body)


def _worker_masked_rank(info: RankInfo, transport: str) -> None:
    """A middle rank (its rows sit between others') is masked out by the others and makes no call; they go on
    without it."""

    def body() -> None:
        case = CASES[0]
        a2a = make_all_to_all(transport, case, info, fault_tolerant=True)
        everyone = [1] * info.world_size
        _steps(a2a, case, info, range(40, 41), everyone)
        dist.barrier()
        masked = info.world_size // 2
        active = [int(r != masked) for r in range(info.world_size)]
        if info.rank != masked:
            with pytest.raises(ValueError, match=f"rank {info.rank} cannot mask itself out"):
                a2a.set_active_ranks(torch.tensor([int(r != info.rank) for r in range(info.world_size)]))
            with pytest.raises(ValueError, match="shape"):
                a2a.set_active_ranks(torch.ones(info.world_size + 1, dtype=torch.int32))
            a2a.set_active_ranks(torch.tensor(active, dtype=torch.int32))
            _steps(a2a, case, info, range(41, 44), active)
            with pytest.raises(ValueError, match=rf"ranks \[{masked}\] are masked out already and cannot come back"):
                a2a.set_active_ranks(torch.ones(info.world_size, dtype=torch.bool))
        dist.barrier()
        a2a.destroy()

    _with_transport(info, transport, body)


def _worker_refusals(info: RankInfo, transport: str) -> None:
    def body() -> None:
        default = make_all_to_all(transport, CASES[0], info)
        assert not default.fault_tolerant
        with pytest.raises(ValueError, match="without fault_tolerant=True"):
            default.active_ranks  # noqa: B018
        dist.barrier()
        default.destroy()
        groups_of_two = Case("fp8", torch.bfloat16, torch.bfloat16, dp_size=2)
        with pytest.raises(ValueError, match="fault_tolerant needs dp_size 1"):
            make_all_to_all(transport, groups_of_two, info, fault_tolerant=True)

    _with_transport(info, transport, body)


def _worker_high_throughput(info: RankInfo, transport: str) -> None:
    """Both layouts: every model round with every rank active; then the others mask a middle rank (whose counts
    sit between others', so every offset after it shifts), which makes no more calls, and every round again without
    it."""

    def body() -> None:
        world, masked = info.world_size, info.world_size // 2
        everyone = [1] * world
        active = [int(r != masked) for r in range(world)]
        for layout in ("rank-packed", "expert-contiguous"):
            a2a = model_object(info, ht_factory(transport), layout, fault_tolerant=True)
            assert a2a.fault_tolerant
            for seed, (m0, worst) in enumerate(MODEL_ROUNDS):
                model_round(a2a, info, layout, seed, m0, worst, everyone)
            assert a2a.active_ranks.cpu().tolist() == everyone, f"rank {info.rank}: {a2a.active_ranks.tolist()}"
            dist.barrier()
            if info.rank != masked:
                with pytest.raises(ValueError, match=f"rank {info.rank} cannot mask itself out"):
                    a2a.set_active_ranks(torch.tensor([int(r != info.rank) for r in range(world)]))
                a2a.set_active_ranks(torch.tensor(active, dtype=torch.int32))
                for seed, (m0, worst) in enumerate(MODEL_ROUNDS):
                    model_round(a2a, info, layout, 20 + seed, m0, worst, active)
                assert a2a.active_ranks.cpu().tolist() == active, f"rank {info.rank}: {a2a.active_ranks.tolist()}"
            dist.barrier()
            a2a.destroy()
        default = model_object(info, ht_factory(transport), "rank-packed")
        assert not default.fault_tolerant
        with pytest.raises(ValueError, match="without fault_tolerant=True"):
            default.active_ranks  # noqa: B018
        dist.barrier()
        default.destroy()

    _with_transport(info, transport, body)


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", RANK_COUNTS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_high_throughput_fault_tolerant(transport: str, world_size: int) -> None:
    _require_ranks(world_size, transport)
    launch(world_size, _worker_high_throughput, transport)


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", RANK_COUNTS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_fault_tolerant_matches_reference_with_every_rank_active(transport: str, world_size: int) -> None:
    _require_ranks(world_size, transport)
    launch(world_size, _worker_every_rank_active, transport)


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", RANK_COUNTS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_masked_rank_is_left_out(transport: str, world_size: int) -> None:
    _require_ranks(world_size, transport)
    launch(world_size, _worker_masked_rank, transport)


@pytest.mark.gpu
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_fault_tolerant_refusals(transport: str) -> None:
    _require_ranks(2, transport)
    launch(2, _worker_refusals, transport)
