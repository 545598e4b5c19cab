"""CPU-only: the benchmark's markdown table and plot, from made-up timings."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .bench_all_to_all import Options, Timing, markdown_table, parse_options, plot
from .distributed import RankInfo

INFO = RankInfo(rank=0, world_size=8, local_rank=0, world_local_size=8, device=torch.device("cpu"), shares_gpu=True)


def timings() -> list[Timing]:
    rows = []
    for tokens in (1, 128):
        for method in ("expertwire internode", "expertwire intranode", "NVSHMEM alltoall"):
            for op in ("dispatch", "combine"):
                rows.append(Timing(method, op, tokens, mean_us=10.0 * tokens, median_us=9.5 * tokens))
    return rows


def options(tmp_path: Path) -> Options:
    opts, _ = parse_options(["--tokens", "1,128", "--plot", str(tmp_path / "bench.png")])
    return opts


def test_table_has_a_row_per_token_count_and_a_column_per_method_and_op(tmp_path: Path) -> None:
    table = markdown_table(options(tmp_path), INFO, "NVIDIA H100", timings()).splitlines()
    assert table[0].startswith("NVIDIA H100: 8 ranks (8 per node, sharing one GPU under MPS), 256 experts, top-8")
    assert table[2] == (
        "| tokens/rank | expertwire internode dispatch | expertwire intranode dispatch | NVSHMEM alltoall dispatch "
        "| expertwire internode combine | expertwire intranode combine | NVSHMEM alltoall combine |"
    )
    assert table[4] == "| 1 | 10.0 (9.5) | 10.0 (9.5) | 10.0 (9.5) | 10.0 (9.5) | 10.0 (9.5) | 10.0 (9.5) |"
    assert table[5].startswith("| 128 | 1280.0 (1216.0) |")


def test_plot_writes_a_png_or_says_why_not(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    opts = options(tmp_path)
    plot(opts, INFO, timings())
    if importlib.util.find_spec("matplotlib") is None:
        assert "plot skipped: matplotlib is not installed" in capsys.readouterr().out
    else:
        assert Path(opts.plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("median", [False, True], ids=["mean", "median"])
@pytest.mark.parametrize("run", ["bench_h200_2gpu.json", "bench_ht_h100_8ranks.json"])
def test_plot_bench_script_plots_a_saved_run(tmp_path: Path, median: bool, run: str) -> None:
    """scripts/plot_bench.py on runs kept in docs/ (bench_all_to_all's and bench_high_throughput's), with means
    and error bars or with medians."""
    # No skip: the test set-up installs matplotlib (scripts/python-deps.txt), so a missing one is a failure.
    import matplotlib  # noqa: F401

    root = Path(__file__).resolve().parent.parent
    png = tmp_path / "plot.png"
    saved = root / "docs" / run
    command = [sys.executable, str(root / "scripts" / "plot_bench.py"), str(saved), str(png)]
    subprocess.run(command + (["--median"] if median else []), check=True, capture_output=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
