r"""The GPU tests' reference checks as one node of a multi-node job (pplx_kernels' launch variables), so that they
run where pytest's launcher cannot place ranks: nodes that are separate hosts, or the two groups of
scripts/device/two_groups.sh.

    NODE_RANK=0 WORLD_SIZE=4 WORLD_LOCAL_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python3 -m tests.check_all_to_all
    scripts/device/two_groups.sh 4 python3 -m tests.check_all_to_all [--checks NAME,...]

Each check starts this node's ranks afresh and meets the other nodes at MASTER_PORT + its position in the list (a
port of its own: the previous check's rendezvous may still hold its port). Every node must run the same checks.
The internode transport only: the intranode one needs every rank's memory, which no multi-node job has.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any, Optional

from . import test_all_to_all_gpu, test_deep_ep_gpu, test_high_throughput_gpu
from .distributed import launch_from_env

CHECKS: dict[str, tuple[Callable[..., None], tuple[Any, ...]]] = {
    "low-latency": (test_all_to_all_gpu._worker_eager, ("internode",)),
    "low-latency-cuda-graph": (test_all_to_all_gpu._worker_cuda_graph, ("internode",)),
    "high-throughput-model": (test_high_throughput_gpu._worker, ("internode", "model")),
    "high-throughput-autograd": (test_high_throughput_gpu._worker, ("internode", "autograd")),
    "deep-ep-low-latency": (test_deep_ep_gpu._patterns, ("low-latency", list(test_deep_ep_gpu.CALLS))),
    "deep-ep-cuda-graph": (test_deep_ep_gpu._patterns, ("cuda-graph", ["hooks", "no-hooks"])),
    "deep-ep-high-throughput": (test_deep_ep_gpu._patterns, ("high-throughput", list(test_deep_ep_gpu.HT_CALLS))),
}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checks", default=",".join(CHECKS), help="comma-separated, of: " + ", ".join(CHECKS))
    names = [name for name in parser.parse_args(argv).checks.split(",") if name]
    unknown = [name for name in names if name not in CHECKS]
    if unknown:
        parser.error(f"unknown checks {unknown}; known: {', '.join(CHECKS)}")
    node_rank = os.environ["NODE_RANK"]
    timeout_s = float(os.environ.get("EXPERTWIRE_TEST_TIMEOUT_S", "600"))
    for position, name in enumerate(names):
        worker, args = CHECKS[name]
        start = time.monotonic()
        launch_from_env(worker, *args, port_offset=position, timeout_s=timeout_s)
        print(f"check_all_to_all: {name} passed on node {node_rank} ({time.monotonic() - start:.1f} s)", flush=True)
    print(f"check_all_to_all: {len(names)} checks passed on node {node_rank} of {os.environ['WORLD_SIZE']} ranks")


if __name__ == "__main__":
    main()
