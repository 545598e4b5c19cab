"""DeepEP's ``deep_ep.Buffer`` API over expertwire's kernels: the low-latency half and the high-throughput one.

    from expertwire.deep_ep import Buffer, EventOverlap

    buffer = Buffer(group, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256),
                    low_latency_mode=True, num_qps_per_rank=32)
    recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(x, topk_idx, 128, 256)
    out, event, hook = buffer.low_latency_combine(expert_out, topk_idx, topk_weights, handle)

Names, arguments, defaults, return values and layouts are DeepEP's (its ``deep_ep/buffers/legacy.py``). Each
low-latency configuration (tokens per rank, hidden, experts, top-k, payload) gets two internode ``AllToAll``
objects; a dispatch takes one whose last dispatch has been combined, so at most two dispatches may await their
combines, and each dispatch is combined once (a named ValueError otherwise).

The high-throughput half (``get_dispatch_layout``, ``dispatch``, ``combine``: DeepEP's normal kernels) runs over
``HighThroughputAllToAll`` in its rank-packed layout: intranode (peer memory, sized by ``num_nvl_bytes``) where
every rank of the group is on this host, else internode (NVSHMEM, ``num_rdma_bytes``). Its buffers hold every
received row at once, so each configuration holds as many tokens per rank as its bytes allow
(``_deep_ep_high_throughput``); calls of one configuration alternate, dispatch then combine.

``enable_shrink=True`` (DeepEP's shrink mode) builds the low-latency objects in expertwire's fault-tolerant mode:
a rank that stops answering is masked instead of trapping the kernel, and the mask calls read and extend the
mask. A masked rank cannot be unmasked here (expertwire's masked ranks do not come back).

What this front end does not provide raises ``NotImplementedError`` naming it: ``use_logfmt``, the per-rank wait
statistics, unmasking a masked rank, an mpi4py ``comm`` instead of a process group, a high-throughput dispatch
without ``topk_idx``, and combine's ``bias``.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from . import nvshmem as _nvshmem
from ._deep_ep_high_throughput import (
    COMBINE_CHUNKS,
    DISPATCH_CHUNKS,
    Config,
    HighThroughputHalf,
    recommended_config,
)
from ._native import ext
from .all_to_all import AllToAll
from .checks import flag, integer

topk_idx_t = torch.int64

FP8_BLOCK = 128  # values per scale of the fp8 cast
UE8M0_PER_WORD = 4  # UE8M0 scale bytes packed in one int32
FP8_E4M3_MAX = 448.0
FP8_AMAX_FLOOR = 1e-4
# The size hint covers configurations of up to this many experts per token (DeepEP's hint takes no top-k; the
# combine's receive rows here grow with it).
SIZE_HINT_TOP_K = 16


class EventOverlap:
    """DeepEP's event wrapper: ``event`` is a ``torch.cuda.Event`` recorded after the call's kernels (None where
    the call ran on the current stream), ``extra_tensors`` keeps the call's tensors alive until it is dropped."""

    def __init__(self, event: Optional[torch.cuda.Event] = None, extra_tensors: Optional[tuple] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors
        self.hook_after_wait: Optional[Callable[[], None]] = None
        self._release_handle_by_call = False

    def __call__(self, release_handle: bool = False) -> "EventOverlap":
        """For ``with event(release_handle=True):``, which drops the event after the wait."""
        self._release_handle_by_call = release_handle
        return self

    def current_stream_wait(self, release_handle: bool = False) -> None:
        """The current stream waits for the event. ValueError where there is none (a call without
        async_finish)."""
        if self.event is None:
            raise ValueError("EventOverlap.current_stream_wait: no event (the call did not run with async_finish)")
        torch.cuda.current_stream().wait_event(self.event)
        if self.hook_after_wait is not None:
            hook, self.hook_after_wait = self.hook_after_wait, None
            hook()
        if release_handle:
            self.event = None

    def register_hook_after_wait(self, hook_after_wait: Callable[[], None]) -> None:
        if self.hook_after_wait is not None:
            raise ValueError("EventOverlap.register_hook_after_wait: a hook is already registered")
        self.hook_after_wait = hook_after_wait

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        release, self._release_handle_by_call = self._release_handle_by_call, False
        if self.event is not None:
            self.current_stream_wait(release_handle=release)


def _not_provided(what: str) -> NotImplementedError:
    return NotImplementedError(f"expertwire.deep_ep: {what} is not provided by this front end")


def cast_fp8_blocks(x: torch.Tensor, round_scale: bool, use_ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp8 cast of DeepEP's low-latency dispatch, with torch operations on x's device: every 128 values of
    a bf16 row scaled so the block's largest magnitude (at least 1e-4) maps to 448 (with `round_scale`, by a
    power of two: 2^-ceil(log2(amax / 448))), rounded to e4m3 (nearest even, saturated). Returns the
    float8_e4m3fn [m, hidden] values and their scales: float32 [m, hidden / 128] (the factor back to x), or with
    `use_ue8m0` their exponent bytes packed four to an int32 (block 4p + j in byte j of word p), [m, hidden /
    512]. A NaN stays a NaN and leaves its block's scale as the other values set it. expertwire.reference.
    cast_fp8_blocks is the same on the CPU, by independent code."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16 or x.dim() != 2:
        got = f"{x.dtype} of shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"cast_fp8_blocks: x must be a 2-D torch.bfloat16 tensor, got {got}")
    flag("cast_fp8_blocks", "round_scale", round_scale)
    flag("cast_fp8_blocks", "use_ue8m0", use_ue8m0)
    if use_ue8m0 and not round_scale:
        raise ValueError("cast_fp8_blocks: use_ue8m0=True needs round_scale=True (UE8M0 holds powers of two only)")
    m, hidden = x.shape
    block = FP8_BLOCK * (UE8M0_PER_WORD if use_ue8m0 else 1)
    if hidden % block != 0:
        raise ValueError(f"cast_fp8_blocks: x's hidden size must be a multiple of {block}, got {hidden}")
    blocks = x.reshape(m, hidden // FP8_BLOCK, FP8_BLOCK).float()
    magnitudes = blocks.abs()
    # fmax's rule, as the kernels': a NaN does not set the block's amax.
    amax = torch.where(magnitudes.isnan(), 0.0, magnitudes).amax(dim=-1).clamp_min(FP8_AMAX_FLOOR)
    if round_scale:
        bits = (amax * (1.0 / FP8_E4M3_MAX)).view(torch.int32)
        exponent = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)
        scale = ((127 - exponent) << 23).view(torch.float32)
        inverse = ((exponent + 127) << 23).view(torch.float32)
    else:
        scale = torch.full_like(amax, FP8_E4M3_MAX) / amax  # a tensor division: IEEE, as the kernels' reference
        inverse = amax * (1.0 / FP8_E4M3_MAX)
    values = (blocks * scale.unsqueeze(-1)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    values = values.reshape(m, hidden)
    if not use_ue8m0:
        return values, inverse
    exponent_bytes = ((inverse.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
    return values, exponent_bytes.view(torch.int32)


def _transposed_scales(local: int, rows: int, columns: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[local, rows, columns] with the last two dimensions column-major, as DeepEP returns its scales (TMA)."""
    return torch.empty((local, columns, rows), dtype=dtype, device=device).transpose(1, 2)


class _Payload:
    """What one configuration's tokens carry: bf16 rows, or fp8 rows with float32 or packed UE8M0 scales."""

    def __init__(self, hidden: int, use_fp8: bool, use_ue8m0: bool) -> None:
        self.use_fp8, self.use_ue8m0 = use_fp8, use_ue8m0
        self.row_bytes = hidden if use_fp8 else 2 * hidden
        if not use_fp8:
            self.scale_columns, self.scale_dtype = 0, None
        elif use_ue8m0:
            self.scale_columns, self.scale_dtype = hidden // (FP8_BLOCK * UE8M0_PER_WORD), torch.int32
        else:
            self.scale_columns, self.scale_dtype = hidden // FP8_BLOCK, torch.float32
        self.scale_bytes = 4 * self.scale_columns


class _Dispatched:
    """What a dispatch leaves for its combine (the first entry of the handle): the Buffer, the configuration's
    objects and the place of the one that dispatched, the call's number on it, and the call's sizes."""

    def __init__(
        self,
        buffer: "Buffer",
        pair: "_LowLatencyPair",
        index: int,
        num_tokens: int,
        top_k: int,
        sizes: tuple[int, int, int],
    ) -> None:
        self.buffer, self.pair, self.index = buffer, pair, index
        self.a2a = pair.objects[index]
        self.call = pair.calls[index]
        self.num_tokens = num_tokens
        self.sizes = sizes  # (num_max_dispatch_tokens_per_rank, hidden, num_experts), as the handle has them
        num_max, hidden, num_experts = sizes
        self.expert_rows_shape = (num_experts // buffer.group_size, num_max * buffer.group_size, hidden)
        self.topk_shape = (num_tokens, top_k)
        self.tokens_shape = (num_tokens, hidden)
        self.combine_sent = False  # its combine's send half has been launched

    def awaits_combine(self) -> bool:
        """Whether this is its object's last dispatch and its combine has not been launched."""
        return self.pair.calls[self.index] == self.call and self.pair.awaiting[self.index] and not self.combine_sent


class _LowLatencyPair:
    """The two objects of one configuration. Each takes a dispatch only when its last dispatch has been combined:
    expertwire's objects run dispatch and combine in turn."""

    def __init__(self, objects: list[AllToAll], symmetric_bytes: int, payload: "_Payload") -> None:
        self.objects = objects
        self.symmetric_bytes = symmetric_bytes
        self.payload = payload
        self.calls = [0, 0]  # dispatches so far, per object
        self.awaiting = [False, False]  # a dispatch whose combine has not run
        self.last = 1  # the object of the last dispatch
        self._expert_outputs: list[Optional[torch.Tensor]] = [None, None]
        self._active_ranks: list[Optional[torch.Tensor]] = [None, None]

    def idle(self) -> bool:
        return not any(self.awaiting)

    def expert_outputs(self, index: int) -> torch.Tensor:
        """Object `index`'s expert_output_buffer(), made once (a view of its buffer costs host time per call)."""
        view = self._expert_outputs[index]
        if view is None:
            view = self._expert_outputs[index] = self.objects[index].expert_output_buffer()
        return view

    def active_ranks(self, index: int) -> torch.Tensor:
        """Object `index`'s fault-tolerant mask (the shrink mode), its view made once."""
        view = self._active_ranks[index]
        if view is None:
            view = self._active_ranks[index] = self.objects[index].active_ranks
        return view

    def free_object(self) -> Optional[int]:
        """An object without a dispatch awaiting its combine, the one not used last first; None if both wait."""
        for i in (1 - self.last, self.last):
            if not self.awaiting[i]:
                return i
        return None


class Buffer:
    """DeepEP's communication buffer; here its low-latency half (dispatch and combine through NVSHMEM, every
    peer by loads and stores where it is mapped and by puts where not).

    Where NVSHMEM is not running yet, the constructor starts it over `group` (its ranks become NVSHMEM's, in
    order) with DeepEP's settings: ``NVSHMEM_DISABLE_P2P=1`` where `allow_nvlink_for_low_latency_mode` is False
    (where True, an ``NVSHMEM_DISABLE_P2P`` already set stands),
    ``NVSHMEM_IBGDA_NUM_RC_PER_PE`` = `num_qps_per_rank`, ``NVSHMEM_IB_ENABLE_IBGDA=1``, ``NVSHMEM_DISABLE_NVLS=1``,
    ``NVSHMEM_DISABLE_MNNVL=1`` unless `allow_mnnvl`, and a symmetric heap of at least `num_rdma_bytes`. Where it
    runs already (``expertwire.nvshmem_init``, nvshmem4py), its configuration stands, and
    ``allow_nvlink_for_low_latency_mode=False`` still sends to every peer by puts."""

    num_sms: int = 20

    def __init__(
        self,
        group: Optional[dist.ProcessGroup],
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        explicitly_destroy: bool = False,
        enable_shrink: bool = False,
        comm: Optional[Any] = None,
    ) -> None:
        op = "Buffer"
        if group is None:
            if comm is not None:
                raise _not_provided("Buffer(comm=...) (an mpi4py communicator); pass a torch.distributed group")
            raise ValueError("Buffer: either group or comm must be provided")
        self.num_nvl_bytes = integer(op, "num_nvl_bytes", num_nvl_bytes, minimum=0)
        self.num_rdma_bytes = integer(op, "num_rdma_bytes", num_rdma_bytes, minimum=0)
        self.low_latency_mode = flag(op, "low_latency_mode", low_latency_mode)
        self.num_qps_per_rank = integer(op, "num_qps_per_rank", num_qps_per_rank, minimum=1)
        self.allow_nvlink_for_low_latency_mode = flag(
            op, "allow_nvlink_for_low_latency_mode", allow_nvlink_for_low_latency_mode
        )
        self.allow_mnnvl = flag(op, "allow_mnnvl", allow_mnnvl)
        self.explicitly_destroy = flag(op, "explicitly_destroy", explicitly_destroy)
        self.enable_shrink = flag(op, "enable_shrink", enable_shrink)
        if not isinstance(group, dist.ProcessGroup):
            raise ValueError(f"Buffer: group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
        self.group = group
        self.rank = group.rank()
        self.group_size = group.size()
        self._device = torch.device("cuda", torch.cuda.current_device())
        hosts: list[Optional[str]] = [None] * self.group_size
        dist.all_gather_object(hosts, socket.gethostname(), group=group)
        self._num_hosts = len(set(hosts))
        # NVSHMEM for the low-latency half and the internode high-throughput one.
        if self.low_latency_mode or self.num_rdma_bytes > 0:
            self._join_nvshmem()
        self._pairs: dict[tuple, _LowLatencyPair] = {}
        # The shrink mode's mask, as DeepEP's: 1 for each masked rank. Every low-latency object's active_ranks
        # is folded into it and takes it back at each call (_shrink).
        self._mask = torch.zeros(self.group_size, dtype=torch.int32, device=self._device) if enable_shrink else None
        self._comm_stream = torch.cuda.Stream(device=self._device)
        self._destroyed = False
        if self._num_hosts > 1:
            reason: Optional[str] = f"the group's ranks are on {self._num_hosts} hosts"
        else:
            reason = ext.peer_memory_unavailable_reason()
        self._high_throughput = HighThroughputHalf(
            self, {"nvl": self.num_nvl_bytes, "rdma": self.num_rdma_bytes}, reason, _finish
        )

    def _join_nvshmem(self) -> None:
        if ext.nvshmem_initialized():
            joined = (ext.nvshmem_my_pe(), ext.nvshmem_n_pes())
            if joined != (self.rank, self.group_size):
                raise ValueError(
                    f"Buffer: NVSHMEM already runs in this process as rank {joined[0]} of {joined[1]}, not as "
                    f"this group's rank {self.rank} of {self.group_size}"
                )
            ext.nvshmem_attach_to_running()
            return
        # allow_nvlink_for_low_latency_mode allows P2P; an NVSHMEM_DISABLE_P2P the job set (ranks declared on
        # different nodes) stands. False disables it.
        if not self.allow_nvlink_for_low_latency_mode:
            os.environ["NVSHMEM_DISABLE_P2P"] = "1"
        else:
            os.environ.setdefault("NVSHMEM_DISABLE_P2P", "0")
        settings = {
            "NVSHMEM_IB_ENABLE_IBGDA": "1",
            "NVSHMEM_IBGDA_NUM_RC_PER_PE": str(self.num_qps_per_rank),
            "NVSHMEM_DISABLE_NVLS": "1",
        }
        if not self.allow_mnnvl:
            settings["NVSHMEM_DISABLE_MNNVL"] = "1"
        os.environ.update(settings)
        # The objects' buffers, and NVSHMEM's own teams and collectives beside them.
        heap = self.num_rdma_bytes + (1 << 28)
        if heap > _nvshmem_heap_bytes():
            os.environ["NVSHMEM_SYMMETRIC_SIZE"] = str(heap)
        uid = _nvshmem.nvshmem_get_unique_id() if self.rank == 0 else None
        gathered: list[Optional[torch.Tensor]] = [None] * self.group_size
        dist.all_gather_object(gathered, uid, group=self.group)
        _nvshmem._join_with_uid(gathered[0], self.rank, self.group_size)

    # ------------------------------------------------------------------------------------------------------
    # Static parts of DeepEP's API.

    @staticmethod
    def is_sm90_compiled() -> bool:
        """True: expertwire's kernels are built for SM90 (Hopper) and later."""
        return True

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """The num_sms of the default high-throughput configs; an even count. A configuration's object made with
        another num_sms is made again at its next call (a ValueError while one of its dispatches awaits its
        combine)."""
        integer("Buffer.set_num_sms", "new_num_sms", new_num_sms, minimum=2)
        if new_num_sms % 2 != 0:
            raise ValueError(f"Buffer.set_num_sms: new_num_sms must be even, got {new_num_sms}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An EventOverlap of an event recorded on the current stream now."""
        event = torch.cuda.Event()
        event.record()
        return EventOverlap(event)

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        """The num_rdma_bytes a Buffer needs for low-latency calls of this configuration with bf16 tokens (fp8
        ones take less), up to SIZE_HINT_TOP_K experts per token, on the current CUDA device: the two objects'
        symmetric buffers."""
        op = "Buffer.get_low_latency_rdma_size_hint"
        integer(op, "num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, minimum=1)
        integer(op, "hidden", hidden, minimum=1)
        integer(op, "num_ranks", num_ranks, minimum=1)
        integer(op, "num_experts", num_experts, minimum=1)
        payload = _Payload(hidden, use_fp8=False, use_ue8m0=False)
        config = _config(
            num_max_dispatch_tokens_per_rank,
            num_experts,
            min(num_experts, SIZE_HINT_TOP_K),
            0,
            num_ranks,
            hidden,
            payload,
        )
        return 2 * int(ext.AllToAllHandle.internode_symmetric_bytes(config))

    # ------------------------------------------------------------------------------------------------------

    def get_comm_stream(self) -> torch.cuda.Stream:
        """The stream that calls with async_finish run on."""
        return self._comm_stream

    def get_local_buffer_tensor(self, *args: object, **kwargs: object) -> torch.Tensor:
        raise _not_provided("Buffer.get_local_buffer_tensor (a view of the raw buffer)")

    def destroy(self) -> None:
        """Releases the buffers. Collective; only for a Buffer built with explicitly_destroy=True."""
        if not self.explicitly_destroy:
            raise ValueError("Buffer.destroy: the Buffer must be built with explicitly_destroy=True to be destroyed")
        self._destroyed = True  # first: a destroy that fails part way still refuses every later call
        for pair in self._pairs.values():
            for a2a in pair.objects:
                a2a.destroy()
        self._pairs.clear()
        self._high_throughput.destroy()

    def _live(self, op: str) -> None:
        if self._destroyed:
            raise RuntimeError(f"Buffer.{op}: this Buffer was destroyed")

    # ------------------------------------------------------------------------------------------------------
    # The high-throughput half (_deep_ep_high_throughput).

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """DeepEP's recommended dispatch Config for num_ranks ranks, with Buffer.num_sms."""
        return recommended_config("Buffer.get_dispatch_config", DISPATCH_CHUNKS, Buffer.num_sms, num_ranks)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """DeepEP's recommended combine Config for num_ranks ranks, with Buffer.num_sms."""
        return recommended_config("Buffer.get_combine_config", COMBINE_CHUNKS, Buffer.num_sms, num_ranks)

    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, EventOverlap]:
        """(num_tokens_per_rank int32 [num_ranks], num_tokens_per_rdma_rank int32 [num_nodes] or None within one
        node, num_tokens_per_expert int32 [num_experts], is_token_in_rank bool [num_tokens, num_ranks], event) of
        topk_idx (int64 [num_tokens, num_topk], -1: no expert), on the device without a host synchronization."""
        self._live("get_dispatch_layout")
        return self._high_throughput.get_dispatch_layout(
            topk_idx, num_experts, previous_event, async_finish, allocate_on_comm_stream
        )

    def dispatch(
        self,
        x: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]],
        handle: Optional[Any] = None,
        num_tokens_per_rank: Optional[torch.Tensor] = None,
        num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
        is_token_in_rank: Optional[torch.Tensor] = None,
        num_tokens_per_expert: Optional[torch.Tensor] = None,
        topk_idx: Optional[torch.Tensor] = None,
        topk_weights: Optional[torch.Tensor] = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple:
        """Sends each token of x (a [num_tokens, hidden] tensor whose rows are a multiple of 16 bytes, bf16 as
        DeepEP's callers pass it, or (fp8 values, float32 / int32 scales [num_tokens, num_scales] at any strides))
        once to every rank that holds one of its experts. Returns (recv_x (the same form as x, one row per
        received token, by source rank then token), recv_topk_idx int64 [rows, num_topk] (local expert, -1 for
        slots of other ranks), recv_topk_weights float32 (0 on those slots), num_recv_tokens_per_expert_list
        (each local expert's count rounded up to expert_alignment; [] with num_worst_tokens), handle, event).
        num_worst_tokens > 0: that many rows, no host synchronization (rows past the received ones have expert
        -1). The layout tensors of get_dispatch_layout are checked for shape and dtype; the kernels derive the
        same layout from topk_idx. With a handle (a cached dispatch): x goes where the handle's tokens went;
        returns (recv_x, None, None, None, None, event)."""
        self._live("dispatch")
        return self._high_throughput.dispatch(
            x,
            handle,
            num_tokens_per_rank,
            num_tokens_per_rdma_rank,
            is_token_in_rank,
            num_tokens_per_expert,
            topk_idx,
            topk_weights,
            expert_alignment,
            num_worst_tokens,
            config,
            previous_event,
            async_finish,
            allocate_on_comm_stream,
        )

    def combine(
        self,
        x: torch.Tensor,
        handle: Any,
        topk_weights: Optional[torch.Tensor] = None,
        bias: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor], None] = None,
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        """Sums, without weights and in fp32, each token's rows x (bf16 [rows of the handle's dispatch, hidden])
        from every rank it went to: (combined_x bf16 [num_tokens, hidden], combined_topk_weights, event).
        topk_weights (float32 [rows, num_topk]): combined_topk_weights[t, j] is the value that the rank holding
        slot j's expert gave it (0 for -1 slots); DeepEP adds every receiving rank's value, which is the same
        where the other ranks' values are 0, as dispatch's recv_topk_weights are."""
        self._live("combine")
        return self._high_throughput.combine(
            x, handle, topk_weights, bias, config, previous_event, async_finish, allocate_on_comm_stream
        )

    def internode_dispatch(self, x: Any, handle: Optional[Any] = None, *args: Any, **kwargs: Any) -> tuple:
        """DeepEP's internode implementation of dispatch (no num_worst_tokens); here dispatch itself."""
        names = (
            "num_tokens_per_rank",
            "num_tokens_per_rdma_rank",
            "is_token_in_rank",
            "num_tokens_per_expert",
            "topk_idx",
            "topk_weights",
            "expert_alignment",
            "config",
            "previous_event",
            "async_finish",
            "allocate_on_comm_stream",
        )
        if len(args) > len(names):
            raise ValueError(f"internode_dispatch: at most {len(names) + 2} positional arguments, got {len(args) + 2}")
        given = dict(zip(names[: len(args)], args, strict=True))
        both = sorted(set(given) & set(kwargs))
        if both:
            raise TypeError(f"internode_dispatch: got multiple values for argument {both[0]!r}")
        kwargs.update(given)
        if "num_worst_tokens" in kwargs:
            raise ValueError("internode_dispatch: takes no num_worst_tokens (DeepEP's internode kernels do not)")
        return self.dispatch(x, handle, **kwargs)

    def internode_combine(self, x: torch.Tensor, handle: Any, *args: Any, **kwargs: Any) -> tuple:
        """DeepEP's internode implementation of combine; here combine itself."""
        return self.combine(x, handle, *args, **kwargs)

    # ------------------------------------------------------------------------------------------------------
    # The shrink mode's mask (enable_shrink): expertwire's fault-tolerant mode under DeepEP's calls.

    def _shrink_mask(self, name: str) -> torch.Tensor:
        """The mask, for Buffer.`name` on the current stream, which first waits for the comm stream (the calls
        with async_finish update the mask there): a ValueError naming it without enable_shrink."""
        self._live(name)
        if self._mask is None:
            raise ValueError(f"Buffer.{name}: the Buffer must be built with enable_shrink=True to mask ranks")
        if self._mask.is_cuda:
            torch.cuda.current_stream(self._device).wait_stream(self._comm_stream)
        return self._mask

    def _shrink(self, pair: _LowLatencyPair, index: int) -> None:
        """On the call's stream, before its kernels: the ranks object `index` of `pair` has masked join the
        Buffer's mask, and the Buffer's masked ranks (masked by another object, or by the caller) are masked in
        that object too. Only clears active_ranks entries: no rank comes back."""
        active = pair.active_ranks(index)
        self._mask.bitwise_or_(active.eq(0))
        active.masked_fill_(self._mask.ne(0), 0)

    def _folded_mask(self, name: str) -> torch.Tensor:
        """The Buffer's mask with every object's masked ranks folded in, on the current stream."""
        mask = self._shrink_mask(name)
        for pair in self._pairs.values():
            for index in range(len(pair.objects)):
                mask.bitwise_or_(pair.active_ranks(index).eq(0))
        return mask

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Masks `rank_to_mask` (mask=True) from the next low-latency call on: nothing is sent to it or read from
        it, its experts get no tokens and add nothing to combine's sums. Pass the same on every surviving rank. A
        rank cannot mask itself; mask=False on a masked rank raises NotImplementedError (expertwire's masked ranks
        do not come back: build a new Buffer on every rank), and on an unmasked one does nothing (it synchronizes
        with the GPU to tell)."""
        name = "low_latency_update_mask_buffer"
        op = f"Buffer.{name}"
        current = self._shrink_mask(name)
        integer(op, "rank_to_mask", rank_to_mask, minimum=0, maximum=self.group_size - 1)
        flag(op, "mask", mask)
        if mask:
            if rank_to_mask == self.rank:
                raise ValueError(f"{op}: rank {self.rank} cannot mask itself out")
            current[rank_to_mask] = 1
        elif int(self._folded_mask(name)[rank_to_mask]) != 0:
            raise _not_provided(f"{op}(rank_to_mask={rank_to_mask}, mask=False) (unmasking a masked rank)")

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Writes the mask into `mask_status` (int32 [num_ranks] on this rank's GPU, on the current stream, after the
        calls launched so far): 1 for each rank masked, by a wait that ran out on it in any low-latency call or by
        low_latency_update_mask_buffer, else 0."""
        name = "low_latency_query_mask_buffer"
        self._shrink_mask(name)
        _check_tensor(f"Buffer.{name}", "mask_status", mask_status, torch.int32, (self.group_size,), self._device)
        mask_status.copy_(self._folded_mask(name))

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmasks every rank: nothing to do where none is masked (it synchronizes with the GPU to tell);
        NotImplementedError where one is (expertwire's masked ranks do not come back)."""
        masked = self._folded_mask("low_latency_clean_mask_buffer").nonzero().flatten().tolist()
        if masked:
            raise _not_provided(f"Buffer.low_latency_clean_mask_buffer with ranks {masked} masked (unmasking them)")

    # ------------------------------------------------------------------------------------------------------
    # The low-latency half.

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """DeepEP zeroes part of its buffer here after high-throughput calls used it. expertwire's low-latency
        objects keep buffers of their own and count their calls instead of zeroing, so there is nothing to
        clean: the arguments are checked, and the ranks meet in a barrier on the current stream, as DeepEP's
        kernel does."""
        op = "Buffer.clean_low_latency_buffer"
        self._live("clean_low_latency_buffer")
        integer(op, "num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, minimum=1)
        integer(op, "hidden", hidden, minimum=1)
        integer(op, "num_experts", num_experts, minimum=1)
        _nvshmem.nvshmem_barrier_all_on_current_stream()

    def _pool_bytes_in_use(self, pool: str) -> int:
        """Bytes of num_nvl_bytes ("nvl") or num_rdma_bytes ("rdma") that objects hold now."""
        low_latency = sum(p.symmetric_bytes for p in self._pairs.values()) if pool == "rdma" else 0
        return low_latency + self._high_throughput.bytes_in_use(pool)

    def _pair(self, num_max: int, hidden: int, num_experts: int, top_k: int, payload: _Payload) -> _LowLatencyPair:
        key = (num_max, hidden, num_experts, top_k, payload.use_fp8, payload.use_ue8m0)
        pair = self._pairs.get(key)
        if pair is not None:
            return pair
        config = _config(num_max, num_experts, top_k, self.rank, self.group_size, hidden, payload)
        need = 2 * int(ext.AllToAllHandle.internode_symmetric_bytes(config))
        # Configurations used before give their buffers back, oldest first, while none of their dispatches
        # awaits a combine (every rank makes the same calls, so every rank frees the same ones); then idle
        # internode high-throughput objects.
        for old_key in list(self._pairs):
            if self._pool_bytes_in_use("rdma") + need <= self.num_rdma_bytes:
                break
            if self._pairs[old_key].idle():
                for a2a in self._pairs.pop(old_key).objects:
                    a2a.destroy()
        if self._pool_bytes_in_use("rdma") + need > self.num_rdma_bytes:
            self._high_throughput.release_idle("rdma")
        used = self._pool_bytes_in_use("rdma")
        if used + need > self.num_rdma_bytes:
            raise ValueError(
                f"low_latency_dispatch: num_rdma_bytes={self.num_rdma_bytes} is too small: this configuration "
                f"(num_max_dispatch_tokens_per_rank={num_max}, hidden={hidden}, num_experts={num_experts}, "
                f"top-k {top_k}, {'fp8' if payload.use_fp8 else 'bf16'}) needs {need} bytes"
                + (f" beside the {used} that other configurations hold" if used else "")
                + " (Buffer.get_low_latency_rdma_size_hint)"
            )
        objects = [
            AllToAll.internode(
                num_max,
                num_experts,
                top_k,
                self.rank,
                self.group_size,
                1,
                hidden,
                payload.row_bytes,
                payload.scale_bytes,
                force_puts=not self.allow_nvlink_for_low_latency_mode,
                fault_tolerant=self.enable_shrink,
            )
            for _ in range(2)
        ]
        pair = self._pairs[key] = _LowLatencyPair(objects, need, payload)
        return pair

    def _checked_dispatch(
        self,
        op: str,
        x: object,
        topk_idx: object,
        num_max: object,
        num_experts: object,
        stats: object,
        dispatch_wait_recv_cost_stats: object,
        use_fp8: object,
        round_scale: object,
        use_ue8m0: object,
        async_finish: object,
        return_recv_hook: object,
    ) -> _LowLatencyPair:
        """Every check of a low_latency_dispatch call, each failure a ValueError naming its argument (or a
        NotImplementedError); the objects of its configuration, made on its first call."""
        self._live(op)
        if not self.low_latency_mode:
            raise ValueError(f"{op}: the Buffer must be built with low_latency_mode=True for the low-latency calls")
        num_max = integer(op, "num_max_dispatch_tokens_per_rank", num_max, minimum=1)
        integer(op, "num_experts", num_experts, minimum=1)
        for name, value in (
            ("use_fp8", use_fp8),
            ("round_scale", round_scale),
            ("use_ue8m0", use_ue8m0),
            ("async_finish", async_finish),
            ("return_recv_hook", return_recv_hook),
        ):
            flag(op, name, value)
        if dispatch_wait_recv_cost_stats is not None:
            raise _not_provided("low_latency_dispatch(dispatch_wait_recv_cost_stats=...) (per-rank wait times)")
        if use_ue8m0 and not round_scale:
            raise ValueError(f"{op}: use_ue8m0=True needs round_scale=True (UE8M0 holds powers of two only)")
        if use_ue8m0 and not use_fp8:
            raise ValueError(f"{op}: use_ue8m0=True needs use_fp8=True")
        if async_finish and return_recv_hook:
            raise ValueError(f"{op}: async_finish and return_recv_hook cannot both be set")
        num_tokens, hidden = self._check_tokens(op, x, num_max)
        top_k = self._check_topk_idx(op, topk_idx, num_tokens)[1]
        block = FP8_BLOCK * (UE8M0_PER_WORD if use_ue8m0 else 1)
        if use_fp8 and hidden % block != 0:
            raise ValueError(
                f"{op}: x must have a hidden size that is a multiple of {block} with these scales, got {hidden}"
            )
        if num_experts % self.group_size != 0:
            raise ValueError(
                f"{op}: num_experts must be a multiple of the group's {self.group_size} ranks, got {num_experts}"
            )
        if stats is not None:
            local = num_experts // self.group_size
            _check_tensor(op, "cumulative_local_expert_recv_stats", stats, torch.int32, (local,), self._device)
        return self._pair(num_max, hidden, num_experts, top_k, _Payload(hidden, use_fp8, use_ue8m0))

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
        dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> tuple[
        Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]], torch.Tensor, tuple, EventOverlap, Optional[Callable]
    ]:
        """Sends each token of x (bf16 [num_tokens, hidden], num_tokens <= num_max_dispatch_tokens_per_rank) to
        the experts in its row of topk_idx (int64 [num_tokens, num_topk], -1: no expert). With use_fp8 the
        tokens travel as fp8 with per-128 scales, cast by the send kernel (AllToAll.dispatch's fp8_cast). Returns
        (recv_x, recv_count, handle, event, hook) as DeepEP: recv_x [num_local_experts,
        num_max_dispatch_tokens_per_rank * num_ranks, hidden] bf16, or with use_fp8 (fp8 values, scales
        [.., .., hidden / 128] float32 or with use_ue8m0 [.., .., hidden / 512] int32, the last two dimensions
        column-major); recv_count int32 [num_local_experts]; hook launches the receive half where
        return_recv_hook (else None)."""
        op = "low_latency_dispatch"
        num_max, stats = num_max_dispatch_tokens_per_rank, cumulative_local_expert_recv_stats
        # The usual call of a configuration that ran before: its configuration checks held then, so only the
        # tensors and the flags are checked here (host time). Anything else takes the full checks below.
        pair = None
        if (
            type(x) is torch.Tensor
            and type(topk_idx) is torch.Tensor
            and type(num_max) is int
            and type(num_experts) is int
            and type(use_fp8) is bool
            and type(round_scale) is bool
            and type(use_ue8m0) is bool
            and type(async_finish) is bool
            and type(return_recv_hook) is bool
            and x.dim() == 2
            and topk_idx.dim() == 2
        ):
            pair = self._pairs.get((num_max, x.shape[1], num_experts, topk_idx.shape[1], use_fp8, use_ue8m0))
            device = self._device
            num_tokens = x.shape[0]
            if pair is not None and not (
                x.dtype == torch.bfloat16
                and x.device == device
                and x.is_contiguous()
                and num_tokens <= num_max
                and (num_tokens == 0 or x.data_ptr() % 16 == 0)
                and topk_idx.dtype == topk_idx_t
                and topk_idx.device == device
                and topk_idx.shape[0] == num_tokens
                and (round_scale or not use_ue8m0)
                and not (async_finish and return_recv_hook)
                and dispatch_wait_recv_cost_stats is None
                and (stats is None or _is_tensor(stats, torch.int32, (num_experts // self.group_size,), device, False))
            ):
                pair = None
        if pair is None:
            pair = self._checked_dispatch(
                op,
                x,
                topk_idx,
                num_max,
                num_experts,
                stats,
                dispatch_wait_recv_cost_stats,
                use_fp8,
                round_scale,
                use_ue8m0,
                async_finish,
                return_recv_hook,
            )
        num_tokens, hidden = x.shape
        local = num_experts // self.group_size
        payload = pair.payload
        # The send half casts bf16 tokens itself (DispatchParams::cast): no separate pass.
        fp8_cast = (
            "none"
            if not use_fp8
            else "ue8m0-scales"
            if use_ue8m0
            else "power-of-two-scales"
            if round_scale
            else "block-scales"
        )
        index = pair.free_object()
        if index is None:
            raise ValueError(
                f"{op}: both buffers of this configuration hold a dispatch whose combine has not run: expertwire "
                "runs each dispatch's combine (once) before its buffer takes another dispatch, so at most two "
                "dispatches may await their combines"
            )
        a2a = pair.objects[index]
        rows = num_max * self.group_size
        # Outputs on the caller's stream (they are the caller's); with async_finish the kernels and their
        # temporaries on the comm stream, which first waits for the caller's work, and the event keeps the
        # caller's tensors alive until it is dropped.
        recv_count = torch.empty((local,), dtype=torch.int32, device=self._device)
        if use_fp8:
            recv_x = torch.empty((local, rows, hidden), dtype=torch.float8_e4m3fn, device=self._device)
            recv_scales: Optional[torch.Tensor] = _transposed_scales(
                local, rows, payload.scale_columns, payload.scale_dtype, self._device
            )
            out_scales = recv_scales.view(torch.float32)
        else:
            recv_x = torch.empty((local, rows, hidden), dtype=torch.bfloat16, device=self._device)
            recv_scales, out_scales = None, None
        # The hook's stream (the dispatch's, as DeepEP's); without a hook or async_finish none is needed.
        stream = self._comm_stream if async_finish else torch.cuda.current_stream() if return_recv_hook else None

        def run(do_send: bool, do_recv: bool) -> None:
            a2a._launch_checked_dispatch(recv_count, recv_x, out_scales, x, indices, do_send, do_recv, fp8_cast)
            if do_recv and stats is not None:
                stats.add_(recv_count)

        # Without async_finish everything goes on the current stream, with no stream switch (host time).
        if async_finish:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if async_finish else contextlib.nullcontext():
            indices = topk_idx.contiguous()  # the kernels read int64 rows, packed
            if self._mask is not None:
                self._shrink(pair, index)
            run(do_send=True, do_recv=not return_recv_hook)
        event = _finish(
            stream,
            async_finish,
            (x, topk_idx, recv_x, recv_scales, recv_count, stats),
        )
        pair.calls[index] += 1
        pair.awaiting[index] = True
        pair.last = index
        dispatched = _Dispatched(self, pair, index, num_tokens, topk_idx.shape[1], (num_max, hidden, num_experts))

        def receive() -> None:
            with torch.cuda.stream(stream):  # the dispatch's stream, as DeepEP's hook
                run(do_send=False, do_recv=True)

        # DeepEP's handle is (src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts); here
        # the first place holds what the combine needs of the dispatch.
        handle = (dispatched, None, num_max, hidden, num_experts)
        received = (recv_x, recv_scales) if use_fp8 else recv_x
        return received, recv_count, handle, event, (receive if return_recv_hook else None)

    def _checked_combine(
        self,
        op: str,
        x: object,
        topk_idx: object,
        topk_weights: object,
        handle: object,
        use_logfmt: object,
        zero_copy: object,
        async_finish: object,
        return_recv_hook: object,
        out: object,
        combine_wait_recv_cost_stats: object,
    ) -> "_Dispatched":
        """Every check of a low_latency_combine call, as _checked_dispatch; the handle's dispatch."""
        self._live(op)
        for name, value in (
            ("use_logfmt", use_logfmt),
            ("zero_copy", zero_copy),
            ("async_finish", async_finish),
            ("return_recv_hook", return_recv_hook),
        ):
            flag(op, name, value)
        if use_logfmt:
            raise _not_provided("low_latency_combine(use_logfmt=True) (a 10-bit LogFMT payload)")
        if combine_wait_recv_cost_stats is not None:
            raise _not_provided("low_latency_combine(combine_wait_recv_cost_stats=...) (per-rank wait times)")
        if async_finish and return_recv_hook:
            raise ValueError(f"{op}: async_finish and return_recv_hook cannot both be set")
        dispatched = self._awaiting_combine(op, handle)
        if not zero_copy:
            _check_tensor(op, "x", x, torch.bfloat16, dispatched.expert_rows_shape, self._device, contiguous=True)
        num_tokens = self._check_topk_idx(op, topk_idx, None, top_k=dispatched.topk_shape[1])[0]
        if num_tokens != dispatched.num_tokens:
            raise ValueError(
                f"{op}: topk_idx must have the {dispatched.num_tokens} rows of the handle's dispatch, got {num_tokens}"
            )
        _check_tensor(op, "topk_weights", topk_weights, torch.float32, dispatched.topk_shape, self._device)
        if out is not None:
            _check_tensor(op, "out", out, torch.bfloat16, dispatched.tokens_shape, self._device, contiguous=True)
        return dispatched

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: tuple,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: Optional[torch.Tensor] = None,
        combine_wait_recv_cost_stats: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, EventOverlap, Optional[Callable]]:
        """Returns the experts' outputs x (bf16 [num_local_experts, num_max_dispatch_tokens_per_rank * num_ranks,
        hidden], rows where the handle's dispatch put them) to their tokens' ranks and sums them with
        topk_weights (float32 [num_tokens, num_topk]) in fp32: combined_x bf16 [num_tokens, hidden] (into `out`
        where given). zero_copy: the outputs are in get_next_low_latency_combine_buffer(handle) already, and x
        is not read. As in DeepEP, the kernels read topk_idx and topk_weights where the caller keeps them: with
        return_recv_hook, the hook's receive half reads them when it runs."""
        op = "low_latency_combine"
        # As in low_latency_dispatch: the usual call checked by its tensors and flags, anything else fully.
        dispatched = handle[0] if type(handle) is tuple and len(handle) == 5 else None
        if not (
            type(dispatched) is _Dispatched
            and dispatched.buffer is self
            and type(use_logfmt) is bool
            and not use_logfmt
            and type(zero_copy) is bool
            and type(async_finish) is bool
            and type(return_recv_hook) is bool
            and not (async_finish and return_recv_hook)
            and combine_wait_recv_cost_stats is None
            and not self._destroyed
            and dispatched.awaits_combine()
            and handle[2:] == dispatched.sizes
            and (zero_copy or _is_tensor(x, torch.bfloat16, dispatched.expert_rows_shape, self._device, True))
            and _is_tensor(topk_idx, topk_idx_t, dispatched.topk_shape, self._device, False)
            and _is_tensor(topk_weights, torch.float32, dispatched.topk_shape, self._device, False)
            and (out is None or _is_tensor(out, torch.bfloat16, dispatched.tokens_shape, self._device, True))
        ):
            dispatched = self._checked_combine(
                op,
                x,
                topk_idx,
                topk_weights,
                handle,
                use_logfmt,
                zero_copy,
                async_finish,
                return_recv_hook,
                out,
                combine_wait_recv_cost_stats,
            )
        a2a, pair, index = dispatched.a2a, dispatched.pair, dispatched.index
        num_tokens, hidden = dispatched.tokens_shape
        expert_y = pair.expert_outputs(index) if zero_copy else x
        combined = (
            out if out is not None else torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=self._device)
        )
        stream = self._comm_stream if async_finish else torch.cuda.current_stream() if return_recv_hook else None
        weights = topk_weights.contiguous()
        if async_finish:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if async_finish else contextlib.nullcontext():
            indices = topk_idx.contiguous()  # the kernels read int64 rows, packed
            if self._mask is not None:
                self._shrink(pair, index)
            a2a._launch_checked_combine(combined, indices, weights, expert_y, True, not return_recv_hook)
        event = _finish(stream, async_finish, (x, topk_idx, topk_weights, weights, combined))
        dispatched.combine_sent = True
        # The object takes the next dispatch once the combine's receive half is launched: with
        # return_recv_hook, when the hook runs.
        if not return_recv_hook:
            pair.awaiting[index] = False

        def receive() -> None:
            with torch.cuda.stream(stream):
                a2a._launch_checked_combine(combined, indices, weights, expert_y, do_send=False, do_recv=True)
            pair.awaiting[index] = False

        return combined, event, (receive if return_recv_hook else None)

    def get_next_low_latency_combine_buffer(self, handle: object) -> torch.Tensor:
        """Where the experts may write their outputs for the handle's combine with zero_copy=True: bf16
        [num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank, hidden], in this rank's buffer."""
        dispatched = self._awaiting_combine("get_next_low_latency_combine_buffer", handle)
        return dispatched.pair.expert_outputs(dispatched.index)

    # ------------------------------------------------------------------------------------------------------

    def _check_tokens(self, op: str, x: object, num_max: int) -> tuple[int, int]:
        if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16 or x.dim() != 2:
            got = f"{x.dtype} of shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{op}: x must be a 2-D torch.bfloat16 tensor [num_tokens, hidden], got {got}")
        if x.device != self._device:
            raise ValueError(f"{op}: x must be on {self._device}, got {x.device}")
        if not x.is_contiguous():
            raise ValueError(f"{op}: x must be contiguous, got strides {list(x.stride())}")
        if x.numel() > 0 and x.data_ptr() % 16 != 0:
            raise ValueError(f"{op}: x must start at a 16-byte aligned address, got {x.data_ptr():#x}")
        num_tokens, hidden = x.shape
        if num_tokens > num_max:
            raise ValueError(
                f"{op}: x must have at most num_max_dispatch_tokens_per_rank={num_max} tokens, got {num_tokens}"
            )
        return int(num_tokens), int(hidden)

    def _check_topk_idx(
        self, op: str, topk_idx: object, num_tokens: Optional[int], top_k: Optional[int] = None
    ) -> tuple[int, int]:
        """(num_tokens, num_topk) of a valid topk_idx."""
        if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype != topk_idx_t or topk_idx.dim() != 2:
            got = (
                f"{topk_idx.dtype} of shape {list(topk_idx.shape)}"
                if isinstance(topk_idx, torch.Tensor)
                else type(topk_idx).__name__
            )
            raise ValueError(f"{op}: topk_idx must be a 2-D torch.int64 tensor [num_tokens, num_topk], got {got}")
        if topk_idx.device != self._device:
            raise ValueError(f"{op}: topk_idx must be on {self._device}, got {topk_idx.device}")
        if num_tokens is not None and topk_idx.shape[0] != num_tokens:
            raise ValueError(f"{op}: topk_idx must have x's {num_tokens} rows, got {topk_idx.shape[0]}")
        if top_k is not None and topk_idx.shape[1] != top_k:
            raise ValueError(f"{op}: topk_idx must have the dispatch's {top_k} columns, got {topk_idx.shape[1]}")
        if topk_idx.shape[1] < 1:
            raise ValueError(f"{op}: topk_idx must have at least one column, got shape {list(topk_idx.shape)}")
        return int(topk_idx.shape[0]), int(topk_idx.shape[1])

    def _awaiting_combine(self, op: str, handle: object) -> _Dispatched:
        """The dispatch of `handle`, whose combine has not run yet."""
        if not isinstance(handle, tuple) or len(handle) != 5 or not isinstance(handle[0], _Dispatched):
            raise ValueError(
                f"{op}: handle must be the handle low_latency_dispatch returned, got {type(handle).__name__}"
            )
        dispatched = handle[0]
        if dispatched.buffer is not self or all(pair is not dispatched.pair for pair in self._pairs.values()):
            raise ValueError(f"{op}: handle comes from another Buffer (or one destroyed since)")
        if handle[2:] != dispatched.sizes:
            raise ValueError(
                f"{op}: handle's num_max_dispatch_tokens_per_rank, hidden and num_experts {handle[2:]} are "
                "not those of its dispatch"
            )
        if not dispatched.awaits_combine():
            raise ValueError(
                f"{op}: the handle's dispatch was combined already (expertwire combines each dispatch once)"
            )
        return dispatched


def _nvshmem_heap_bytes() -> int:
    """NVSHMEM_SYMMETRIC_SIZE as NVSHMEM reads it (a count with an optional K/M/G/T suffix), or its default."""
    text = os.environ.get("NVSHMEM_SYMMETRIC_SIZE", "1G").strip()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    factor = units.get(text[-1:].upper(), 1)
    number = text[:-1] if factor != 1 else text
    try:
        return int(float(number) * factor)
    except ValueError:
        return 1 << 30


def _config(num_max: int, num_experts: int, top_k: int, rank: int, world: int, hidden: int, payload: _Payload) -> Any:
    return ext.AllToAllConfig(
        max_num_tokens=num_max,
        num_experts=num_experts,
        experts_per_token=top_k,
        rank=rank,
        world_size=world,
        dp_size=1,
        hidden_dim=hidden,
        hidden_dim_bytes=payload.row_bytes,
        hidden_dim_scale_bytes=payload.scale_bytes,
    )


def _is_tensor(value: object, dtype: torch.dtype, shape: tuple, device: torch.device, contiguous: bool) -> bool:
    """Whether _check_tensor would pass `value` (a plain torch.Tensor; the fast checks of the usual call)."""
    return (
        type(value) is torch.Tensor
        and value.dtype == dtype
        and value.shape == shape
        and value.device == device
        and (not contiguous or value.is_contiguous())
    )


def _check_tensor(
    op: str,
    name: str,
    value: object,
    dtype: torch.dtype,
    shape: tuple,
    device: torch.device,
    contiguous: bool = False,
) -> None:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != dtype or tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"{op}: {name} must be {dtype} of shape {list(shape)}, got {value.dtype} of shape {list(value.shape)}"
        )
    if value.device != device:
        raise ValueError(f"{op}: {name} must be on {device}, got {value.device}")
    if contiguous and not value.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous, got strides {list(value.stride())}")


def _finish(stream: Optional[torch.cuda.Stream], async_finish: bool, tensors: tuple) -> EventOverlap:
    """The call's EventOverlap: with async_finish an event on the comm stream, holding the caller's tensors the
    call uses (as DeepEP's, instead of record_stream, which CUDA graphs refuse); else no event."""
    if not async_finish:
        return EventOverlap()
    event = torch.cuda.Event()
    event.record(stream)
    return EventOverlap(event, tuple(t for t in tensors if isinstance(t, torch.Tensor)))
