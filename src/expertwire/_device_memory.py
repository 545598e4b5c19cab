"""Torch tensors over device memory that expertwire owns (NVSHMEM allocations, regions of an all-to-all's buffer)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class _CudaArray:
    """Presents `nbytes` at `address` through __cuda_array_interface__; keeps `owner` alive as long as the tensor
    made from it lives."""

    def __init__(self, address: int, nbytes: int, owner: object) -> None:
        self.owner = owner
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
        }


def tensor_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of a contiguous tensor of `shape` and `dtype`."""
    elements = 1
    for extent in shape:
        elements *= int(extent)
    return elements * torch.empty((), dtype=dtype).element_size()


def tensor_over(
    address: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device, owner: object
) -> torch.Tensor:
    """A contiguous tensor of `shape` and `dtype` over the memory at `address`, which must hold enough bytes."""
    nbytes = tensor_bytes(shape, dtype)
    raw = torch.as_tensor(_CudaArray(address, max(nbytes, 1), owner), device=device)
    return raw[:nbytes].view(dtype).view(tuple(int(extent) for extent in shape))


def rows_over(
    address: int, rows: int, row_bytes: int, row_stride: int, dtype: torch.dtype, device: torch.device, owner: object
) -> torch.Tensor:
    """A [rows, row_bytes / itemsize] tensor of `dtype` whose rows start `row_stride` bytes apart from `address`
    (contiguous within a row), over memory that must hold them."""
    nbytes = (rows - 1) * row_stride + row_bytes if rows > 0 else 0
    raw = torch.as_tensor(_CudaArray(address, max(nbytes, 1), owner), device=device)
    return raw.as_strided((rows, row_bytes), (row_stride, 1)).view(dtype)
