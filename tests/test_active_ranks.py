"""set_active_ranks' checks and its effect, shared by both all-to-all kinds, on a mask in host memory (the objects'
masks live on the GPU; their tests are in test_fault_tolerant_gpu.py), and both kinds' fault_tolerant keyword."""

from __future__ import annotations

import inspect

import pytest
import torch

import expertwire
from expertwire._active_ranks import active_ranks_view, set_active_ranks


def test_masks_the_ranks_given_as_zero() -> None:
    current = torch.ones(4, dtype=torch.int32)
    set_active_ranks(current, 1, torch.tensor([1, 1, 0, 1]))
    assert current.tolist() == [1, 1, 0, 1]
    # Again with that rank still masked, and one more, as bool.
    set_active_ranks(current, 1, torch.tensor([True, True, False, False]))
    assert current.tolist() == [1, 1, 0, 0]
    assert current.dtype == torch.int32


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (torch.ones(5, dtype=torch.int32), r"shape \[4\], got shape \[5\]"),
        ([1, 1, 1, 1], r"shape \[4\], got list"),
        (torch.ones(4, dtype=torch.float32), "int32, int64 or bool, got torch.float32"),
        (torch.tensor([1, 2, 1, 1]), r"entries must be 0 or 1, got \[1, 2, 1, 1\]"),
        (torch.tensor([1, 0, 1, 1]), "rank 1 cannot mask itself out"),
        (torch.tensor([1, 1, 1, 1]), r"ranks \[3\] are masked out already and cannot come back"),
    ],
)
def test_refusals_leave_the_mask_as_it_was(mask: object, message: str) -> None:
    current = torch.tensor([1, 1, 1, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match=message):
        set_active_ranks(current, 1, mask)
    assert current.tolist() == [1, 1, 1, 0]


def test_view_refuses_the_default_mode() -> None:
    with pytest.raises(ValueError, match="HighThroughputAllToAll.active_ranks: the object was made without"):
        active_ranks_view("HighThroughputAllToAll.active_ranks", False, 0, 4, torch.device("cuda", 0), None)


@pytest.mark.parametrize(
    "factory",
    [
        expertwire.AllToAll.internode,
        expertwire.AllToAll.intranode,
        expertwire.HighThroughputAllToAll.internode,
        expertwire.HighThroughputAllToAll.intranode,
    ],
)
def test_every_factory_takes_fault_tolerant_by_keyword_only(factory) -> None:
    option = inspect.signature(factory).parameters["fault_tolerant"]
    assert option.kind == inspect.Parameter.KEYWORD_ONLY and option.default is False


@pytest.mark.parametrize("value", [1, "yes", None])
def test_high_throughput_fault_tolerant_must_be_a_bool(value: object) -> None:
    with pytest.raises(ValueError, match="HighThroughputAllToAll.internode: fault_tolerant must be a bool"):
        expertwire.HighThroughputAllToAll.internode(
            max_num_tokens=8,
            num_experts=8,
            experts_per_token=2,
            rank=0,
            world_size=2,
            hidden_dim=64,
            hidden_dim_bytes=128,
            fault_tolerant=value,
        )
