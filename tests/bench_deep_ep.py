r"""Benchmark: expertwire.deep_ep's low-latency calls against the native AllToAll they run on.

Launch as tests.bench_all_to_all (the seed's multi-node variables, torchrun, or --ranks N on one machine):
    python3 -m tests.bench_deep_ep --ranks 8 --tokens 1,32,128

For each token count, on every rank (hidden 7168, top-8, 256 experts by default), mean (median) µs of the
slowest rank, with an NVSHMEM barrier on the stream before each timed operation:
- "native fp8": AllToAll.dispatch of tokens already in fp8 with their scales, and its combine;
- "native, quantize first": deep_ep.cast_fp8_blocks of the bf16 tokens, then that dispatch, timed as one;
- "native, fused cast": AllToAll.dispatch of the bf16 tokens with fp8_cast="block-scales" (the send kernel casts),
  with uint32 indices; "int64 indices": the same with DeepEP's int64 topk_idx as it is; "fresh outputs": also
  with outputs allocated by each call, as DeepEP's API returns new tensors;
- "deep_ep fp8": Buffer.low_latency_dispatch of bf16 tokens with use_fp8=True (the same fused cast behind
  DeepEP's API), and low_latency_combine;
- "deep_ep bf16": the same with use_fp8=False;
- "fp8 cast": deep_ep.cast_fp8_blocks alone.
The host columns are the Python time to issue one dispatch call and one combine call (each on an idle stream),
each rank's median, the largest over ranks: the front end's own overhead is "deep_ep fp8" against "native, fused
cast, int64, fresh outputs", which does the same work through the native API.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Optional

import torch
import torch.distributed as dist

import expertwire
from expertwire import deep_ep

from .bench_all_to_all import Options, _time, _time_dispatch_combine, run_benchmark
from .distributed import RankInfo


def _inputs(opts: Options, tokens: int, info: RankInfo) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(4321 + info.rank)
    x = torch.randn(tokens, opts.hidden, generator=gen).to(torch.bfloat16)
    idx = torch.rand(tokens, opts.experts, generator=gen).argsort(dim=1)[:, : opts.top_k]
    weights = torch.rand(tokens, opts.top_k, generator=gen)
    return x.to(info.device), idx.to(info.device), weights.to(info.device)


def _host_us(opts: Options, dispatch: Callable[[], None], combine: Callable[[], None]) -> tuple[float, float]:
    """Host time of a dispatch call and of a combine call, each issued on an idle stream after a barrier: each
    rank's median, the largest over ranks (a property of each process's Python path, which the slowest rank of
    each iteration would mix with scheduling noise of the others)."""
    samples: tuple[list[float], list[float]] = ([], [])
    for _ in range(opts.warmup + opts.iters):
        for issue, times in zip((dispatch, combine), samples, strict=True):
            expertwire.nvshmem_barrier_all_on_current_stream()
            torch.cuda.current_stream().synchronize()
            start = time.perf_counter()
            issue()
            times.append((time.perf_counter() - start) * 1e6)
    torch.cuda.current_stream().synchronize()
    medians = [statistics.median(times[opts.warmup :]) for times in samples]
    gathered: list[Optional[list[float]]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, medians)
    return max(g[0] for g in gathered if g), max(g[1] for g in gathered if g)


def bench_native(opts: Options, info: RankInfo, tokens: int, x, idx, weights) -> list[tuple]:
    """The native AllToAll's rows: tokens already cast, cast first by a separate pass, cast by the send kernel
    (uint32 indices, then DeepEP's int64 topk_idx as it is, then also with outputs made by each call, as the
    DeepEP API must)."""
    scale_words = opts.hidden // 128
    a2a = expertwire.AllToAll.internode(
        tokens, opts.experts, opts.top_k, info.rank, info.world_size, 1, opts.hidden, opts.hidden, 4 * scale_words
    )
    local, rows, device = opts.experts // info.world_size, tokens * info.world_size, info.device
    x_fp8, x_scale = deep_ep.cast_fp8_blocks(x, False, False)
    indices = idx.to(torch.int32).view(torch.uint32)
    count = torch.empty(local, dtype=torch.int32, device=device)
    recv_x = torch.empty(local, rows, opts.hidden, dtype=torch.float8_e4m3fn, device=device)
    recv_scale = torch.empty(local, scale_words, rows, device=device).transpose(1, 2)
    expert_y = torch.randn(local, rows, opts.hidden, device=device).to(torch.bfloat16)
    out = torch.empty(tokens, opts.hidden, dtype=torch.bfloat16, device=device)

    def cast_ready() -> None:
        a2a.dispatch(count, recv_x, recv_scale, x_fp8, x_scale, indices, None)

    def quantize_first() -> None:
        values, scales = deep_ep.cast_fp8_blocks(x, False, False)
        a2a.dispatch(count, recv_x, recv_scale, values, scales, indices, None)

    def fused_cast() -> None:
        a2a.dispatch(count, recv_x, recv_scale, x, None, indices, None, fp8_cast="block-scales")

    def fused_cast_int64() -> None:
        a2a.dispatch(count, recv_x, recv_scale, x, None, idx, None, fp8_cast="block-scales")

    def fused_cast_fresh_outputs() -> None:
        fresh_count = torch.empty(local, dtype=torch.int32, device=device)
        fresh_x = torch.empty(local, rows, opts.hidden, dtype=torch.float8_e4m3fn, device=device)
        fresh_scale = torch.empty(local, scale_words, rows, device=device).transpose(1, 2)
        a2a.dispatch(fresh_count, fresh_x, fresh_scale, x, None, idx, None, fp8_cast="block-scales")

    def combine() -> None:
        a2a.combine(out, indices, weights, expert_y, None)

    def combine_int64() -> None:
        a2a.combine(out, idx, weights, expert_y, None)

    def combine_fresh_output() -> None:
        a2a.combine(torch.empty(tokens, opts.hidden, dtype=torch.bfloat16, device=device), idx, weights, expert_y, None)

    results = []
    for name, dispatch, its_combine in (
        ("native fp8", cast_ready, combine),
        ("native, quantize first", quantize_first, combine),
        ("native, fused cast", fused_cast, combine),
        ("native, fused cast, int64 indices", fused_cast_int64, combine_int64),
        ("native, fused cast, int64, fresh outputs", fused_cast_fresh_outputs, combine_fresh_output),
    ):
        results.append(
            (name, _time_dispatch_combine(opts, dispatch, its_combine), _host_us(opts, dispatch, its_combine))
        )
    a2a.check_errors()
    dist.barrier()
    a2a.destroy()
    return results


def bench_deep_ep(opts: Options, info: RankInfo, buffer: deep_ep.Buffer, tokens: int, x, idx, weights, fp8: bool):
    local, rows = opts.experts // info.world_size, tokens * info.world_size
    expert_y = torch.randn(local, rows, opts.hidden, device=info.device).to(torch.bfloat16)
    handle: Optional[tuple] = None

    def dispatch() -> None:
        nonlocal handle
        handle = buffer.low_latency_dispatch(x, idx, tokens, opts.experts, use_fp8=fp8)[2]

    def combine() -> None:
        buffer.low_latency_combine(expert_y, idx, weights, handle)

    times = _time_dispatch_combine(opts, dispatch, combine)
    host = _host_us(opts, dispatch, combine)
    return times, host


def _worker(info: RankInfo, opts: Options) -> None:
    max_tokens = max(opts.tokens)
    hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(max_tokens, opts.hidden, info.world_size, opts.experts)
    # Room for the largest configuration in fp8 and in bf16; smaller ones free the buffers of those before them.
    buffer = deep_ep.Buffer(dist.group.WORLD, num_rdma_bytes=2 * hint, low_latency_mode=True, explicitly_destroy=True)
    lines = [
        f"{info.world_size} ranks, {torch.cuda.get_device_name(info.device)}, hidden {opts.hidden}, top-{opts.top_k}, "
        f"{opts.experts} experts; µs mean (median), slowest rank",
        "",
        "| tokens | method | dispatch | combine | host per dispatch call | host per combine call |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for tokens in opts.tokens:
        x, idx, weights = _inputs(opts, tokens, info)
        rows = bench_native(opts, info, tokens, x, idx, weights)
        for fp8 in (True, False):
            name = "deep_ep fp8" if fp8 else "deep_ep bf16"
            rows.append((name, *bench_deep_ep(opts, info, buffer, tokens, x, idx, weights, fp8)))
        cast = _time(opts, lambda x=x: deep_ep.cast_fp8_blocks(x, False, False))
        for name, ((d_mean, d_median), (c_mean, c_median)), (d_host, c_host) in rows:
            lines.append(
                f"| {tokens} | {name} | {d_mean:.1f} ({d_median:.1f}) | {c_mean:.1f} ({c_median:.1f}) | {d_host:.1f} "
                f"| {c_host:.1f} |"
            )
        lines.append(f"| {tokens} | fp8 cast | {cast[0]:.1f} ({cast[1]:.1f}) | | | |")
    if info.rank == 0:
        print("\n".join(lines), flush=True)
    dist.barrier()
    buffer.destroy()
    expertwire.nvshmem_finalize()


def main(argv: Optional[list[str]] = None) -> None:
    run_benchmark("bench_deep_ep", _worker, argv)


if __name__ == "__main__":
    main()
