"""The fault-tolerant mode's mask, shared by both all-to-all kinds: the active_ranks view and set_active_ranks."""

from __future__ import annotations

import torch

from ._device_memory import tensor_over


def active_ranks_view(
    op: str, fault_tolerant: bool, address: int, world_size: int, device: torch.device, owner: object
) -> torch.Tensor:
    """The int32 [world_size] mask on the device at `address` (raises ValueError in the default mode)."""
    if not fault_tolerant:
        raise ValueError(f"{op}: the object was made without fault_tolerant=True")
    return tensor_over(address, (world_size,), torch.int32, device, owner=owner)


def set_active_ranks(current: torch.Tensor, rank: int, mask: object) -> None:
    """Checks `mask` against the mask `current` (this rank's, `rank`) and masks out, on the current stream, every
    rank whose entry is 0: no rank masks itself, no masked rank comes back (ValueError). Synchronizes with the mask's
    GPU to read the mask the kernels left."""
    world = current.numel()
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (world,):
        shown = f"shape {list(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"set_active_ranks: mask must be a tensor of shape [{world}], got {shown}")
    if mask.dtype not in (torch.int32, torch.int64, torch.bool):
        raise ValueError(f"set_active_ranks: mask must be int32, int64 or bool, got {mask.dtype}")
    wanted = mask.to(device="cpu", dtype=torch.int64)
    if not bool(((wanted == 0) | (wanted == 1)).all()):
        raise ValueError(f"set_active_ranks: mask entries must be 0 or 1, got {wanted.tolist()}")
    if int(wanted[rank]) == 0:
        raise ValueError(f"set_active_ranks: rank {rank} cannot mask itself out")
    if current.is_cuda:
        torch.cuda.synchronize(current.device)  # every stream's kernels: the mask they leave
    now = current.cpu().to(torch.int64)
    back = ((now == 0) & (wanted == 1)).nonzero().flatten().tolist()
    if back:
        raise ValueError(f"set_active_ranks: ranks {back} are masked out already and cannot come back")
    masked = (wanted == 0).nonzero().flatten()
    if masked.numel():
        current.index_fill_(0, masked.to(current.device), 0)
