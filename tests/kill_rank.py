r"""A rank dies mid-job: what the survivors see, with a launcher of its own (mpirun and torchrun stop every rank
when one dies).

    python3 -m tests.kill_rank --ranks 8 --transport internode --kill-at inside-combine
    scripts/device/with_mps.sh python3 -m tests.kill_rank --ranks 8 --transport all --kill-at all

Every rank loops dispatch + experts + combine on one object in the default mode, each step checked against the
reference: an AllToAll (send and receive halves as separate calls) or, with --kind high-throughput, a
HighThroughputAllToAll (tests/fault_steps.py). At step --kill-step the victim (--victim, default the last rank)
SIGKILLs itself at the kill point: before its dispatch, between the dispatch's halves (high-throughput: between
its dispatch and its combine), or between the combine's halves (high-throughput: right after its combine is
launched); "external": the launcher kills it at a random moment of that step instead. The survivors must each raise
DeviceError naming the victim within the timeout (EXPERTWIRE_TIMEOUT_MS, --timeout-ms) + 2 s of the kill, and
their processes must end, as a serving process does on an uncaught error, within --exit-limit-s more. Prints
one line a run with the times measured; exits non-zero when any run fails.

At interpreter exit expertwire releases NVSHMEM memory without nvshmem_free (a barrier, which waits for the dead
rank forever); --without-exit-release keeps the collective free, to show what it does.
"""

from __future__ import annotations

import argparse
import atexit
import json
import multiprocessing
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

import expertwire

from .all_to_all_data import Case
from .distributed import RankInfo, _rank_entry, free_port, nvshmem_join, why_transport_cannot_run
from .fault_steps import KINDS, make_steps

KILL_POINTS = ("before-dispatch", "between-halves", "inside-combine", "external")
CASE = Case("fp8", torch.bfloat16, torch.bfloat16, split=True, max_num_tokens=32, num_experts=32)


def _write(path: Path, record: dict[str, Any]) -> None:
    """Whole or not at all: a rank may be killed while it writes."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record))
    os.replace(partial, path)


def _worker(info: RankInfo, opts: dict[str, Any]) -> None:
    report_path = Path(opts["reports"]) / f"rank{info.rank}.json"
    report: dict[str, Any] = {"rank": info.rank, "steps_ok": 0}
    if opts["without_exit_release"]:
        atexit.unregister(expertwire.nvshmem._release_at_exit)
    if opts["transport"] == "internode":
        nvshmem_join(info)
    work = make_steps(opts["kind"], info, opts["transport"], CASE, fault_tolerant=False)
    victim = info.rank == opts["victim"]

    def die() -> None:
        report["killed_at"] = time.time()
        _write(report_path, report)
        os.kill(os.getpid(), signal.SIGKILL)

    for step in range(opts["steps"]):
        work.prepare(step)
        torch.cuda.synchronize()
        kill_now = step == opts["kill_step"]
        if kill_now:
            report["kill_step_started"] = time.time()
            _write(report_path, report)
        try:
            work.run(opts["kill_at"] if victim and kill_now else None, die)
            torch.cuda.synchronize()
            work.a2a.check_errors()
        except expertwire.DeviceError as error:
            report.update(error=str(error), error_at=time.time())
            _write(report_path, report)
            raise  # the process ends on it, as a serving process would: its exit must not hang either
        work.check([1] * info.world_size)
        report["steps_ok"] = step + 1
    _write(report_path, report)
    raise RuntimeError(f"rank {info.rank}: every step completed, but rank {opts['victim']} was to be killed")


def _one_run(ranks: int, transport: str, kill_at: str, args: argparse.Namespace) -> tuple[bool, str]:
    victim = args.victim if args.victim is not None else ranks - 1
    with tempfile.TemporaryDirectory(prefix="expertwire-kill-") as reports:
        opts = dict(
            kind=args.kind,
            transport=transport,
            steps=args.steps,
            kill_step=args.kill_step,
            kill_at=kill_at,
            victim=victim,
            reports=reports,
            without_exit_release=args.without_exit_release,
        )
        processes = start_ranks(ranks, _worker, opts)
        killed_at: Optional[float] = None
        victim_file = Path(reports) / f"rank{victim}.json"
        deadline = time.monotonic() + args.run_limit_s
        if kill_at == "external":
            while time.monotonic() < deadline and not victim_file.exists():
                time.sleep(0.01)
            # A random moment of the next few steps (the ranks step together; each takes a few ms).
            time.sleep(random.Random(args.seed * 131 + ranks).uniform(0.0, 0.005))
            killed_at = time.time()
            os.kill(processes[victim].pid, signal.SIGKILL)
        exited_at, hung = wait_for_exits(processes, deadline)
        reports_by_rank = read_reports(reports, ranks)
        if killed_at is None:
            killed_at = reports_by_rank[victim].get("killed_at")
        problems = []
        if killed_at is None:
            problems.append(f"rank {victim} was not killed (it reported {reports_by_rank[victim]})")
        limit_s = args.timeout_ms / 1000 + 2.0
        error_after = []
        for r in range(ranks):
            if r == victim:
                continue
            rep = reports_by_rank[r]
            if rep.get("steps_ok", 0) < args.kill_step:
                problems.append(f"rank {r}: only {rep.get('steps_ok', 0)} steps matched the reference before the kill")
            error = rep.get("error")
            if error is None:
                problems.append(f"rank {r}: no DeviceError (report {rep})")
                continue
            if f"waiting for rank {victim}" not in error:
                problems.append(f"rank {r}: the error does not name rank {victim}: {error}")
            if killed_at is not None:
                after = rep["error_at"] - killed_at
                error_after.append(after)
                if after > limit_s:
                    problems.append(f"rank {r}: DeviceError {after:.2f} s after the kill, more than {limit_s:.1f} s")
        if hung:
            problems.append(f"ranks {hung} still ran {args.run_limit_s:.0f} s after the start (killed)")
        survivors = [r for r in range(ranks) if r != victim and r in exited_at]
        exit_after = {
            r: exited_at[r] - reports_by_rank[r]["error_at"] for r in survivors if "error_at" in reports_by_rank[r]
        }
        for r, after in exit_after.items():
            if after > args.exit_limit_s:
                problems.append(f"rank {r} ended {after:.2f} s after its error, more than {args.exit_limit_s:.1f} s")
        for r in survivors:
            # An uncaught DeviceError ends a process with status 1; anything else (a crash in teardown) fails.
            if processes[r].exitcode != 1:
                problems.append(f"rank {r} ended with status {processes[r].exitcode}, expected 1 (the DeviceError)")
        if victim in exited_at and processes[victim].exitcode != -signal.SIGKILL:
            problems.append(f"rank {victim} ended with status {processes[victim].exitcode}, not by SIGKILL")
        survivors_exit = sorted({processes[r].exitcode for r in survivors})
        summary = (
            f"kill_rank: {args.kind}, {transport}, {ranks} ranks, rank {victim} killed {kill_at} at step "
            f"{args.kill_step}: "
            + (
                f"DeviceError on the survivors {min(error_after):.2f}-{max(error_after):.2f} s after the kill "
                f"(timeout {args.timeout_ms / 1000:.1f} s)"
                if error_after
                else "no DeviceError measured"
            )
            + (
                f"; they ended {min(exit_after.values()):.2f}-{max(exit_after.values()):.2f} s after their errors"
                if exit_after
                else ""
            )
            + f", exit codes {survivors_exit}, "
            + ("none hung" if not hung else f"hung: {hung}")
        )
        if problems:
            summary += "\n  " + "\n  ".join(problems)
        return not problems, summary


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, steps=8, kill_step=3, run_limit_s=90.0)
    parser.add_argument("--kill-at", default="all", choices=[*KILL_POINTS, "all"])
    parser.add_argument("--victim", type=int, default=None, help="the rank killed (default the last)")
    parser.add_argument("--exit-limit-s", type=float, default=10.0, help="a survivor's exit after its error")
    parser.add_argument(
        "--without-exit-release",
        action="store_true",
        help="the ranks release NVSHMEM memory at exit as before expertwire.nvshmem._release_at_exit (to compare)",
    )
    args = parser.parse_args(argv)
    # A step after the kill: survivors may complete the step in flight (the victim had sent its part).
    if not 0 <= args.kill_step < args.steps - 1:
        parser.error(f"--kill-step must be in [0, --steps - 1 = {args.steps - 1}), got {args.kill_step}")
    if args.victim is not None and not 0 <= args.victim < args.ranks:
        parser.error(f"--victim must be in [0, --ranks = {args.ranks}), got {args.victim}")
    points = list(KILL_POINTS) if args.kill_at == "all" else [args.kill_at]
    run_each("kill_rank", args, points, _one_run)


def add_run_arguments(parser: argparse.ArgumentParser, steps: int, kill_step: int, run_limit_s: float) -> None:
    """The options of a launcher that kills ranks, which run_each and the launch read."""
    parser.add_argument("--kind", default="low-latency", choices=KINDS, help="which all-to-all the ranks loop")
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--transport", default="internode", choices=["internode", "intranode", "all"])
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--kill-step", type=int, default=kill_step)
    parser.add_argument("--timeout-ms", type=int, default=2000)
    parser.add_argument("--run-limit-s", type=float, default=run_limit_s, help="a run's ranks are killed after this")
    parser.add_argument("--seed", type=int, default=0)


def run_each(tool: str, args: argparse.Namespace, variants: list[str], one_run) -> None:
    """one_run(ranks, transport, variant, args) -> (ok, summary) for every transport of --transport that can run
    here and every variant; prints a PASS or FAIL line for each and exits non-zero when any failed."""
    os.environ["EXPERTWIRE_TIMEOUT_MS"] = str(args.timeout_ms)
    transports = ["internode", "intranode"] if args.transport == "all" else [args.transport]
    failed = 0
    for transport in transports:
        reason = why_transport_cannot_run(transport, args.ranks)
        if reason is not None:
            print(f"{tool}: {transport} skipped: {reason}", flush=True)
            continue
        for variant in variants:
            ok, summary = one_run(args.ranks, transport, variant, args)
            failed += not ok
            print(("PASS " if ok else "FAIL ") + summary, flush=True)
    sys.exit(1 if failed else 0)


def wait_for_exits(
    processes: list[multiprocessing.Process],
    deadline: float,
    on_poll: Optional[Callable[[dict[int, float]], None]] = None,
) -> tuple[dict[int, float], list[int]]:
    """When each rank's process ended (time.time()), polled until all have or `deadline` (time.monotonic()) passes,
    on_poll(ended so far) after each poll; the ranks still running then are killed and listed as hung."""
    exited_at: dict[int, float] = {}
    while len(exited_at) < len(processes) and time.monotonic() < deadline:
        for r, process in enumerate(processes):
            if r not in exited_at and not process.is_alive():
                exited_at[r] = time.time()
        if on_poll is not None:
            on_poll(exited_at)
        time.sleep(0.01)
    hung = [r for r in range(len(processes)) if r not in exited_at]
    for r in hung:
        processes[r].kill()
        processes[r].join()
    return exited_at, hung


def read_reports(reports: str, ranks: int) -> dict[int, dict[str, Any]]:
    """Each rank's last report ({} for a rank that wrote none)."""
    by_rank = {}
    for r in range(ranks):
        path = Path(reports) / f"rank{r}.json"
        by_rank[r] = json.loads(path.read_text()) if path.exists() else {}
    return by_rank


def start_ranks(ranks: int, worker, opts: dict[str, Any]) -> list[multiprocessing.Process]:
    """`ranks` fresh processes running worker(RankInfo, opts) over one gloo group (not daemons: a rank's exit is
    what the caller measures)."""
    context = multiprocessing.get_context("spawn")
    init_method = f"tcp://127.0.0.1:{free_port()}"
    processes = [
        context.Process(target=_rank_entry, args=(r, ranks, ranks, 0, init_method, worker, (opts,)), daemon=False)
        for r in range(ranks)
    ]
    for process in processes:
        process.start()
    return processes


if __name__ == "__main__":
    main()
