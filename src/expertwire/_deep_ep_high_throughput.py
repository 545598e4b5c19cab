"""The high-throughput half of expertwire.deep_ep.Buffer (DeepEP's "normal" kernels): get_dispatch_layout,
dispatch and combine over expertwire's HighThroughputAllToAll in its rank-packed layout.

DeepEP's buffer is a ring that any number of tokens streams through; expertwire's high-throughput objects hold
every received row at once. Each configuration (experts, top-k, row and scale bytes, SMs) therefore gets one
object sized for the most tokens per rank that fit the Buffer's bytes: num_nvl_bytes for the intranode object
(peer memory, every rank of the group on this host), num_rdma_bytes for the internode one (NVSHMEM). A dispatch
of more tokens raises ValueError naming the bytes it would need.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, Union

import torch

from ._native import ext
from .checks import flag, integer
from .high_throughput import HighThroughputAllToAll

# Config.get_*_buffer_size_hint size the buffer for calls of up to this many experts per token and experts.
HINT_TOP_K = 16
HINT_EXPERTS = 512
FP8_SCALE_BLOCK = 128


class Config:
    """DeepEP's tuning of its high-throughput kernels. expertwire's kernels have no chunked ring buffers: the
    chunk sizes are checked as DeepEP checks them and size the buffer hints; num_sms bounds the blocks of the
    kernels of the configuration's object (read when that object is made)."""

    def __init__(
        self,
        num_sms: int = 20,
        num_max_nvl_chunked_send_tokens: int = 6,
        num_max_nvl_chunked_recv_tokens: int = 256,
        num_max_rdma_chunked_send_tokens: int = 6,
        num_max_rdma_chunked_recv_tokens: int = 256,
    ) -> None:
        values = dict(
            num_sms=num_sms,
            num_max_nvl_chunked_send_tokens=num_max_nvl_chunked_send_tokens,
            num_max_nvl_chunked_recv_tokens=num_max_nvl_chunked_recv_tokens,
            num_max_rdma_chunked_send_tokens=num_max_rdma_chunked_send_tokens,
            num_max_rdma_chunked_recv_tokens=num_max_rdma_chunked_recv_tokens,
        )
        for name, value in values.items():
            integer("Config", name, value, minimum=0 if name == "num_sms" else 1)
        if num_max_nvl_chunked_send_tokens >= num_max_nvl_chunked_recv_tokens:
            raise ValueError(
                "Config: num_max_nvl_chunked_send_tokens must be < num_max_nvl_chunked_recv_tokens, got "
                f"{num_max_nvl_chunked_send_tokens} and {num_max_nvl_chunked_recv_tokens}"
            )
        # DeepEP rounds the RDMA receive chunk up to a multiple of the send chunk, then needs it twice as large.
        send = num_max_rdma_chunked_send_tokens
        recv = -(-num_max_rdma_chunked_recv_tokens // send) * send
        if send > recv // 2:
            raise ValueError(
                "Config: num_max_rdma_chunked_send_tokens must be at most half of num_max_rdma_chunked_recv_tokens "
                f"(rounded up to a multiple of it), got {send} and {recv}"
            )
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = send
        self.num_max_rdma_chunked_recv_tokens = recv

    def hint_tokens_per_rank(self) -> int:
        """The tokens per rank the hints size for: what DeepEP's ring holds at once (a chunk of received tokens
        per channel, a channel per two SMs)."""
        return max(1, self.num_sms // 2) * self.num_max_nvl_chunked_recv_tokens

    def _hint(self, hidden_bytes: int, num_ranks: int, may_put: bool) -> int:
        op = "Config.get_nvl_buffer_size_hint" if not may_put else "Config.get_rdma_buffer_size_hint"
        integer(op, "hidden_bytes", hidden_bytes, minimum=1)
        integer(op, "num_ranks", num_ranks, minimum=1)
        if hidden_bytes % 16 != 0:
            raise ValueError(f"{op}: hidden_bytes must be a multiple of 16, got {hidden_bytes}")
        # hidden_bytes as DeepEP's callers pass it: the bf16 row, which is also the combine's row.
        experts = -(-HINT_EXPERTS // num_ranks) * num_ranks
        hidden = hidden_bytes // 2
        scale_bytes = 4 * (hidden // FP8_SCALE_BLOCK)
        shape = (experts, HINT_TOP_K, num_ranks, hidden, hidden_bytes, scale_bytes)
        return buffer_bytes(self.hint_tokens_per_rank(), *shape, may_put=may_put)

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """num_nvl_bytes for intranode calls of up to hint_tokens_per_rank() tokens of hidden_bytes (the bf16
        row's bytes) per rank, top-k <= 16, up to 512 experts."""
        return self._hint(hidden_bytes, num_ranks, may_put=False)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """num_rdma_bytes for internode calls of the same sizes (with the put path's rows)."""
        return self._hint(hidden_bytes, num_ranks, may_put=True)


# DeepEP's recommended configurations by rank count (its deep_ep Buffer.get_dispatch_config / get_combine_config):
# the four chunk sizes after num_sms.
DISPATCH_CHUNKS = {
    2: (24, 256, 6, 128),
    4: (6, 256, 6, 128),
    8: (6, 256, 6, 128),
    16: (36, 288, 20, 128),
    24: (32, 288, 8, 128),
    32: (32, 288, 8, 128),
    48: (32, 288, 8, 128),
    64: (32, 288, 8, 128),
    96: (20, 480, 12, 128),
    128: (20, 560, 12, 128),
    144: (32, 720, 12, 128),
    160: (28, 720, 12, 128),
}
COMBINE_CHUNKS = {
    2: (10, 256, 6, 128),
    4: (9, 256, 6, 128),
    8: (4, 256, 6, 128),
    16: (4, 288, 12, 128),
    24: (1, 288, 8, 128),
    32: (1, 288, 8, 128),
    48: (1, 288, 8, 128),
    64: (1, 288, 8, 128),
    96: (1, 480, 8, 128),
    128: (1, 560, 8, 128),
    144: (2, 720, 8, 128),
    160: (2, 720, 8, 128),
}


def recommended_config(op: str, table: dict, num_sms: int, num_ranks: int) -> Config:
    if num_ranks not in table:
        raise ValueError(f"{op}: num_ranks must be one of {sorted(table)}, got {num_ranks!r}")
    return Config(num_sms, *table[num_ranks])


def buffer_bytes(
    tokens: int, experts: int, top_k: int, ranks: int, hidden: int, row_bytes: int, scale_bytes: int, may_put: bool
) -> int:
    """The bytes of each rank's high-throughput object of `tokens` per rank, bf16 combine rows (with the put
    path's rows where may_put)."""
    return int(
        ext.HighThroughputObject.symmetric_bytes_for(
            max_num_tokens=tokens,
            num_experts=experts,
            experts_per_token=top_k,
            world_size=ranks,
            hidden_dim=hidden,
            hidden_dim_bytes=row_bytes,
            hidden_dim_scale_bytes=scale_bytes,
            combine_element_bytes=2,
            may_put=may_put,
        )
    )


class HighThroughputHandle:
    """What a dispatch leaves for its combine and for cached dispatches (DeepEP's handle is a tuple of layout
    tensors; this one is opaque): the object, its native handle, the routing and the received row count."""

    def __init__(
        self,
        entry: "_Entry",
        native: "ext.HighThroughputHandle",
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        num_recv_rows: int,
    ) -> None:
        self.entry = entry
        self.native = native
        self.topk_idx = topk_idx
        self.topk_weights = topk_weights
        self.num_recv_rows = num_recv_rows  # rows of recv_x (num_worst_tokens where given)
        self.generation = entry.generation


class _Entry:
    """One configuration's high-throughput object, with the bytes it takes of its pool."""

    def __init__(self, a2a: HighThroughputAllToAll, pool: str, symmetric_bytes: int, num_sms: int) -> None:
        self.a2a = a2a
        self.pool = pool
        self.symmetric_bytes = symmetric_bytes
        self.num_sms = num_sms
        self.awaiting_combine = False
        self.generation = 0  # bumped when destroyed: handles of it are dead

    def idle(self) -> bool:
        return not self.awaiting_combine

    def destroy(self) -> None:
        self.a2a.destroy()
        self.generation += 1


def _check(op: str, name: str, value: object, dtypes: tuple, shape: tuple, device: torch.device) -> torch.Tensor:
    """A contiguous tensor of one of `dtypes` and this shape on `device` (None in `shape`: any extent)."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    wanted = " or ".join(str(d) for d in dtypes)
    ok_shape = value.dim() == len(shape) and all(s is None or s == n for s, n in zip(shape, value.shape, strict=True))
    if value.dtype not in dtypes or not ok_shape:
        dims = ", ".join("n" if s is None else str(s) for s in shape)
        raise ValueError(
            f"{op}: {name} must be {wanted} of shape [{dims}], got {value.dtype} of shape {list(value.shape)}"
        )
    return _on_device_contiguous(op, name, value, device)


def _on_device_contiguous(op: str, name: str, value: torch.Tensor, device: torch.device) -> torch.Tensor:
    if value.device != device:
        raise ValueError(f"{op}: {name} must be on {device}, got {value.device}")
    if not value.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous, got strides {list(value.stride())}")
    return value


class HighThroughputHalf:
    """A Buffer's high-throughput objects and calls. `finish(stream, async_finish, tensors)` makes the calls'
    EventOverlap; `event_type` is EventOverlap."""

    def __init__(
        self,
        buffer: Any,
        pools: dict[str, int],
        intranode_reason: Optional[str],
        finish: Callable[[torch.cuda.Stream, bool, tuple], Any],
    ) -> None:
        self.buffer = buffer
        self.pools = pools  # bytes per pool: "nvl" (intranode), "rdma" (internode)
        self.intranode_reason = intranode_reason  # why the intranode object is not possible, or None
        self.finish = finish
        self.entries: dict[tuple, _Entry] = {}

    # ----------------------------------------------------------------------------------------------------

    def _streams(self, op: str, previous_event: Any, async_finish: bool, allocate_on_comm_stream: bool):
        """(stream the call runs on, stream its outputs belong to). As DeepEP: with async_finish the kernels run
        on the comm stream, which first waits for previous_event (or the current stream); without it they run
        on the current stream after previous_event."""
        flag(op, "async_finish", async_finish)
        flag(op, "allocate_on_comm_stream", allocate_on_comm_stream)
        # As DeepEP: an EventOverlap without an event (a call without async_finish) is no event to wait for.
        if previous_event is not None and getattr(previous_event, "event", None) is None:
            previous_event = None
        if allocate_on_comm_stream and not (async_finish and previous_event is not None):
            raise ValueError(f"{op}: allocate_on_comm_stream needs async_finish=True and a previous_event")
        current = torch.cuda.current_stream()
        stream = self.buffer.get_comm_stream() if async_finish else current
        if previous_event is not None:
            stream.wait_event(previous_event.event)
        elif async_finish:
            stream.wait_stream(current)
        return stream, current

    def _done(self, stream, current, async_finish: bool, allocate_on_comm_stream: bool, inputs: tuple, outputs: tuple):
        """The EventOverlap of a call; outputs made on the comm stream and used on the current one are marked so,
        as DeepEP marks them (the caching allocator then keeps them until the current stream is done with them)."""
        if async_finish:
            for t in outputs:
                if isinstance(t, torch.Tensor) and t.numel() > 0:
                    t.record_stream(current)
        return self.finish(stream, async_finish, inputs)

    # ----------------------------------------------------------------------------------------------------

    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: Any = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        op = "get_dispatch_layout"
        device, ranks = self.buffer._device, self.buffer.group_size
        num_experts = self._num_experts(op, num_experts)
        _check(op, "topk_idx", topk_idx, (torch.int64,), (None, None), device)
        stream, current = self._streams(op, previous_event, async_finish, allocate_on_comm_stream)
        with torch.cuda.stream(stream):
            per_tokens, per_rdma, per_expert, in_rank = layout_of(topk_idx, num_experts, ranks, self._nodes())
        outputs = (per_tokens, per_rdma, per_expert, in_rank)
        event = self._done(stream, current, async_finish, allocate_on_comm_stream, (topk_idx,), outputs)
        return per_tokens, per_rdma, per_expert, in_rank, event

    def _num_experts(self, op: str, num_experts: object) -> int:
        ranks = self.buffer.group_size
        integer(op, "num_experts", num_experts, minimum=1)
        if num_experts % ranks != 0:
            raise ValueError(f"{op}: num_experts must be a multiple of the group's {ranks} ranks, got {num_experts}")
        return num_experts

    def _nodes(self) -> int:
        """DeepEP's RDMA ranks: the nodes of the group, where the internode object would serve it."""
        return 1 if self.intranode_reason is None else self.buffer._num_hosts

    # ----------------------------------------------------------------------------------------------------

    def _entry(self, op: str, key: tuple, num_sms: int, m: int) -> _Entry:
        """The object of configuration `key` (experts, top-k, hidden, row bytes, scale bytes), made on first use.
        Every rank makes the same calls, so every decision here depends on the calls alone, never on this rank's
        token count: a new object gets an equal share of its pool beside the objects that hold the pool now
        (configurations that take turns then keep their objects, instead of each evicting the other; one used
        once and given back no longer counts), the idle objects of other configurations, oldest first, giving
        their bytes back as needed."""
        entry = self.entries.get(key)
        if entry is not None:
            if entry.num_sms == num_sms:
                self._require_fits(op, entry, m)
                return entry
            if not entry.idle():
                raise ValueError(
                    f"{op}: config.num_sms={num_sms}, but this configuration's buffer was made for num_sms="
                    f"{entry.num_sms} and holds a dispatch awaiting its combine"
                )
            self.entries.pop(key).destroy()  # remade below with the new num_sms
        pool = "nvl" if self.intranode_reason is None else "rdma"
        budget = self.pools[pool]
        if budget == 0:
            raise ValueError(
                f"{op}: the high-throughput calls need num_nvl_bytes > 0 (every rank on this host, peer memory) or "
                f"num_rdma_bytes > 0 (NVSHMEM); got num_nvl_bytes={self.pools['nvl']}, num_rdma_bytes="
                f"{self.pools['rdma']}"
                + (f" (intranode not possible: {self.intranode_reason})" if self.intranode_reason else "")
            )
        holders = sum(1 for e in self.entries.values() if e.pool == pool)
        share = budget // (holders + 1)
        num_experts, top_k, hidden, row_bytes, scale_bytes = key
        size = self._sizer(num_experts, top_k, hidden, row_bytes, scale_bytes, pool)
        tokens = _most_tokens(size, share) or _most_tokens(size, budget)
        for old_key in list(self.entries):
            if budget - self.buffer._pool_bytes_in_use(pool) >= size(tokens):
                break
            if self.entries[old_key].pool == pool and self.entries[old_key].idle():
                self.entries.pop(old_key).destroy()
        free = budget - self.buffer._pool_bytes_in_use(pool)
        tokens = min(tokens, _most_tokens(size, free))
        if tokens < max(m, 1):
            raise ValueError(
                f"{op}: {m} tokens of this configuration need {size(max(m, 1))} bytes of "
                f"{'num_nvl_bytes' if pool == 'nvl' else 'num_rdma_bytes'}; its share of the {budget} bytes "
                f"(beside {holders} other configurations' buffers) and the {free} free hold {tokens}"
            )
        ranks, rank = self.buffer.group_size, self.buffer.rank
        fields = dict(
            max_num_tokens=tokens,
            num_experts=num_experts,
            experts_per_token=top_k,
            rank=rank,
            world_size=ranks,
            hidden_dim=hidden,
            hidden_dim_bytes=row_bytes,
            hidden_dim_scale_bytes=scale_bytes,
            max_sm_count=num_sms,
        )
        if pool == "nvl":
            a2a = HighThroughputAllToAll.intranode(**fields, group_name=self.buffer.group.group_name)
        else:
            a2a = HighThroughputAllToAll.internode(**fields)
        entry = self.entries[key] = _Entry(a2a, pool, size(tokens), num_sms)
        return entry

    def _sizer(self, num_experts: int, top_k: int, hidden: int, row_bytes: int, scale_bytes: int, pool: str):
        """The buffer bytes of this configuration's object as a function of its tokens per rank."""
        ranks = self.buffer.group_size

        def size(tokens: int) -> int:
            return buffer_bytes(tokens, num_experts, top_k, ranks, hidden, row_bytes, scale_bytes, pool == "rdma")

        return size

    def _require_fits(self, op: str, entry: _Entry, m: int) -> None:
        if m > entry.a2a._fields["max_num_tokens"]:
            raise ValueError(
                f"{op}: {m} tokens, but this configuration's buffer holds {entry.a2a._fields['max_num_tokens']} "
                f"tokens per rank (sized by {'num_nvl_bytes' if entry.pool == 'nvl' else 'num_rdma_bytes'}; "
                "a larger Buffer holds more)"
            )

    # ----------------------------------------------------------------------------------------------------

    def dispatch(
        self,
        x: Union[torch.Tensor, tuple],
        handle: Optional[HighThroughputHandle],
        num_tokens_per_rank: Optional[torch.Tensor],
        num_tokens_per_rdma_rank: Optional[torch.Tensor],
        is_token_in_rank: Optional[torch.Tensor],
        num_tokens_per_expert: Optional[torch.Tensor],
        topk_idx: Optional[torch.Tensor],
        topk_weights: Optional[torch.Tensor],
        expert_alignment: int,
        num_worst_tokens: int,
        config: Optional[Config],
        previous_event: Any,
        async_finish: bool,
        allocate_on_comm_stream: bool,
    ):
        op = "dispatch"
        buffer = self.buffer
        device, ranks = buffer._device, buffer.group_size
        values, scales = self._check_x(op, x)
        m = values.shape[0]
        integer(op, "expert_alignment", expert_alignment, minimum=1)
        integer(op, "num_worst_tokens", num_worst_tokens, minimum=0)
        config = self._config(op, config, buffer.get_dispatch_config)

        if handle is not None:
            return self._cached_dispatch(
                op,
                values,
                scales,
                handle,
                topk_idx,
                topk_weights,
                previous_event,
                async_finish,
                allocate_on_comm_stream,
            )
        if topk_idx is None:
            raise NotImplementedError(
                "expertwire.deep_ep: dispatch without topk_idx (routing by is_token_in_rank alone) is not provided "
                "by this front end"
            )
        for name, value in (
            ("num_tokens_per_rank", num_tokens_per_rank),
            ("is_token_in_rank", is_token_in_rank),
            ("num_tokens_per_expert", num_tokens_per_expert),
            ("topk_weights", topk_weights),
        ):
            if value is None:
                raise ValueError(
                    f"{op}: {name} is required without a handle (get_dispatch_layout makes the first three)"
                )
        _check(op, "topk_idx", topk_idx, (torch.int64,), (m, None), device)
        top_k = topk_idx.shape[1]
        if top_k < 1:
            raise ValueError(f"{op}: topk_idx must have at least one column, got shape {list(topk_idx.shape)}")
        _check(op, "topk_weights", topk_weights, (torch.float32,), (m, top_k), device)
        _check(op, "num_tokens_per_rank", num_tokens_per_rank, (torch.int32,), (ranks,), device)
        _check(op, "is_token_in_rank", is_token_in_rank, (torch.bool,), (m, ranks), device)
        num_experts = num_tokens_per_expert.shape[0] if isinstance(num_tokens_per_expert, torch.Tensor) else 0
        _check(op, "num_tokens_per_expert", num_tokens_per_expert, (torch.int32,), (None,), device)
        num_experts = self._num_experts(op, num_experts)
        nodes = self._nodes()
        if nodes > 1:
            if num_tokens_per_rdma_rank is None:
                raise ValueError(f"{op}: num_tokens_per_rdma_rank is required across {nodes} nodes")
            _check(op, "num_tokens_per_rdma_rank", num_tokens_per_rdma_rank, (torch.int32,), (nodes,), device)
        elif num_tokens_per_rdma_rank is not None:
            raise ValueError(f"{op}: num_tokens_per_rdma_rank must be None within one node (get_dispatch_layout's)")

        hidden = values.shape[1]  # elements: the combine's bf16 rows have as many
        row_bytes = values.shape[1] * values.element_size()
        scale_bytes = 0 if scales is None else 4 * scales.shape[1]
        entry = self._entry(op, (num_experts, top_k, hidden, row_bytes, scale_bytes), config.num_sms, m)
        if entry.awaiting_combine:
            raise ValueError(
                f"{op}: this configuration's last dispatch has not been combined: expertwire's high-throughput "
                "calls alternate, dispatch then combine (a cached dispatch counts as a dispatch)"
            )
        stream, current = self._streams(op, previous_event, async_finish, allocate_on_comm_stream)
        with torch.cuda.stream(stream):
            out = entry.a2a.dispatch(
                values,
                topk_idx,
                topk_weights,
                x_scale=None if scales is None else scales.view(torch.float32),
                num_worst_tokens=num_worst_tokens,
            )
            rows = out.recv_x.shape[0]
            recv_idx = out.recv_topk_idx
            if num_worst_tokens > 0:
                # DeepEP's rows past the received ones name no expert.
                past = torch.arange(rows, device=device) >= out.num_recv_rows.to(torch.int64)
                recv_idx.masked_fill_(past.unsqueeze(1), -1)
        entry.awaiting_combine = True
        counts: list = []
        if num_worst_tokens == 0:
            a = expert_alignment
            counts = [(c + a - 1) // a * a for c in out.num_recv_tokens_per_expert_list]
        recv_scales = None
        if scales is not None:
            recv_scales = out.recv_x_scale if scales.dtype == torch.float32 else out.recv_x_scale.view(scales.dtype)
        # The handle's own routing: a caller may reuse its tensors before a cached dispatch.
        with torch.cuda.stream(stream):
            routing = (topk_idx.clone(), topk_weights.clone())
        new = HighThroughputHandle(entry, out.handle, *routing, rows)
        received = out.recv_x if scales is None else (out.recv_x, recv_scales)
        outputs = (out.recv_x, recv_scales, recv_idx, out.recv_topk_weights)
        inputs = (values, scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert)
        event = self._done(stream, current, async_finish, allocate_on_comm_stream, inputs, outputs)
        return received, recv_idx, out.recv_topk_weights, counts, new, event

    def _cached_dispatch(
        self, op, values, scales, handle, topk_idx, topk_weights, previous_event, async_finish, allocate_on_comm_stream
    ):
        """The dispatch of a handle's layout again (DeepEP's cached mode): the same rows to the same ranks."""
        if topk_idx is not None or topk_weights is not None:
            raise ValueError(f"{op}: topk_idx and topk_weights must be None with a handle (the cached layout)")
        entry = self._live_entry(op, handle)
        m = handle.topk_idx.shape[0]
        if values.shape[0] != m:
            raise ValueError(f"{op}: x must have the handle's {m} tokens, got {values.shape[0]}")
        fields = entry.a2a._fields
        row_bytes = values.shape[1] * values.element_size()
        scale_bytes = 0 if scales is None else 4 * scales.shape[1]
        if (row_bytes, scale_bytes) != (fields["hidden_dim_bytes"], fields["hidden_dim_scale_bytes"]):
            raise ValueError(
                f"{op}: x must have the handle's row and scale bytes ({fields['hidden_dim_bytes']}, "
                f"{fields['hidden_dim_scale_bytes']}), got ({row_bytes}, {scale_bytes})"
            )
        if entry.awaiting_combine:
            raise ValueError(f"{op}: this configuration's last dispatch has not been combined (calls alternate)")
        stream, current = self._streams(op, previous_event, async_finish, allocate_on_comm_stream)
        with torch.cuda.stream(stream):
            out = entry.a2a.dispatch(
                values,
                handle.topk_idx,
                handle.topk_weights,
                x_scale=None if scales is None else scales.view(torch.float32),
                num_worst_tokens=max(handle.num_recv_rows, 1),
            )
        entry.awaiting_combine = True
        handle.native = out.handle  # the same layout; a combine with the handle now follows this dispatch
        recv_x = out.recv_x[: handle.num_recv_rows]
        recv_scales = None
        if scales is not None:
            recv_scales = out.recv_x_scale[: handle.num_recv_rows]
            if scales.dtype != torch.float32:
                recv_scales = recv_scales.view(scales.dtype)
        inputs = (values, scales, handle.topk_idx, handle.topk_weights)
        event = self._done(stream, current, async_finish, allocate_on_comm_stream, inputs, (recv_x, recv_scales))
        received = recv_x if scales is None else (recv_x, recv_scales)
        return received, None, None, None, None, event

    def combine(
        self,
        x: torch.Tensor,
        handle: HighThroughputHandle,
        topk_weights: Optional[torch.Tensor],
        bias: Any,
        config: Optional[Config],
        previous_event: Any,
        async_finish: bool,
        allocate_on_comm_stream: bool,
    ):
        op = "combine"
        device = self.buffer._device
        if bias is not None:
            raise NotImplementedError(
                "expertwire.deep_ep: combine(bias=...) (biases added before the output's rounding) is not provided "
                "by this front end"
            )
        self._config(op, config, self.buffer.get_combine_config)
        entry = self._live_entry(op, handle)
        if not entry.awaiting_combine:
            raise ValueError(f"{op}: this configuration's last dispatch was combined already (calls alternate)")
        hidden = entry.a2a._fields["hidden_dim"]
        _check(op, "x", x, (torch.bfloat16,), (handle.num_recv_rows, hidden), device)
        top_k = handle.topk_idx.shape[1]
        if topk_weights is not None:
            _check(op, "topk_weights", topk_weights, (torch.float32,), (handle.num_recv_rows, top_k), device)
        stream, current = self._streams(op, previous_event, async_finish, allocate_on_comm_stream)
        try:
            with torch.cuda.stream(stream):
                if topk_weights is None:
                    combined, combined_weights = entry.a2a.combine(x, handle.native), None
                else:
                    combined, combined_weights = entry.a2a.combine(x, handle.native, topk_weights=topk_weights)
        finally:
            entry.awaiting_combine = False
        event = self._done(
            stream, current, async_finish, allocate_on_comm_stream, (x, topk_weights), (combined, combined_weights)
        )
        return combined, combined_weights, event

    # ----------------------------------------------------------------------------------------------------

    def _check_x(self, op: str, x: object) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        device = self.buffer._device
        if isinstance(x, tuple):
            if len(x) != 2:
                raise ValueError(f"{op}: x as a tuple must be (fp8 values, scales), got {len(x)} entries")
            values, scales = x
            if not isinstance(values, torch.Tensor) or values.dim() != 2 or values.element_size() != 1:
                got = f"{values.dtype} of shape {list(values.shape)}" if isinstance(values, torch.Tensor) else values
                raise ValueError(f"{op}: x[0] must be 2-D values of one byte (torch.float8_e4m3fn), got {got}")
            if (
                not isinstance(scales, torch.Tensor)
                or scales.dtype not in (torch.float32, torch.int32)
                or scales.dim() != 2
                or scales.shape[0] != values.shape[0]
            ):
                got = f"{scales.dtype} of shape {list(scales.shape)}" if isinstance(scales, torch.Tensor) else scales
                raise ValueError(
                    f"{op}: x[1] must be float32 or int32 scales [{values.shape[0]}, num_scales], got {got}"
                )
            if scales.device != device:
                raise ValueError(f"{op}: x[1] must be on {device}, got {scales.device}")
        else:
            values, scales = x, None
            if not isinstance(values, torch.Tensor) or values.dim() != 2:
                got = f"shape {list(values.shape)}" if isinstance(values, torch.Tensor) else type(values).__name__
                raise ValueError(
                    f"{op}: x must be a 2-D tensor [num_tokens, hidden] or a (values, scales) tuple, got {got}"
                )
        _on_device_contiguous(op, "x", values, device)
        if values.shape[1] * values.element_size() % 16 != 0:
            raise ValueError(
                f"{op}: x's rows must be a multiple of 16 bytes, got {values.shape[1]} x {values.element_size()}"
            )
        return values, scales

    def _config(self, op: str, config: Optional[Config], default: Callable[[int], Config]) -> Config:
        if config is None:
            return default(self.buffer.group_size)
        if not isinstance(config, Config):
            raise ValueError(f"{op}: config must be a deep_ep Config, got {type(config).__name__}")
        return config

    def _live_entry(self, op: str, handle: object) -> _Entry:
        if not isinstance(handle, HighThroughputHandle):
            raise ValueError(f"{op}: handle must be the handle dispatch returned, got {type(handle).__name__}")
        entry = handle.entry
        if entry not in self.entries.values() or entry.generation != handle.generation:
            raise ValueError(
                f"{op}: the handle's buffer was released (another configuration took its bytes, or destroy())"
            )
        return entry

    def bytes_in_use(self, pool: str) -> int:
        return sum(e.symmetric_bytes for e in self.entries.values() if e.pool == pool)

    def release_idle(self, pool: str) -> None:
        for key in list(self.entries):
            if self.entries[key].pool == pool and self.entries[key].idle():
                self.entries.pop(key).destroy()

    def destroy(self) -> None:
        for entry in self.entries.values():
            entry.destroy()
        self.entries.clear()


def _most_tokens(size: Callable[[int], int], free: int) -> int:
    """The largest token count whose buffer fits `free` bytes (0 if none does); size grows with the tokens."""
    if size(1) > free:
        return 0
    low, high = 1, 2
    while high < (1 << 20) and size(high) <= free:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if size(middle) <= free:
            low = middle
        else:
            high = middle
    return low


def layout_of(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_nodes: int
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """DeepEP's dispatch layout of topk_idx [n, k] (-1: no expert), with torch operations on its device and no
    host synchronization: tokens per rank (int32 [ranks]), per node ([nodes], None for one node), per expert
    (int32 [experts]) and whether each token goes to each rank (bool [n, ranks])."""
    n = topk_idx.shape[0]
    local = num_experts // num_ranks
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    ranks = torch.where(valid, topk_idx // local, num_ranks)
    in_rank = torch.zeros((n, num_ranks + 1), dtype=torch.bool, device=topk_idx.device)
    in_rank.scatter_(1, ranks, True)
    in_rank = in_rank[:, :num_ranks].contiguous()
    per_rank = in_rank.sum(0, dtype=torch.int32)
    experts = torch.where(valid, topk_idx, num_experts).flatten()
    per_expert = torch.zeros(num_experts + 1, dtype=torch.int32, device=topk_idx.device)
    per_expert.scatter_add_(0, experts, torch.ones_like(experts, dtype=torch.int32))
    per_node = None
    if num_nodes > 1:
        per_node = in_rank.view(n, num_nodes, num_ranks // num_nodes).any(2).sum(0, dtype=torch.int32)
    return per_rank, per_node, per_expert[:num_experts].contiguous(), in_rank
