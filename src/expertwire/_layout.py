"""Byte strides of tensors, as the native library takes them (expertwire/strided.h): a tensor's element strides
times its element size. Metadata only, so they are computed for fake tensors too."""

from __future__ import annotations

from typing import Optional

import torch


def row_strides(tensor: torch.Tensor) -> tuple[int, int]:
    """(row, element) byte strides of a [rows, columns] payload tensor, whose bytes the kernels move as they are:
    the element stride is 1 (bytes packed in a row) when the row's elements are packed, else the bytes between
    two elements (which the native checks refuse)."""
    itemsize = tensor.element_size()
    packed = tensor.shape[1] <= 1 or tensor.stride(1) == 1
    return tensor.stride(0) * itemsize, 1 if packed else tensor.stride(1) * itemsize


def scale_strides(tensor: torch.Tensor) -> tuple[int, ...]:
    """Byte strides of a scale tensor's dimensions, its 4-byte words' last: a float32 tensor's own strides, and
    a uint8 tensor (whose last dimension is contiguous, checks.py) reads 4 bytes as a word. A dimension of size
    0 or 1 is never stepped along: 0."""
    itemsize = tensor.element_size()
    *outer, last = (
        stride * itemsize if size > 1 else 0 for stride, size in zip(tensor.stride(), tensor.shape, strict=False)
    )
    return (*outer, 4 if itemsize == 1 else last)


def dispatch_strides(
    out_expert_x_scale: Optional[torch.Tensor], dp_x_scale: Optional[torch.Tensor], dp_x: torch.Tensor
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, int]]:
    """The byte strides the native dispatch takes, in its order: out_expert_x_scale's, dp_x_scale's (any words 4
    bytes apart where there are no scales) and dp_x's rows."""
    return (
        scale_strides(out_expert_x_scale) if out_expert_x_scale is not None else (0, 0, 4),
        scale_strides(dp_x_scale) if dp_x_scale is not None else (0, 4),
        row_strides(dp_x),
    )
