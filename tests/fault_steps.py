"""The steps that the launchers which kill ranks (kill_rank, survive_rank) loop, for either all-to-all kind: one
dispatch + experts + combine, a point where the rank may die inside it, and its check against the reference."""

from __future__ import annotations

from typing import Optional

import expertwire

from .all_to_all_data import Case, check_combine, make_groups, masked_groups, run_experts
from .distributed import RankInfo
from .test_all_to_all_gpu import RankBuffers, _check, make_all_to_all
from .test_high_throughput_gpu import ht_factory, model_check, model_object, model_step

KINDS = ("low-latency", "high-throughput")


def low_latency_step(a2a: expertwire.AllToAll, b: RankBuffers, die_at: Optional[str], die, case: Case) -> None:
    """One dispatch + experts + combine of `case`, each in its halves; die() at `die_at`, the point where this
    rank dies."""
    if die_at == "before-dispatch":
        die()
    for do_send, do_recv in ((True, False), (False, True)):
        a2a.dispatch(
            b.expert_num_tokens,
            b.expert_x,
            b.expert_x_scale,
            b.dp_x,
            b.dp_x_scale,
            b.indices,
            b.bound_m,
            do_send=do_send,
            do_recv=do_recv,
        )
        if die_at == "between-halves" and do_send:
            die()
    expert_y = run_experts(case, b.expert_x, b.expert_factors)
    for do_send, do_recv in ((True, False), (False, True)):
        a2a.combine(b.out_tokens, b.indices, b.weights, expert_y, b.bound_m, do_send=do_send, do_recv=do_recv)
        if die_at == "inside-combine" and do_send:
            die()


class LowLatencySteps:
    """The steps of an AllToAll: low_latency_step of `case`."""

    def __init__(self, info: RankInfo, transport: str, case: Case, fault_tolerant: bool) -> None:
        self.info, self.case = info, case
        self.a2a = make_all_to_all(transport, case, info, fault_tolerant=fault_tolerant)

    def prepare(self, step: int) -> None:
        self.groups = make_groups(self.case, self.info.world_size, seed=1000 + step)
        self.buffers = RankBuffers(self.case, self.info, self.groups[self.info.rank])

    def run(self, die_at: Optional[str], die) -> None:
        low_latency_step(self.a2a, self.buffers, die_at, die, self.case)

    def check(self, active: list[int], received: bool = True) -> None:
        """Against the reference with `active`'s masked ranks left out; `received`: the dispatch too."""
        groups = masked_groups(self.case, self.groups, active)
        if received:
            _check(self.case, self.info, groups, self.buffers)
        else:
            check_combine(self.case, self.info.rank, self.info.world_size, groups, self.buffers.out_tokens)


class HighThroughputSteps:
    """The steps of a HighThroughputAllToAll: test_high_throughput_gpu's model steps, the layouts in turn, exact
    and worst-case outputs. Dying "between-halves" falls between its dispatch and its combine, "inside-combine"
    right after its combine is launched."""

    M0 = 40  # rank 0's tokens; rank r has 5 r more

    def __init__(self, info: RankInfo, transport: str, fault_tolerant: bool) -> None:
        self.info = info
        # Aligned for the expert-contiguous layout; the rank-packed layout ignores the alignment.
        self.a2a = model_object(info, ht_factory(transport), "expert-contiguous", fault_tolerant=fault_tolerant)

    def prepare(self, step: int) -> None:
        self.layout = ("rank-packed", "expert-contiguous")[step % 2]
        self.seed, self.worst, self.outputs = 1000 + step, step % 4 >= 2, None

    def run(self, die_at: Optional[str], die) -> None:
        if die_at == "before-dispatch":
            die()

        def at(point: str) -> None:
            if point == die_at:
                die()

        self.outputs = model_step(self.a2a, self.info, self.layout, self.seed, self.M0, self.worst, at)

    def check(self, active: list[int], received: bool = True) -> None:
        model_check(self.info, self.layout, self.seed, self.M0, self.worst, active, *self.outputs, received=received)


def make_steps(kind: str, info: RankInfo, transport: str, case: Case, fault_tolerant: bool):
    """The steps of `kind` (KINDS); `case`: the low-latency kind's."""
    if kind == "high-throughput":
        return HighThroughputSteps(info, transport, fault_tolerant)
    return LowLatencySteps(info, transport, case, fault_tolerant)
