"""HighThroughputAllToAll: the prefill and training all-to-all, whose layouts are sized by the real token counts.

    a2a = HighThroughputAllToAll.intranode(max_num_tokens=4096, num_experts=256, experts_per_token=8, rank=r,
                                           world_size=8, hidden_dim=7168, hidden_dim_bytes=7168,
                                           hidden_dim_scale_bytes=224)
    out = a2a.dispatch(x, topk_idx, topk_weights, x_scale=scales)          # rank-packed, counts on the host
    y = experts(out.recv_x, out.recv_topk_idx, out.recv_topk_weights)     # one row per received token
    combined = a2a.combine(y, out.handle)                                   # [m, hidden_dim]

`layout="expert-contiguous"` groups the received rows by local expert instead (segments aligned to
expert_alignment rows, padding rows with expert -1), ready for a grouped GEMM; combine then takes one output row
per expert row and sums each token's rows with their weights on the expert's rank. `num_worst_tokens` sizes the
outputs for that many rows without a host synchronization (the form a CUDA graph can capture); without it the
outputs have the exact size, read after one synchronization.

Calls alternate on every rank in the same order: dispatch, combine, dispatch, ... A handle stays usable for a
combine after later dispatches (a backward pass combines with the forward's handle) while calls keep alternating.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ._active_ranks import active_ranks_view, set_active_ranks
from ._device_memory import rows_over
from ._native import ext
from .all_to_all import _all_gather_over, _intranode_group
from .checks import SCALAR_TYPES, flag, integer
from .ops import current_stream_handle

LAYOUTS = ("rank-packed", "expert-contiguous")
# The native configuration's fields, in the factories' argument names.
CONFIG_FIELDS = (
    "max_num_tokens",
    "num_experts",
    "experts_per_token",
    "rank",
    "world_size",
    "hidden_dim",
    "hidden_dim_bytes",
    "hidden_dim_scale_bytes",
    "combine_element_bytes",
    "expert_alignment",
    "recv_capacity",
)


@dataclass
class HighThroughputDispatch:
    """What a dispatch returns on this rank. Rank-packed: recv_x [rows, ...] one row per received token with
    recv_topk_idx [rows, k] int64 (local expert index, -1 where the slot's expert is not on this rank) and
    recv_topk_weights [rows, k] float32. Expert-contiguous: recv_x [rows, ...] grouped by local expert with
    row_expert [rows] int32 (-1 on padding rows) and row_weight [rows] float32. Both: tokens_per_expert
    [num_local_experts] and expert_offsets [num_local_experts + 1] int32 on the device, num_recv_rows [1] int32 on
    the device (rows of recv_x that hold data, padding included), and num_recv_tokens_per_expert_list (host ints)
    unless num_worst_tokens sized the outputs. Rows past num_recv_rows are untouched."""

    recv_x: torch.Tensor
    recv_x_scale: Optional[torch.Tensor]
    recv_topk_idx: Optional[torch.Tensor]
    recv_topk_weights: Optional[torch.Tensor]
    row_expert: Optional[torch.Tensor]
    row_weight: Optional[torch.Tensor]
    tokens_per_expert: torch.Tensor
    expert_offsets: torch.Tensor
    num_recv_rows: torch.Tensor
    num_recv_tokens_per_expert_list: Optional[list[int]]
    handle: "ext.HighThroughputHandle"


def _check_tensor(op: str, name: str, tensor, dtypes, ndim: int, device: torch.device) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if dtypes is not None and tensor.dtype not in dtypes:
        names = ", ".join(str(d) for d in dtypes)
        raise ValueError(f"{op}: {name} must have dtype {names}, got {tensor.dtype}")
    if tensor.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{op}: {name} must be on {device}, got {tensor.device}")


def _address(tensor: Optional[torch.Tensor]) -> int:
    """A tensor's device address for the native calls; 0 for none."""
    return 0 if tensor is None else tensor.data_ptr()


class HighThroughputAllToAll:
    """One high-throughput all-to-all. Create it with HighThroughputAllToAll.intranode (peer memory, one node) or
    .internode (NVSHMEM, nvshmem_init first) on every rank together; destroy() it on every rank together."""

    def __init__(self, native: "ext.HighThroughputObject", fields: dict) -> None:
        self._native: Optional[ext.HighThroughputObject] = native
        self._device = torch.device("cuda", native.device)
        self._fields = fields

    @staticmethod
    def _fields(op: str, arguments: dict) -> dict:
        """The configuration fields among a factory's arguments, each checked as a non-negative int (the native
        configuration checks the rest and raises ValueError naming the first bad one)."""
        fields = {name: arguments[name] for name in CONFIG_FIELDS}
        for name, value in fields.items():
            integer(op, name, value, minimum=0)
        integer(op, "max_sm_count", arguments["max_sm_count"], minimum=0, maximum=2**32 - 1)
        return fields

    @classmethod
    def intranode(
        cls,
        max_num_tokens: int,
        num_experts: int,
        experts_per_token: int,
        rank: int,
        world_size: int,
        hidden_dim: int,
        hidden_dim_bytes: int,
        hidden_dim_scale_bytes: int = 0,
        expert_alignment: int = 1,
        recv_capacity: int = 0,
        combine_element_bytes: int = 2,
        group_name: str = "default",
        max_sm_count: int = 0,
        *,
        fault_tolerant: bool = False,
    ) -> "HighThroughputAllToAll":
        """Through peer memory among the ranks of one node (the torch.distributed group `group_name` exchanges the
        buffer descriptions). combine_element_bytes 4 allows float32 combines (training in float32).
        `fault_tolerant`: see active_ranks."""
        fields = cls._fields("HighThroughputAllToAll.intranode", locals())
        flag("HighThroughputAllToAll.intranode", "fault_tolerant", fault_tolerant)
        group = _intranode_group(group_name, world_size, rank)
        native = ext.HighThroughputObject.intranode(
            **fields, all_gather=_all_gather_over(group), max_sm_count=max_sm_count, fault_tolerant=fault_tolerant
        )
        return cls(native, fields)

    @classmethod
    def internode(
        cls,
        max_num_tokens: int,
        num_experts: int,
        experts_per_token: int,
        rank: int,
        world_size: int,
        hidden_dim: int,
        hidden_dim_bytes: int,
        hidden_dim_scale_bytes: int = 0,
        expert_alignment: int = 1,
        recv_capacity: int = 0,
        combine_element_bytes: int = 2,
        max_sm_count: int = 0,
        force_puts: bool = False,
        *,
        fault_tolerant: bool = False,
    ) -> "HighThroughputAllToAll":
        """Through NVSHMEM: loads and stores to peers it can map, puts to the others (every peer with
        force_puts). `fault_tolerant`: see active_ranks."""
        fields = cls._fields("HighThroughputAllToAll.internode", locals())
        flag("HighThroughputAllToAll.internode", "fault_tolerant", fault_tolerant)
        native = ext.HighThroughputObject.internode(
            **fields, max_sm_count=max_sm_count, force_puts=bool(force_puts), fault_tolerant=fault_tolerant
        )
        return cls(native, fields)

    def _live(self, op: str) -> "ext.HighThroughputObject":
        if self._native is None:
            raise RuntimeError(f"HighThroughputAllToAll.{op}: this object was destroyed; create a new one")
        return self._native

    @property
    def num_local_experts(self) -> int:
        return self._fields["num_experts"] // self._fields["world_size"]

    def combine_input_buffer(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """[worst_case_rows("rank-packed"), hidden_dim] of `dtype` (element size combine_element_bytes) in this
        rank's communication buffer: rank-packed expert outputs written here (after the dispatch, on its stream)
        and passed to combine, the whole tensor or its first rows, are not copied by combine where every peer is
        load/store reachable. Valid until destroy()."""
        native = self._live("combine_input_buffer")
        size = self._fields["combine_element_bytes"]
        if dtype not in SCALAR_TYPES or dtype.itemsize != size:
            raise ValueError(
                f"combine_input_buffer: dtype must be a combine row type of {size} bytes (combine_element_bytes), "
                f"got {dtype}"
            )
        row_bytes = self._fields["hidden_dim"] * size
        return rows_over(
            native.combine_input_buffer, native.recv_rows, row_bytes, row_bytes, dtype, self._device, native
        )

    def dispatch_input_buffer(self, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
        """[max_num_tokens, hidden_dim_bytes / itemsize] of `dtype`, rows further apart than their bytes, where the
        dispatch stages this rank's tokens for peers: tokens written here (their scales into
        dispatch_input_scale_buffer()) after the previous combine, on its stream, and passed to dispatch, the whole
        tensor or its first m rows, spare the dispatch a copy of each. Valid until destroy()."""
        native = self._live("dispatch_input_buffer")
        row_bytes, itemsize = self._fields["hidden_dim_bytes"], dtype.itemsize
        if row_bytes % itemsize != 0:
            raise ValueError(
                f"dispatch_input_buffer: dtype must have an element size that divides hidden_dim_bytes={row_bytes}, "
                f"got {dtype} ({itemsize} bytes)"
            )
        rows, stride = self._fields["max_num_tokens"], native.dispatch_input_row_stride
        return rows_over(native.dispatch_input_buffer, rows, row_bytes, stride, dtype, self._device, native)

    def dispatch_input_scale_buffer(self) -> Optional[torch.Tensor]:
        """[max_num_tokens, hidden_dim_scale_bytes / 4] float32 beside dispatch_input_buffer()'s rows (None without
        scales)."""
        native = self._live("dispatch_input_scale_buffer")
        scale_bytes = self._fields["hidden_dim_scale_bytes"]
        if scale_bytes == 0:
            return None
        rows, stride = self._fields["max_num_tokens"], native.dispatch_input_row_stride
        return rows_over(
            native.dispatch_input_scale_buffer, rows, scale_bytes, stride, torch.float32, self._device, native
        )

    def worst_case_rows(self, layout: str = "rank-packed") -> int:
        """The num_worst_tokens that holds any routing in `layout`: recv_capacity (or max_num_tokens * world_size)
        rank-packed rows, or as many tokens on min(k, local experts) experts each plus every segment's padding."""
        if layout not in LAYOUTS:
            raise ValueError(f"worst_case_rows: layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        native = self._live("worst_case_rows")
        return native.max_expert_rows if layout == "expert-contiguous" else native.recv_rows

    def dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        x_scale: Optional[torch.Tensor] = None,
        layout: str = "rank-packed",
        num_worst_tokens: int = 0,
    ) -> HighThroughputDispatch:
        """Sends each token of x [m, ...] (any dtype; rows move as bytes, at most hidden_dim_bytes, a multiple of
        16) once to every rank that holds one of its experts. topk_idx [m, k] int32 or int64 (-1: no expert),
        topk_weights [m, k] float32, x_scale [m, hidden_dim_scale_bytes / 4] float32 at any strides (with scales).
        num_worst_tokens > 0: outputs of that many rows, no host synchronization."""
        op = "HighThroughputAllToAll.dispatch"
        native = self._live("dispatch")
        if layout not in LAYOUTS:
            raise ValueError(f"{op}: layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        integer(op, "num_worst_tokens", num_worst_tokens, minimum=0)
        _check_tensor(op, "x", x, None, 2, self._device)
        _check_tensor(op, "topk_idx", topk_idx, (torch.int32, torch.int64), 2, self._device)
        _check_tensor(op, "topk_weights", topk_weights, (torch.float32,), 2, self._device)
        m, k = x.shape[0], self._fields["experts_per_token"]
        if x.stride(1) != 1:
            raise ValueError(f"{op}: x's rows must be contiguous (stride(1) == 1), got strides {x.stride()}")
        for name, tensor in (("topk_idx", topk_idx), ("topk_weights", topk_weights)):
            if tuple(tensor.shape) != (m, k) or not tensor.is_contiguous():
                raise ValueError(f"{op}: {name} must be a contiguous [{m}, {k}] tensor, got {tuple(tensor.shape)}")
        row_bytes = x.shape[1] * x.element_size()
        has_scales = self._fields["hidden_dim_scale_bytes"] > 0
        if has_scales != (x_scale is not None):
            raise ValueError(
                f"{op}: x_scale must be given exactly when hidden_dim_scale_bytes > 0 "
                f"(it is {self._fields['hidden_dim_scale_bytes']})"
            )
        scale_ptr, scale_strides = 0, (0, 4)
        if x_scale is not None:
            _check_tensor(op, "x_scale", x_scale, (torch.float32,), 2, self._device)
            words = self._fields["hidden_dim_scale_bytes"] // 4
            if tuple(x_scale.shape) != (m, words):
                raise ValueError(f"{op}: x_scale must have shape [{m}, {words}], got {tuple(x_scale.shape)}")
            scale_ptr, scale_strides = x_scale.data_ptr(), (x_scale.stride(0) * 4, x_scale.stride(1) * 4)
        stream = current_stream_handle(self._device)
        expert_layout = layout == "expert-contiguous"
        inputs = dict(
            x=x.data_ptr(),
            x_bytes=row_bytes,
            x_row_stride=x.stride(0) * x.element_size(),
            x_scale=scale_ptr,
            x_scale_strides=scale_strides,
            topk_idx=topk_idx.data_ptr(),
            topk_idx_int64=topk_idx.dtype == torch.int64,
            topk_weights=topk_weights.data_ptr(),
            m=m,
        )
        handle = native.make_handle()
        native.dispatch_layout(handle=handle, expert_contiguous=expert_layout, stream=stream, **inputs)
        per_expert: Optional[list[int]] = None
        if num_worst_tokens > 0:
            rows = num_worst_tokens
        else:
            num_recv, num_expert_rows, per_expert = native.counts(handle, stream)
            rows = num_expert_rows if expert_layout else num_recv
        device, words = self._device, self._fields["hidden_dim_scale_bytes"] // 4
        recv_x = torch.empty((rows, x.shape[1]), dtype=x.dtype, device=device)
        recv_x_scale = torch.empty((rows, words), dtype=torch.float32, device=device) if has_scales else None
        recv_idx = recv_w = row_expert = row_weight = None
        if expert_layout:
            row_expert = torch.empty((rows,), dtype=torch.int32, device=device)
            row_weight = torch.empty((rows,), dtype=torch.float32, device=device)
        else:
            recv_idx = torch.empty((rows, k), dtype=torch.int64, device=device)
            recv_w = torch.empty((rows, k), dtype=torch.float32, device=device)
        tokens_per_expert = torch.empty((self.num_local_experts,), dtype=torch.int32, device=device)
        expert_offsets = torch.empty((self.num_local_experts + 1,), dtype=torch.int32, device=device)
        num_recv_rows = torch.empty((1,), dtype=torch.int32, device=device)

        native.dispatch_data(
            handle=handle,
            capacity_rows=rows,
            recv_x=_address(recv_x),
            recv_x_scale=_address(recv_x_scale),
            recv_x_scale_strides=(words * 4, 4),
            recv_topk_idx=_address(recv_idx),
            recv_topk_weights=_address(recv_w),
            row_expert=_address(row_expert),
            row_weight=_address(row_weight),
            tokens_per_expert=_address(tokens_per_expert),
            expert_offsets=_address(expert_offsets),
            num_recv_rows=_address(num_recv_rows),
            stream=stream,
            **inputs,
        )
        return HighThroughputDispatch(
            recv_x,
            recv_x_scale,
            recv_idx,
            recv_w,
            row_expert,
            row_weight,
            tokens_per_expert,
            expert_offsets,
            num_recv_rows,
            per_expert,
            handle,
        )

    def combine(
        self,
        expert_out: torch.Tensor,
        handle: "ext.HighThroughputHandle",
        row_weight: Optional[torch.Tensor] = None,
        topk_weights: Optional[torch.Tensor] = None,
    ):
        """[m, hidden_dim] of expert_out's dtype (bfloat16, float16, or float32 with combine_element_bytes 4): each
        token's rows from every rank it went to, summed in fp32 (expert-contiguous rows first weighted and summed on
        their expert's rank). expert_out holds one row per row of the handle's dispatch, in its layout.

        row_weight [rows] float32 (expert-contiguous only): the rows' weights instead of the dispatch's row_weight.
        topk_weights: one float32 per slot to carry back, [rows, k] as recv_topk_weights (rank-packed) or [rows] as
        row_weight (expert-contiguous); then the call returns (out, combined_topk_weights [m, k]) where slot j's
        value is the one the rank holding slot j's expert gave it (0 for -1 slots). Collective: every rank passes
        topk_weights, or none does."""
        op = "HighThroughputAllToAll.combine"
        native = self._live("combine")
        if not isinstance(handle, ext.HighThroughputHandle):
            raise ValueError(f"{op}: handle must be the handle of a dispatch of this object")
        _check_tensor(op, "expert_out", expert_out, tuple(SCALAR_TYPES), 2, self._device)
        hidden, k = self._fields["hidden_dim"], self._fields["experts_per_token"]
        if expert_out.shape[1] != hidden or not expert_out.is_contiguous():
            raise ValueError(
                f"{op}: expert_out must be a contiguous [rows, {hidden}] tensor, got {tuple(expert_out.shape)}"
            )
        rows = expert_out.shape[0]
        if row_weight is not None:
            if not handle.expert_contiguous:
                raise ValueError(f"{op}: row_weight is for an expert-contiguous dispatch; rank-packed rows are summed")
            _check_tensor(op, "row_weight", row_weight, (torch.float32,), 1, self._device)
            if row_weight.shape[0] != rows or not row_weight.is_contiguous():
                raise ValueError(
                    f"{op}: row_weight must be a contiguous [{rows}] tensor, got {tuple(row_weight.shape)}"
                )
        combined_w = None
        if topk_weights is not None:
            shape = (rows,) if handle.expert_contiguous else (rows, k)
            _check_tensor(op, "topk_weights", topk_weights, (torch.float32,), len(shape), self._device)
            if tuple(topk_weights.shape) != shape or not topk_weights.is_contiguous():
                raise ValueError(
                    f"{op}: topk_weights must be a contiguous {list(shape)} tensor for this handle's layout, "
                    f"got {tuple(topk_weights.shape)}"
                )
            combined_w = torch.empty((handle.m, k), dtype=torch.float32, device=self._device)
        out = torch.empty((handle.m, hidden), dtype=expert_out.dtype, device=self._device)
        stream = current_stream_handle(self._device)

        native.combine(
            handle,
            expert_out.data_ptr(),
            SCALAR_TYPES[expert_out.dtype],
            out.data_ptr(),
            stream,
            row_weight=_address(row_weight),
            with_topk_weights=combined_w is not None,
            topk_weights=_address(topk_weights),
            out_topk_weights=_address(combined_w),
        )
        return out if combined_w is None else (out, combined_w)

    @property
    def fault_tolerant(self) -> bool:
        return bool(self._live("fault_tolerant").fault_tolerant)

    @property
    def active_ranks(self) -> torch.Tensor:
        """The fault-tolerant mode's mask, as AllToAll.active_ranks: an int32 [world_size] tensor on this rank's
        GPU, 1 for each rank this one still serves with, 0 for each it has masked out. A wait that runs out on a
        rank masks it instead of raising; the ranks agree on the mask before each combine's sums. A masked
        rank's tokens are not received, its rows add nothing to the sums (its experts' terms are zero; re-route
        its tokens or accept the loss), and nothing is sent to or read from it. Read it after the combine.
        Raises ValueError in the default mode."""
        native = self._live("active_ranks")
        return active_ranks_view(
            "HighThroughputAllToAll.active_ranks",
            native.fault_tolerant,
            native.active_ranks,
            self._fields["world_size"],
            self._device,
            native,
        )

    def set_active_ranks(self, mask: torch.Tensor) -> None:
        """As AllToAll.set_active_ranks: masks out, from the next call on, every rank whose entry of `mask` is 0
        (the same mask on every surviving rank; no rank masks itself, no masked rank comes back)."""
        set_active_ranks(self.active_ranks, int(self._live("set_active_ranks").rank), mask)

    def check_errors(self) -> None:
        """Raises expertwire.DeviceError if a kernel of this object recorded an error (sticky)."""
        self._live("check_errors").check_errors()

    def destroy(self) -> None:
        """Frees the buffers. Collective: every rank destroys its object together. Idempotent."""
        if self._native is not None:
            self._native.destroy()
            self._native = None
