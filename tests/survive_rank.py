r"""The fault-tolerant mode under a dead or stuck rank, with a launcher of its own (mpirun and torchrun stop every
rank when one dies).

    python3 -m tests.survive_rank --ranks 8 --transport internode --fault inside-combine
    scripts/device/with_mps.sh python3 -m tests.survive_rank --ranks 8 --transport all --fault all
    python3 -m tests.survive_rank --kind high-throughput --ranks 8 --transport intranode --fault all

Every rank loops dispatch + experts + combine on one object made with fault_tolerant=True: an AllToAll (send and
receive halves as separate calls) or, with --kind high-throughput, a HighThroughputAllToAll (the rank-packed and
expert-contiguous layouts in turn, exact and worst-case outputs). At step --kill-step the victim (rank
ranks // 2, a middle one: every offset after its rows shifts) SIGKILLs itself at the fault's point (before its
dispatch; between the dispatch's halves, or for the high-throughput kind between its dispatch and its combine;
between the combine's halves, or right after the high-throughput combine is launched; "external": the launcher
kills it at a random moment of that step); "two-kills": that rank at that step and the last rank two steps later;
"stuck": the victim stops calling (it sleeps) and, once the survivors are done, makes one more call, which must
raise DeviceError saying it was masked out; "stuck-returns": the same call, made while the survivors still run
(they go on until two steps after it), whose steps must still match the reference.

Every survivor must: return from each step within the timeout (EXPERTWIRE_TIMEOUT_MS, --timeout-ms) + 1 s;
match the reference, with the ranks its mask has masked left out, at every step whose mask did not change while
it ran (at a step in flight, its combine against the mask it ended with, but for a death at a random moment,
which may fall in the agreement itself); end with exactly the victims masked, as every other
survivor; and end with status 0. Each run is followed by a run of the survivors' count of ranks without a fault,
whose step time the survivors' later steps must be within --time-limit (10 %) of. Prints one line a run;
exits non-zero when any fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

import expertwire

from .all_to_all_data import Case
from .distributed import RankInfo, nvshmem_join
from .fault_steps import make_steps
from .kill_rank import _write, add_run_arguments, read_reports, run_each, start_ranks, wait_for_exits

FAULTS = ("before-dispatch", "between-halves", "inside-combine", "external", "two-kills", "stuck", "stuck-returns")
STEPS_AT_MOST = 1000
LOCAL_EXPERTS = 4


def _case(world_size: int) -> Case:
    """The same work per rank at any rank count: LOCAL_EXPERTS experts a rank."""
    return Case(
        "fp8", torch.bfloat16, torch.bfloat16, split=True, max_num_tokens=32, num_experts=LOCAL_EXPERTS * world_size
    )


def _victims(fault: Optional[str], ranks: int, kill_step: int) -> dict[int, int]:
    """Victim rank -> the step at which it dies (or stops)."""
    if fault is None:
        return {}
    if fault == "two-kills":
        return {ranks // 2: kill_step, ranks - 1: kill_step + 2}
    return {ranks // 2: kill_step}


def _worker(info: RankInfo, opts: dict[str, Any]) -> None:
    report_path = Path(opts["reports"]) / f"rank{info.rank}.json"
    report: dict[str, Any] = {"rank": info.rank, "steps": []}
    if opts["transport"] == "internode":
        nvshmem_join(info)
    work = make_steps(opts["kind"], info, opts["transport"], _case(info.world_size), fault_tolerant=True)
    a2a = work.a2a
    victims = {int(r): s for r, s in opts["victims"].items()}
    die_step = victims.get(info.rank)
    fault = opts["fault"]
    rejoined = Path(opts["reports"]) / "rejoined"
    # Where the stuck rank calls again while the survivors run, they decide together when to stop (every rank
    # makes the group; only the survivors use it).
    survivors = None
    if fault == "stuck-returns":
        survivors = dist.new_group([r for r in range(info.world_size) if r not in victims])

    def die() -> None:
        report["killed_at"] = time.time()
        _write(report_path, report)
        if fault == "stuck":
            # Alive but no longer calling: back once the survivors are done, for one more call.
            while not (Path(opts["reports"]) / "survivors_done").exists():
                time.sleep(0.05)
            raise _Stuck()
        if fault == "stuck-returns":
            _wait_until_masked(info.rank, Path(opts["reports"]), opts["timeout_s"])
            raise _Stuck()
        os.kill(os.getpid(), signal.SIGKILL)

    steps_after_rejoin = 0
    for step in range(STEPS_AT_MOST):
        if step >= opts["steps"] and (survivors is None or steps_after_rejoin >= 2):
            break
        work.prepare(step)
        torch.cuda.synchronize()
        before = a2a.active_ranks.cpu().tolist()
        if step == die_step:
            report["kill_step_started"] = time.time()
            _write(report_path, report)
        die_at = None
        if step == die_step:
            die_at = "before-dispatch" if fault in ("two-kills", "stuck", "stuck-returns") else fault
            if fault == "external":
                die_at = None
        try:
            started = time.perf_counter()
            work.run(die_at, die)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - started
        except _Stuck:
            _rejoin(work, report, report_path, rejoined)
            return
        a2a.check_errors()
        after = a2a.active_ranks.cpu().tolist()
        entry: dict[str, Any] = {"step": step, "seconds": seconds, "active": after}
        if after == before:
            work.check(after)
            entry["checked"] = True
        elif fault != "external":
            # The step in flight: its combine is exact for the agreed mask (its dispatch may hold rows the dead
            # rank sent before it died). At a random moment the death may fall in the agreement itself, whose
            # masks may then differ for this step: not checked there.
            work.check(after, received=False)
            entry["combine_checked"] = True
        # Every rank makes the same calls (they are collective): the repeats run at every step, and time the
        # step where the mask stayed as it was.
        repeats = []
        for _ in range(opts["repeats"]):
            torch.cuda.synchronize()
            begin = time.perf_counter()
            work.run(None, die)
            torch.cuda.synchronize()
            repeats.append(time.perf_counter() - begin)
        steady = after == before and a2a.active_ranks.cpu().tolist() == after
        entry["repeat_seconds"] = statistics.mean(repeats) if repeats and steady else None
        if survivors is not None:
            seen = torch.tensor([int(rejoined.exists())])
            dist.all_reduce(seen, op=dist.ReduceOp.MAX, group=survivors)
            if int(seen):
                entry["after_rejoin"] = True
                steps_after_rejoin += 1
        report["steps"].append(entry)
        _write(report_path, report)
    report["done"] = True
    _write(report_path, report)


def _wait_until_masked(rank: int, reports: Path, timeout_s: float) -> None:
    """Until a survivor's report shows `rank` masked (it then calls again while they still run)."""
    deadline = time.monotonic() + 3 * timeout_s + 10
    while time.monotonic() < deadline:
        for path in reports.glob("rank*.json"):
            steps = json.loads(path.read_text()).get("steps", [])
            if steps and steps[-1]["active"][rank] == 0:
                return
        time.sleep(0.02)


class _Stuck(Exception):
    """The stuck victim's way back to its last call."""


def _rejoin(work, report: dict[str, Any], path: Path, rejoined: Path) -> None:
    """The stuck rank's call after the survivors masked it: must raise DeviceError, quickly."""
    started = time.perf_counter()
    try:
        work.run(None, lambda: None)
        torch.cuda.synchronize()
        work.a2a.check_errors()
        report["rejoin_error"] = None
    except expertwire.DeviceError as error:
        report["rejoin_error"] = str(error)
    report["rejoin_seconds"] = time.perf_counter() - started
    report["done"] = True
    _write(path, report)
    rejoined.touch()
    # The error is sticky: the process ends without touching the object again (its release at exit is local).
    os._exit(0 if report["rejoin_error"] else 1)


def _launch(ranks: int, transport: str, fault: Optional[str], args: argparse.Namespace, reports: str):
    victims = _victims(fault, ranks, args.kill_step)
    opts = dict(
        kind=args.kind,
        transport=transport,
        steps=args.steps,
        victims={str(r): s for r, s in victims.items()},
        fault=fault,
        reports=reports,
        repeats=args.repeats,
        timeout_s=args.timeout_ms / 1000,
    )
    processes = start_ranks(ranks, _worker, opts)
    killed_at: dict[int, float] = {}
    deadline = time.monotonic() + args.run_limit_s
    if fault == "external":
        (victim,) = victims
        started = Path(reports) / f"rank{victim}.json"
        while time.monotonic() < deadline and not started.exists():
            time.sleep(0.01)
        while time.monotonic() < deadline and "kill_step_started" not in json.loads(started.read_text() or "{}"):
            time.sleep(0.002)
        time.sleep(random.Random(args.seed * 131 + ranks).uniform(0.0, 0.005))
        killed_at[victim] = time.time()
        os.kill(processes[victim].pid, signal.SIGKILL)
    survivors = [r for r in range(ranks) if r not in victims]

    def release_the_stuck_rank(exited_at: dict[int, float]) -> None:
        if fault == "stuck" and all(r in exited_at for r in survivors):
            (Path(reports) / "survivors_done").touch()

    _, hung = wait_for_exits(processes, deadline, release_the_stuck_rank)
    by_rank = read_reports(reports, ranks)
    for r in victims:
        killed_at.setdefault(r, by_rank[r].get("killed_at", float("nan")))
    return victims, survivors, processes, by_rank, killed_at, hung


def _steady_step_s(by_rank: dict[int, dict[str, Any]], ranks: list[int], from_step: int) -> Optional[float]:
    """Mean over the checked steps from `from_step` on of the slowest rank's repeat time."""
    per_step: dict[int, list[float]] = {}
    for r in ranks:
        for entry in by_rank[r].get("steps", []):
            if entry["step"] >= from_step and entry.get("repeat_seconds") is not None:
                per_step.setdefault(entry["step"], []).append(entry["repeat_seconds"])
    slowest = [max(times) for step, times in per_step.items() if len(times) == len(ranks)]
    return statistics.mean(slowest) if slowest else None


def _one_run(ranks: int, transport: str, fault: str, args: argparse.Namespace) -> tuple[bool, str]:
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="expertwire-survive-") as reports:
        victims, survivors, processes, by_rank, killed_at, hung = _launch(ranks, transport, fault, args, reports)
    # The same GPU share a rank as the faulted run's ranks had (under MPS, 100 / ranks per cent each).
    share = os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(max(1, 100 // ranks))
    try:
        with tempfile.TemporaryDirectory(prefix="expertwire-survive-") as reports:
            base = _launch(len(survivors), transport, None, args, reports)
    finally:
        if share is None:
            del os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"]
        else:
            os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = share
    limit_s = args.timeout_ms / 1000 + 1.0
    final = [int(r not in victims) for r in range(ranks)]
    last_victim_step = max(victims.values())
    in_flight = []
    for r in survivors:
        rep = by_rank[r]
        steps = rep.get("steps", [])
        if not rep.get("done") or len(steps) < args.steps:
            problems.append(f"rank {r}: {len(steps)} of {args.steps} steps reported")
        if fault == "stuck-returns" and not any(e.get("after_rejoin") and e.get("checked") for e in steps):
            problems.append(f"rank {r}: no step checked after the stuck rank's call")
        for entry in steps:
            if entry["seconds"] > limit_s:
                problems.append(f"rank {r}: step {entry['step']} took {entry['seconds']:.2f} s (> {limit_s:.1f} s)")
            if not entry.get("checked"):
                in_flight.append(entry["seconds"])
        if steps and steps[-1]["active"] != final:
            problems.append(f"rank {r}: final mask {steps[-1]['active']}, expected {final}")
        if processes[r].exitcode != 0:
            problems.append(f"rank {r} ended with status {processes[r].exitcode}")
    # Every survivor returns each call with the same mask, except where a rank died during the agreement itself
    # (the masks of that step may differ; the next step's agreement makes them equal): the step in flight.
    masks_by_step: dict[int, set[str]] = {}
    in_flight_steps = set()
    for r in survivors:
        for entry in by_rank[r].get("steps", []):
            masks_by_step.setdefault(entry["step"], set()).add(str(entry["active"]))
            if not entry.get("checked"):
                in_flight_steps.add(entry["step"])
    differing = [s for s, masks in masks_by_step.items() if len(masks) > 1 and s not in in_flight_steps]
    if differing:
        problems.append(f"the survivors' masks differed after steps {differing}")
    if hung:
        problems.append(f"ranks {hung} still ran {args.run_limit_s:.0f} s after the start (killed)")
    for r in victims:
        code = processes[r].exitcode
        if fault.startswith("stuck"):
            error = by_rank[r].get("rejoin_error")
            if not error or "masked it out" not in error:
                problems.append(f"stuck rank {r}: its call after the survivors' steps raised {error!r}")
            if code != 0:
                problems.append(f"stuck rank {r} ended with status {code}")
        elif r not in hung and code != -signal.SIGKILL:
            problems.append(f"rank {r} ended with status {code}, not by SIGKILL")
    # Steady time: the checked steps after the last death's step in flight.
    masked_s = _steady_step_s(by_rank, survivors, last_victim_step + 2)
    _, base_ranks, base_processes, base_by_rank, _, base_hung = base
    base_s = _steady_step_s(base_by_rank, base_ranks, last_victim_step + 2)
    if base_hung or any(p.exitcode != 0 for p in base_processes):
        problems.append(f"the {len(survivors)}-rank run without a fault failed (hung {base_hung})")
    ratio = masked_s / base_s if masked_s and base_s else None
    if ratio is None:
        problems.append("no steady step time measured")
    elif ratio > 1 + args.time_limit:
        problems.append(f"steps with the mask took {ratio:.2f}x a {len(survivors)}-rank step's")
    rejoin = by_rank[max(victims)].get("rejoin_seconds") if fault.startswith("stuck") else None
    if rejoin is not None and rejoin > 1.0:
        problems.append(f"the stuck rank's call took {rejoin:.2f} s to raise (more than 1 s)")
    summary = (
        f"survive_rank: {args.kind}, {transport}, {ranks} ranks, {fault} (ranks {sorted(victims)}): "
        f"steps in flight {', '.join(f'{s:.2f}' for s in sorted(in_flight))} s (limit {limit_s:.1f} s); "
        + (
            f"steady step {masked_s * 1e6:.0f} us against {base_s * 1e6:.0f} us on {len(survivors)} ranks "
            f"({ratio:.3f}x)"
            if ratio
            else "no steady time"
        )
        + (f"; the stuck rank's call raised after {rejoin:.3f} s" if rejoin is not None else "")
    )
    if problems:
        summary += "\n  " + "\n  ".join(problems)
    return not problems, summary


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, steps=10, kill_step=2, run_limit_s=120.0)
    parser.add_argument("--fault", default="all", choices=[*FAULTS, "all"])
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats of each checked step")
    parser.add_argument("--time-limit", type=float, default=0.10, help="steady steps' excess over fewer ranks'")
    args = parser.parse_args(argv)
    if args.ranks < 3:
        parser.error(f"--ranks must be >= 3 (two kills leave one rank), got {args.ranks}")
    # After the last death (two kills: kill step + 2) a step in flight, then at least one steady step.
    if not 0 <= args.kill_step < args.steps - 4:
        parser.error(f"--kill-step must be in [0, --steps - 4 = {args.steps - 4}), got {args.kill_step}")
    run_each("survive_rank", args, list(FAULTS) if args.fault == "all" else [args.fault], _one_run)


if __name__ == "__main__":
    main()
