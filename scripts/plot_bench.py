#!/usr/bin/env python3
"""Plot bench_all_to_all --json or bench_high_throughput --json results: latency against tokens per rank, one line
per transport and expert count (high-throughput: per transport and layout), with the bandwidth floor (dashed)
that the benchmark measured beside each case, the latency floor (one cross-rank barrier, grey, when the file has
it) and the dispatch and combine that read their inputs from the all-to-all's own buffers (dotted, when the file
has them). --median plots medians without error bars, for runs where a few stalled iterations (host or VM) make
the standard deviation larger than the times.

    python3 scripts/plot_bench.py docs/bench_h100_8ranks.json docs/bench_h100_8ranks.png
    python3 scripts/plot_bench.py --median docs/bench_h200_2gpu.json docs/bench_h200_2gpu.png
    python3 scripts/plot_bench.py docs/bench_ht_h100_8ranks.json docs/bench_ht_h100_8ranks.png
"""

import argparse
import json
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file backend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="JSON written by bench_all_to_all --json")
    parser.add_argument("png", help="where to write the plot")
    parser.add_argument("--median", action="store_true", help="plot medians, without error bars")
    args = parser.parse_args()
    stat = "median_us" if args.median else "mean_us"
    with open(args.results) as f:
        cases = json.load(f)
    if cases and "layout" in cases[0]:
        plot_high_throughput(cases, args.png, args.median)
        return

    series = defaultdict(list)  # (transport, experts) -> cases in token order
    for case in cases:
        series[(case["transport"], case["experts"])].append(case)
    ranks = cases[0]["ranks"]

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, op in zip(axes, ("dispatch", "combine"), strict=False):
        for (transport, experts), runs in sorted(series.items()):
            runs.sort(key=lambda c: c["tokens"])
            tokens = [c["tokens"] for c in runs]
            line = axis.errorbar(
                tokens,
                [c[op][stat] for c in runs],
                yerr=None if args.median else [c[op]["std_us"] for c in runs],
                marker="o",
                capsize=3,
                label=f"{transport}, {experts} experts",
            )
            if all(f"{op}_floor" in c for c in runs):
                axis.plot(
                    tokens,
                    [c[f"{op}_floor"][stat] for c in runs],
                    linestyle="--",
                    color=line[0].get_color(),
                    alpha=0.6,
                )
            in_buffer = f"{op}_in_buffer"
            if all(in_buffer in c for c in runs):
                axis.plot(
                    tokens,
                    [c[in_buffer][stat] for c in runs],
                    linestyle=":",
                    marker=".",
                    color=line[0].get_color(),
                )
        by_tokens = defaultdict(list)  # one barrier, timed in every case: averaged over the cases of a token count
        for c in cases:
            if "barrier" in c:
                by_tokens[c["tokens"]].append(c["barrier"][stat])
        if by_tokens:
            axis.plot(
                sorted(by_tokens),
                [sum(v) / len(v) for _, v in sorted(by_tokens.items())],
                color="grey",
                linestyle="-.",
                label="one barrier (latency floor)",
            )
        axis.set_xscale("log", base=2)
        axis.set_xlabel("tokens per rank")
        axis.set_ylabel("µs, slowest rank (median)" if args.median else "µs, slowest rank (mean ± std)")
        in_buffer = f"{op}_in_buffer"
        extra = f"; dotted: {'expert_y' if op == 'combine' else 'dp_x'} in buffer" if in_buffer in cases[0] else ""
        axis.set_title(f"{op}, {ranks} ranks (dashed: floor{extra})", fontsize=10)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.png, dpi=110)
    print(f"plot written to {args.png}")


def plot_high_throughput(cases: list, png: str, median: bool) -> None:
    """bench_high_throughput: µs of the slowest rank per (transport, layout), with the same-run copy floor
    (dashed) and the staged / in-buffer variants (dotted) where the run measured them."""
    series = defaultdict(list)
    for case in cases:
        series[(case["transport"], case["layout"])].append(case)
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, op, variant in zip(axes, ("dispatch", "combine"), ("staged", "in_buffer"), strict=True):
        for (transport, layout), runs in sorted(series.items()):
            runs.sort(key=lambda c: c["tokens"])
            tokens = [c["tokens"] for c in runs]
            (line,) = axis.plot(
                tokens,
                [c[f"{op}_median_us" if median else f"{op}_us"] for c in runs],
                marker="o",
                label=f"{transport}, {layout}",
            )
            axis.plot(tokens, [c[f"{op}_floor_us"] for c in runs], linestyle="--", color=line.get_color(), alpha=0.6)
            # Expert-contiguous rows are the caller's own: no in-buffer combine (older files timed the caller's).
            applies = op == "dispatch" or layout == "rank-packed"
            if applies and all(c.get(f"{op}_{variant}_us", 0) > 0 for c in runs):
                axis.plot(
                    tokens,
                    [c[f"{op}_{variant}_us"] for c in runs],
                    linestyle=":",
                    marker=".",
                    color=line.get_color(),
                )
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("tokens per rank")
        axis.set_ylabel("µs, slowest rank (median)" if median else "µs, slowest rank (mean)")
        inputs = "x staged" if op == "dispatch" else "rows in buffer"
        axis.set_title(f"high-throughput {op}, {cases[0]['ranks']} ranks (dashed: floor; dotted: {inputs})", fontsize=9)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    print(f"plot written to {png}")


if __name__ == "__main__":
    main()
