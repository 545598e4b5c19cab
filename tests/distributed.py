"""Starting N rank processes for the GPU tests and the benchmark.

Ranks talk through a gloo process group: NCCL refuses two ranks on one GPU, and gloo carries everything the
tests need (the NVSHMEM unique id, the intranode IPC handles, barriers). With fewer GPUs than ranks, every rank
uses GPU 0, which only works under CUDA MPS (the kernels of different ranks wait on each other, so they must
run at once); each rank then takes 100/N % of the SMs, as scripts/device/run_ranks.sh does.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# As scripts/device/run_ranks.sh: NVLink multicast stays off (it can take a shared host's GPUs out of service),
# ranks on one node use no remote transport, the heap fits the largest benchmark configuration, and kernels load
# eagerly.
RANK_ENVIRONMENT = {
    "NVSHMEM_DISABLE_NVLS": "1",
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_REMOTE_TRANSPORT": "none",
    "NVSHMEM_SYMMETRIC_SIZE": "2G",
    # Every kernel module loaded at start: a rank's first launch of a kernel then loads nothing while a peer's
    # kernel waits for it (a suspected cause of a combine that timed out under MPS).
    "CUDA_MODULE_LOADING": "EAGER",
}


@dataclasses.dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    world_local_size: int
    device: torch.device
    shares_gpu: bool  # several ranks of this node use one GPU (under MPS)


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def mps_running() -> bool:
    """Whether a CUDA MPS control daemon is reachable through this environment's pipe directory."""
    pipe_dir = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"))
    return (pipe_dir / "control").exists()


def why_ranks_cannot_run(world_local_size: int) -> Optional[str]:
    """None when this node can run `world_local_size` ranks at once, else the reason it cannot."""
    gpus = visible_gpus()
    if gpus == 0:
        return "no GPU visible (torch.cuda.device_count() == 0); the multi-rank tests need a CUDA device"
    if gpus < world_local_size and not mps_running():
        return (
            f"{world_local_size} ranks would share {gpus} GPU(s) without CUDA MPS, and their kernels wait on "
            "each other; run scripts/device/run_pytest_gpu.sh, which starts an MPS daemon"
        )
    return None


def why_transport_cannot_run(transport: str, world_local_size: int) -> Optional[str]:
    """why_ranks_cannot_run, and for the intranode transport why this job's ranks may not use peer memory (they
    run as on different nodes)."""
    reason = why_ranks_cannot_run(world_local_size)
    if reason is None and transport == "intranode":
        import expertwire

        reason = expertwire.peer_memory_unavailable_reason()
    return reason


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _rank_entry(
    local_rank: int,
    world_size: int,
    world_local_size: int,
    node_rank: int,
    init_method: str,
    worker: Callable[..., None],
    args: tuple[Any, ...],
) -> None:
    for name, value in RANK_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    stacks_after = os.environ.get("EXPERTWIRE_TEST_STACKS_AFTER_S")
    if stacks_after:
        # A rank still running then prints where every thread of it is (a hung test says where it hangs).
        faulthandler.dump_traceback_later(float(stacks_after), exit=False)
    if world_local_size > 1 and mps_running():
        # Before anything touches CUDA, torch.cuda.device_count() included: the MPS client takes its SM limit
        # when CUDA starts. Without it every rank sizes its launch for the whole GPU, the ranks' blocks cannot
        # all be resident at once, and kernels that wait on each other time out. (MPS is only started for
        # ranks that share one GPU: scripts/device/with_mps.sh.) A smaller value already set wins: launches that
        # share the GPU with other launches (two groups of ranks as two nodes) set 100 / all its ranks, since
        # NVSHMEM refuses its on-stream collectives when the ranks' shares add up to more than the GPU ("limited
        # MPG").
        share = max(1, 100 // world_local_size)
        preset = os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "")
        if preset.isdigit() and 0 < int(preset) < share:
            share = int(preset)
        os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(share)
    shares_gpu = visible_gpus() < world_local_size
    device_index = 0 if shares_gpu else local_rank
    torch.cuda.set_device(device_index)
    rank = node_rank * world_local_size + local_rank
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    info = RankInfo(rank, world_size, local_rank, world_local_size, torch.device("cuda", device_index), shares_gpu)
    # An exception leaves the process at once: the launcher then stops every other rank.
    worker(info, *args)
    dist.destroy_process_group()


def launch(
    world_local_size: int,
    worker: Callable[..., None],
    *args: Any,
    world_size: Optional[int] = None,
    node_rank: int = 0,
    init_method: Optional[str] = None,
    timeout_s: Optional[float] = None,
) -> None:
    """Runs worker(RankInfo, *args) in `world_local_size` fresh processes of this node and waits for all of
    them; a rank's exception is raised here. Kills every rank after `timeout_s` (default
    EXPERTWIRE_TEST_TIMEOUT_S, else 600)."""
    if timeout_s is None:
        timeout_s = float(os.environ.get("EXPERTWIRE_TEST_TIMEOUT_S", "600"))
    world_size = world_size or world_local_size
    init_method = init_method or f"tcp://127.0.0.1:{free_port()}"
    context = mp.start_processes(
        _rank_entry,
        args=(world_size, world_local_size, node_rank, init_method, worker, args),
        nprocs=world_local_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"{world_local_size} ranks did not finish within {timeout_s:.0f} s")


def launch_from_env(
    worker: Callable[..., None], *args: Any, port_offset: int = 0, timeout_s: Optional[float] = None
) -> None:
    """pplx_kernels' multi-node launch: this node runs WORLD_LOCAL_SIZE ranks of WORLD_SIZE, node NODE_RANK,
    meeting at MASTER_ADDR:MASTER_PORT + port_offset; killed after timeout_s (default EXPERTWIRE_LAUNCH_TIMEOUT_S,
    else 3600)."""
    world_size = int(os.environ["WORLD_SIZE"])
    world_local_size = int(os.environ["WORLD_LOCAL_SIZE"])
    node_rank = int(os.environ["NODE_RANK"])
    init_method = f"tcp://{os.environ['MASTER_ADDR']}:{int(os.environ['MASTER_PORT']) + port_offset}"
    if timeout_s is None:
        timeout_s = float(os.environ.get("EXPERTWIRE_LAUNCH_TIMEOUT_S", "3600"))
    launch(
        world_local_size,
        worker,
        *args,
        world_size=world_size,
        node_rank=node_rank,
        init_method=init_method,
        timeout_s=timeout_s,
    )


def run_as_torchrun_rank(worker: Callable[..., None], *args: Any) -> None:
    """Runs worker in this process, one rank of a torchrun job (RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, ...)."""
    local_rank = int(os.environ["LOCAL_RANK"])
    world_local_size = int(os.environ["LOCAL_WORLD_SIZE"])
    node_rank = int(os.environ["RANK"]) // world_local_size
    _rank_entry(local_rank, int(os.environ["WORLD_SIZE"]), world_local_size, node_rank, "env://", worker, args)


def nvshmem_join(info: RankInfo) -> None:
    """Rank 0 makes the NVSHMEM unique id, the process group carries it to everyone, everyone joins."""
    import expertwire

    uid = expertwire.nvshmem_get_unique_id() if info.rank == 0 else expertwire.nvshmem_alloc_empty_unique_id()
    dist.broadcast(uid, src=0)
    expertwire.nvshmem_init(uid, info.rank, info.world_size)
