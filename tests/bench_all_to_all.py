r"""Benchmark: expertwire dispatch/combine (both transports) against torch.distributed.all_to_all_single and
NVSHMEM's alltoall moving the same rows.

Launch (as pplx_kernels' seed README, or with torchrun, or locally):
    NODE_RANK=0 WORLD_SIZE=8 WORLD_LOCAL_SIZE=8 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 \
        python3 -m tests.bench_all_to_all
    torchrun --nproc-per-node 8 -m tests.bench_all_to_all
    python3 -m tests.bench_all_to_all --ranks 8
Several ranks on one GPU need CUDA MPS (scripts/device/with_mps.sh starts it).

Every rank moves exactly --tokens tokens, each to --top-k distinct experts. Each timed operation is preceded by
an NVSHMEM barrier on the stream and timed with CUDA events; per iteration the slowest rank counts, and the
table gives the mean and median of those. expertwire is timed twice: called from Python ("eager": the slowest
rank's host time per call counts, as the others wait for it) and replayed from a CUDA graph ("graph"). The
baselines move, for each destination rank, the rows expertwire delivers there (one per (token, expert) pair):
dispatch-sized rows (fp8 payload + scales) and combine-sized rows (bf16), each destination padded to the largest
count as a dense all-to-all needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
from collections.abc import Callable
from typing import Optional

import torch
import torch.distributed as dist

import expertwire

from .distributed import RankInfo, launch, launch_from_env, nvshmem_join, run_as_torchrun_rank, visible_gpus

SCALE_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class Options:
    tokens: list[int]
    experts: int
    top_k: int
    hidden: int
    dp_size: int
    warmup: int
    iters: int
    plot: str


@dataclasses.dataclass
class Timing:
    method: str
    op: str  # "dispatch" or "combine"
    tokens: int
    mean_us: float
    median_us: float


class RankWorkload:
    """This rank's tokens for one token count, generated from the rank's DP group so groups hold equal tokens."""

    def __init__(self, opts: Options, tokens: int, info: RankInfo) -> None:
        gen = torch.Generator().manual_seed(1234 + info.rank // opts.dp_size)
        device = info.device
        self.x = torch.randn(tokens, opts.hidden, generator=gen).to(torch.float8_e4m3fn).to(device)
        self.x_scale = torch.rand(tokens, (opts.hidden + SCALE_BLOCK - 1) // SCALE_BLOCK, generator=gen).to(device)
        order = torch.rand(tokens, opts.experts, generator=gen).argsort(dim=1)
        self.indices_cpu = order[:, : opts.top_k].to(torch.uint32)
        self.indices = self.indices_cpu.to(device)
        self.weights = torch.rand(tokens, opts.top_k, generator=gen).to(device)


def _slowest_rank_stats(samples_us: list[float]) -> tuple[float, float]:
    """Per iteration the slowest rank's time, then the mean and median over iterations (same on every rank)."""
    gathered: list[Optional[list[float]]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, samples_us)
    slowest = [max(per_rank[i] for per_rank in gathered if per_rank is not None) for i in range(len(samples_us))]
    return statistics.fmean(slowest), statistics.median(slowest)


def _time(opts: Options, op: Callable[[], None]) -> tuple[float, float]:
    stream = torch.cuda.current_stream()
    samples: list[float] = []
    for i in range(opts.warmup + opts.iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        expertwire.nvshmem_barrier_all_on_current_stream()
        start.record(stream)
        op()
        end.record(stream)
        end.synchronize()
        if i >= opts.warmup:
            samples.append(start.elapsed_time(end) * 1e3)
    return _slowest_rank_stats(samples)


def bench_expertwire(opts: Options, info: RankInfo, tokens: int, transport: str, work: RankWorkload) -> list[Timing]:
    scale_bytes = work.x_scale.shape[1] * 4
    factory = expertwire.AllToAll.internode if transport == "internode" else expertwire.AllToAll.intranode
    a2a = factory(
        tokens,
        opts.experts,
        opts.top_k,
        info.rank,
        info.world_size,
        opts.dp_size,
        opts.hidden,
        opts.hidden,
        scale_bytes,
    )
    device = info.device
    local = opts.experts // info.world_size
    recv = tokens * (info.world_size // opts.dp_size)
    expert_num_tokens = torch.empty(local, dtype=torch.int32, device=device)
    expert_x = torch.empty(local, recv, opts.hidden, dtype=torch.float8_e4m3fn, device=device)
    expert_x_scale = torch.empty(local, recv, work.x_scale.shape[1], device=device)
    expert_y = torch.randn(local, recv, opts.hidden, device=device).to(torch.bfloat16)
    out_tokens = torch.empty(tokens, opts.hidden, dtype=torch.bfloat16, device=device)

    def dispatch() -> None:
        a2a.dispatch(expert_num_tokens, expert_x, expert_x_scale, work.x, work.x_scale, work.indices, None)

    def combine() -> None:
        a2a.combine(out_tokens, work.indices, work.weights, expert_y, None)

    eager = _time_dispatch_combine(opts, dispatch, combine)
    # Serving stacks replay the layer as a CUDA graph: the same kernels without Python's host time per call.
    dispatch_graph, combine_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(dispatch_graph):
        dispatch()
    with torch.cuda.graph(combine_graph):
        combine()
    replayed = _time_dispatch_combine(opts, dispatch_graph.replay, combine_graph.replay)
    a2a.check_errors()
    dist.barrier()
    del dispatch_graph, combine_graph
    a2a.destroy()
    timings = []
    for method, (dispatch_stats, combine_stats) in (
        (f"expertwire {transport}", eager),
        (f"expertwire {transport} graph", replayed),
    ):
        timings.append(Timing(method, "dispatch", tokens, *dispatch_stats))
        timings.append(Timing(method, "combine", tokens, *combine_stats))
    return timings


def _time_dispatch_combine(
    opts: Options, dispatch: Callable[[], None], combine: Callable[[], None]
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Times dispatch and combine alternately (each combine needs the routes of a dispatch before it)."""
    stream = torch.cuda.current_stream()
    dispatch_us: list[float] = []
    combine_us: list[float] = []
    for i in range(opts.warmup + opts.iters):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        expertwire.nvshmem_barrier_all_on_current_stream()
        events[0].record(stream)
        dispatch()
        events[1].record(stream)
        expertwire.nvshmem_barrier_all_on_current_stream()
        events[2].record(stream)
        combine()
        events[3].record(stream)
        events[3].synchronize()
        if i >= opts.warmup:
            dispatch_us.append(events[0].elapsed_time(events[1]) * 1e3)
            combine_us.append(events[2].elapsed_time(events[3]) * 1e3)
    return _slowest_rank_stats(dispatch_us), _slowest_rank_stats(combine_us)


def _rows_per_destination(opts: Options, info: RankInfo, work: RankWorkload) -> tuple[list[torch.Tensor], int]:
    """For each destination rank, the token of each (token, expert) pair it receives from this rank, and the padded
    block size: the largest count over every (source, destination) pair. As in expertwire's dispatch, a rank
    sends its DP group's tokens only to the ranks whose dp_rank equals its own."""
    local = opts.experts // info.world_size
    owner = work.indices_cpu.long() // local
    token_of_pair = torch.arange(owner.shape[0])[:, None].expand_as(owner)
    rows = []
    for destination in range(info.world_size):
        if destination % opts.dp_size == info.rank % opts.dp_size:
            rows.append(token_of_pair[owner == destination])
        else:
            rows.append(token_of_pair[:0, 0])
    block = torch.tensor([max(len(r) for r in rows)])
    dist.all_reduce(block, op=dist.ReduceOp.MAX)
    return rows, max(1, int(block))


def _dense_send_buffer(rows: list[torch.Tensor], block: int, payload: torch.Tensor) -> torch.Tensor:
    """[world, block, row bytes] uint8 with each destination's rows in its block (the rest zero)."""
    row_bytes = payload.shape[1] * payload.element_size()
    flat = payload.contiguous().view(torch.uint8).reshape(payload.shape[0], row_bytes)
    send = torch.zeros(len(rows), block, row_bytes, dtype=torch.uint8, device=payload.device)
    for destination, tokens in enumerate(rows):
        send[destination, : len(tokens)] = flat[tokens.to(payload.device)]
    return send


def _bench_dense(
    opts: Options, info: RankInfo, tokens: int, op: str, send: torch.Tensor, nccl_group: Optional[dist.ProcessGroup]
) -> list[Timing]:
    results: list[Timing] = []
    if nccl_group is not None:
        receive = torch.empty_like(send)
        stats = _time(opts, lambda: dist.all_to_all_single(receive, send, group=nccl_group))
        results.append(Timing("torch all_to_all_single", op, tokens, *stats))
    source = expertwire.nvshmem_malloc(send.shape, torch.uint8, info.device)
    dest = expertwire.nvshmem_malloc(send.shape, torch.uint8, info.device)
    source.copy_(send)
    stats = _time(opts, lambda: expertwire.nvshmem_alltoall(dest, source))
    results.append(Timing("NVSHMEM alltoall", op, tokens, *stats))
    torch.cuda.synchronize()
    return results  # source and dest are freed (collectively) on return, in the same order on every rank


def bench_baselines(
    opts: Options, info: RankInfo, tokens: int, work: RankWorkload, nccl_group: Optional[dist.ProcessGroup]
) -> list[Timing]:
    rows, block = _rows_per_destination(opts, info, work)
    dispatch_rows = torch.cat([work.x.view(torch.uint8), work.x_scale.view(torch.uint8)], dim=1)
    combine_rows = torch.randn(tokens, opts.hidden, device=info.device).to(torch.bfloat16)
    results: list[Timing] = []
    for op, payload in (("dispatch", dispatch_rows), ("combine", combine_rows)):
        results += _bench_dense(opts, info, tokens, op, _dense_send_buffer(rows, block, payload), nccl_group)
    return results


def markdown_table(opts: Options, info: RankInfo, device_name: str, timings: list[Timing]) -> str:
    methods = list(dict.fromkeys(t.method for t in timings))
    by_key = {(t.method, t.op, t.tokens): t for t in timings}
    header = ["tokens/rank"] + [f"{m} {op}" for op in ("dispatch", "combine") for m in methods]
    placement = "sharing one GPU under MPS" if info.shares_gpu else "one GPU each"
    lines = [
        f"{device_name}: {info.world_size} ranks ({info.world_local_size} per node, "
        f"{placement}), {opts.experts} experts, top-{opts.top_k}, hidden {opts.hidden}, "
        f"dp_size {opts.dp_size}: fp8 dispatch (+{(opts.hidden + SCALE_BLOCK - 1) // SCALE_BLOCK * 4} B scales), "
        "bf16 combine. µs of the slowest rank, mean (median).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---:|" * len(header),
    ]
    for tokens in opts.tokens:
        cells = [str(tokens)]
        for op in ("dispatch", "combine"):
            for method in methods:
                t = by_key.get((method, op, tokens))
                cells.append("—" if t is None else f"{t.mean_us:.1f} ({t.median_us:.1f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(opts: Options, info: RankInfo, timings: list[Timing]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install 'expertwire[bench]')")
        return
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, op in zip(axes, ("dispatch", "combine"), strict=False):
        for method in dict.fromkeys(t.method for t in timings):
            points = sorted((t.tokens, t.mean_us) for t in timings if t.method == method and t.op == op)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(opts.tokens, [str(t) for t in opts.tokens])
        ax.set_yscale("log")
        ax.set_xlabel("tokens per rank")
        ax.set_title(f"{op} ({'fp8 + scales' if op == 'dispatch' else 'bf16'})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("latency, µs (slowest rank, mean)")
    axes[0].legend()
    figure.suptitle(f"{info.world_size} ranks, {opts.experts} experts, top-{opts.top_k}, hidden {opts.hidden}")
    figure.tight_layout()
    figure.savefig(opts.plot, dpi=120)
    print(f"plot written to {opts.plot}")


def _worker(info: RankInfo, opts: Options) -> None:
    nvshmem_join(info)
    nccl_group: Optional[dist.ProcessGroup] = None
    if info.shares_gpu:
        if info.rank == 0:
            print(
                f"torch.distributed all_to_all_single skipped: {info.world_local_size} ranks share one GPU and "
                "NCCL refuses two ranks on one device ('invalid usage'); give each rank its own GPU to include it"
            )
    else:
        nccl_group = dist.new_group(backend="nccl")
    transports = ["internode", "intranode"]
    no_peer_memory = expertwire.peer_memory_unavailable_reason()
    if no_peer_memory is None and info.world_local_size < info.world_size:
        no_peer_memory = (
            f"the ranks span {info.world_size // info.world_local_size} nodes, and the intranode transport needs "
            "every rank's memory"
        )
    if no_peer_memory is not None:
        transports.remove("intranode")
        if info.rank == 0:
            print(f"intranode skipped: {no_peer_memory}")
    timings: list[Timing] = []
    for tokens in opts.tokens:
        work = RankWorkload(opts, tokens, info)
        for transport in transports:
            timings += bench_expertwire(opts, info, tokens, transport, work)
        timings += bench_baselines(opts, info, tokens, work, nccl_group)
        if info.rank == 0:
            print(f"tokens/rank {tokens}: done", flush=True)
    if info.rank == 0:
        print()
        print(markdown_table(opts, info, torch.cuda.get_device_name(info.device), timings))
        print()
        plot(opts, info, timings)
    dist.barrier()
    expertwire.nvshmem_finalize()


def parse_options(argv: list[str]) -> tuple[Options, int]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1,4,8,16,32,64,128", help="tokens per rank, comma-separated")
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--dp-size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--plot", default="bench_all_to_all.png", help="PNG of latency against tokens per rank")
    parser.add_argument(
        "--ranks",
        type=int,
        default=0,
        help="ranks to start on this machine when not launched by env or torchrun (default: GPUs)",
    )
    args = parser.parse_args(argv)
    opts = Options(
        tokens=[int(t) for t in args.tokens.split(",") if t.strip()],
        experts=args.experts,
        top_k=args.top_k,
        hidden=args.hidden,
        dp_size=args.dp_size,
        warmup=args.warmup,
        iters=args.iters,
        plot=args.plot,
    )
    return opts, args.ranks or visible_gpus()


def run_benchmark(name: str, worker: Callable[[RankInfo, Options], None], argv: Optional[list[str]]) -> None:
    """Runs worker on every rank, launched as torchrun's, by the seed's multi-node variables, or here (--ranks)."""
    opts, ranks = parse_options(sys.argv[1:] if argv is None else argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        run_as_torchrun_rank(worker, opts)
    elif "MASTER_ADDR" in os.environ and "WORLD_LOCAL_SIZE" in os.environ:
        launch_from_env(worker, opts)
    else:
        if ranks == 0:
            sys.exit(f"{name}: no GPU visible")
        launch(ranks, worker, opts, timeout_s=3600)


def main(argv: Optional[list[str]] = None) -> None:
    run_benchmark("bench_all_to_all", _worker, argv)


if __name__ == "__main__":
    main()
