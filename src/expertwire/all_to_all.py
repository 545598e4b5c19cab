"""AllToAll: pplx_kernels' Python API, argument for argument, over expertwire's transports."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist

from . import ops
from ._active_ranks import active_ranks_view, set_active_ranks
from ._device_memory import rows_over, tensor_over
from ._native import ext
from .checks import (
    EXPERT_ROW_DTYPES,
    FP8_CASTS,
    AllToAllShape,
    check_combine_tensors,
    check_dispatch_tensors,
    dtype_names,
    flag,
    fp8_cast_code,
    integer,
)


def _resolve_group(group_name: str) -> dist.ProcessGroup:
    """The process group registered under `group_name`; "default" falls back to the world group, which is what
    pplx_kernels' tests register under that name."""
    if not dist.is_initialized():
        raise RuntimeError(
            "AllToAll.intranode exchanges its buffer descriptions through torch.distributed: "
            "call torch.distributed.init_process_group first"
        )
    from torch.distributed import distributed_c10d as c10d

    for group, name in c10d._world.pg_names.items():
        if name == group_name:
            return group
    try:
        return c10d._resolve_process_group(group_name)
    except (RuntimeError, ValueError, KeyError):
        pass
    if group_name == "default" and dist.group.WORLD is not None:
        return dist.group.WORLD
    raise ValueError(f"intranode: group_name {group_name!r} names no process group")


def _intranode_group(group_name: str, world_size: int, rank: int) -> dist.ProcessGroup:
    """The group of an intranode object, whose ranks must be 0..world_size-1 in order with this process as `rank`."""
    group = _resolve_group(group_name)
    group_size, group_rank = dist.get_world_size(group), dist.get_rank(group)
    if group_size != world_size or group_rank != rank:
        raise ValueError(
            f"intranode: process group {group_name!r} has {group_size} ranks and this process is its rank "
            f"{group_rank}, but world_size={world_size}, rank={rank} were given"
        )
    return group


def _all_gather_over(group: dist.ProcessGroup):
    def all_gather(local: bytes) -> list[bytes]:
        gathered: list[Optional[bytes]] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, local, group=group)
        return [entry if entry is not None else b"" for entry in gathered]

    return all_gather


def _traced(tensor: torch.Tensor) -> bool:
    """Whether a call is being traced (torch.compile, make_fx, fake tensors) rather than run: traced calls go
    through the custom ops, so that they appear as single ops; run calls launch directly (ops module)."""
    return torch.compiler.is_compiling() or type(tensor) is not torch.Tensor or torch._C._len_torch_dispatch_stack() > 0


def _launch_dispatch(handle: int, *args: object) -> None:
    """The dispatch launch: through the custom op while traced, else straight to the native call."""
    out_expert_x = args[1]
    (ops.dispatch if _traced(out_expert_x) else ops.launch_dispatch)(handle, *args)  # type: ignore[arg-type]


def _launch_combine(handle: int, *args: object) -> None:
    """The combine launch, as _launch_dispatch."""
    out_tokens = args[0]
    (ops.combine if _traced(out_tokens) else ops.launch_combine)(handle, *args)  # type: ignore[arg-type]


class AllToAll:
    """One MoE all-to-all: dispatch sends tokens to their experts' ranks, combine brings the expert outputs back
    and sums them with the router weights. Create it with AllToAll.internode (NVSHMEM, any number of nodes) or
    AllToAll.intranode (peer memory, one node), on every rank together; destroy() it on every rank together.

    Every operation takes tensors on the CUDA device that was current when it was created, and runs on torch's
    current stream of that device."""

    def __init__(self, native: "ext.AllToAllHandle", shape: AllToAllShape, uses_nvshmem: bool) -> None:
        self._device = torch.device("cuda", native.device)
        self._handle: Optional[int] = ops.register(native, uses_nvshmem)
        self._shape = shape

    @staticmethod
    def _config(
        op: str,
        max_num_tokens: int,
        num_experts: int,
        experts_per_token: int,
        rank: int,
        world_size: int,
        dp_size: int,
        hidden_dim: int,
        hidden_dim_bytes: int,
        hidden_dim_scale_bytes: int,
    ) -> tuple["ext.AllToAllConfig", AllToAllShape]:
        fields = dict(locals())
        for name in (
            "max_num_tokens",
            "num_experts",
            "experts_per_token",
            "rank",
            "world_size",
            "dp_size",
            "hidden_dim",
            "hidden_dim_bytes",
            "hidden_dim_scale_bytes",
        ):
            integer(op, name, fields[name])
        shape = AllToAllShape(
            max_num_tokens=max_num_tokens,
            num_experts=num_experts,
            experts_per_token=experts_per_token,
            world_size=world_size,
            dp_size=dp_size,
            hidden_dim=hidden_dim,
            hidden_dim_bytes=hidden_dim_bytes,
            hidden_dim_scale_bytes=hidden_dim_scale_bytes,
        )
        # The native config validates every field and raises ValueError naming the first bad one.
        config = ext.AllToAllConfig(rank=rank, **dataclasses.asdict(shape))
        return config, shape

    @classmethod
    def internode(
        cls,
        max_num_tokens: int,
        num_experts: int,
        experts_per_token: int,
        rank: int,
        world_size: int,
        dp_size: int,
        hidden_dim: int,
        hidden_dim_bytes: int,
        hidden_dim_scale_bytes: int,
        max_sm_count: int = 0,
        *,
        force_puts: bool = False,
        fault_tolerant: bool = False,
    ) -> "AllToAll":
        """Through NVSHMEM (nvshmem_init first): loads/stores to peers on this node, puts to the others
        (`force_puts`: puts to every peer, as between nodes). `fault_tolerant`: see active_ranks."""
        integer("AllToAll.internode", "max_sm_count", max_sm_count, minimum=0, maximum=2**32 - 1)
        flag("AllToAll.internode", "force_puts", force_puts)
        flag("AllToAll.internode", "fault_tolerant", fault_tolerant)
        config, shape = cls._config(
            "AllToAll.internode",
            max_num_tokens,
            num_experts,
            experts_per_token,
            rank,
            world_size,
            dp_size,
            hidden_dim,
            hidden_dim_bytes,
            hidden_dim_scale_bytes,
        )
        native = ext.AllToAllHandle.internode(
            config, max_sm_count=max_sm_count, force_puts=force_puts, fault_tolerant=fault_tolerant
        )
        return cls(native, shape, uses_nvshmem=True)

    @classmethod
    def intranode(
        cls,
        max_num_tokens: int,
        num_experts: int,
        experts_per_token: int,
        rank: int,
        world_size: int,
        dp_size: int,
        hidden_dim: int,
        hidden_dim_bytes: int,
        hidden_dim_scale_bytes: int,
        group_name: str = "default",
        max_sm_count: int = 0,
        *,
        fault_tolerant: bool = False,
    ) -> "AllToAll":
        """Through peer memory among the ranks of one node; the buffer descriptions are exchanged over the
        torch.distributed group registered as `group_name`, whose ranks must be 0..world_size-1 in order (the
        memory itself travels as file descriptors over a Unix socket, so the ranks must share a host).
        `fault_tolerant`: see active_ranks."""
        integer("AllToAll.intranode", "max_sm_count", max_sm_count, minimum=0, maximum=2**32 - 1)
        flag("AllToAll.intranode", "fault_tolerant", fault_tolerant)
        config, shape = cls._config(
            "AllToAll.intranode",
            max_num_tokens,
            num_experts,
            experts_per_token,
            rank,
            world_size,
            dp_size,
            hidden_dim,
            hidden_dim_bytes,
            hidden_dim_scale_bytes,
        )
        group = _intranode_group(group_name, world_size, rank)
        native = ext.AllToAllHandle.intranode(
            config, _all_gather_over(group), max_sm_count=max_sm_count, fault_tolerant=fault_tolerant
        )
        return cls(native, shape, uses_nvshmem=False)

    @property
    def shape(self) -> AllToAllShape:
        return self._shape

    def _live_handle(self, op: str) -> int:
        if self._handle is None:
            raise RuntimeError(f"AllToAll.{op}: this AllToAll was destroyed; create a new one")
        return self._handle

    def dispatch(
        self,
        out_expert_num_tokens: torch.Tensor,
        out_expert_x: torch.Tensor,
        out_expert_x_scale: Optional[torch.Tensor],
        dp_x: torch.Tensor,
        dp_x_scale: Optional[torch.Tensor],
        indices: torch.Tensor,
        bound_m: Optional[torch.Tensor],
        do_send: bool = True,
        do_recv: bool = True,
        *,
        fp8_cast: str = "none",
    ) -> None:
        """Sends the first bound_m (default: all dp_x.shape[0]) tokens of dp_x to the experts named in `indices`.
        Shapes: out_expert_num_tokens [num_local_experts] int32; out_expert_x [num_local_experts,
        max_num_tokens * world_size / dp_size, hidden_dim_bytes / itemsize] (any dtype: rows move as bytes);
        out_expert_x_scale likewise with hidden_dim_scale_bytes (float32 or uint8); dp_x [m, hidden_dim_bytes /
        itemsize]; dp_x_scale [m, ...]; indices [m, experts_per_token] uint32 (0xFFFFFFFF, -1 as int32: no
        expert in that slot) or int64 (-1: no expert, as DeepEP's topk_idx), read as they are; bound_m [1] uint32
        on the GPU or None.

        fp8_cast (an object of fp8 rows: hidden_dim_bytes = hidden_dim): dp_x is bfloat16 [m, hidden_dim], cast to
        e4m3 with a scale per 128 values on the way, as DeepEP's low-latency dispatch does, and dp_x_scale is
        None. "block-scales": float32 scales amax / 448 (hidden_dim_scale_bytes = hidden_dim / 32);
        "power-of-two-scales": those rounded up to powers of two; "ue8m0-scales": their exponent bytes, four to a
        word (hidden_dim_scale_bytes = hidden_dim / 128)."""
        handle = self._live_handle("dispatch")
        cast = fp8_cast_code("AllToAll.dispatch", fp8_cast)
        # The torch checks here; the rest in the native call, before it launches anything.
        check_dispatch_tensors(
            self._shape,
            out_expert_num_tokens,
            out_expert_x,
            out_expert_x_scale,
            dp_x,
            dp_x_scale,
            indices,
            bound_m,
            device=self._device,
            fp8_cast=cast,
        )
        _launch_dispatch(
            handle,
            out_expert_num_tokens,
            out_expert_x,
            out_expert_x_scale,
            dp_x,
            dp_x_scale,
            indices,
            bound_m,
            do_send,
            do_recv,
            cast,
        )

    def combine(
        self,
        out_tokens: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        expert_y: torch.Tensor,
        bound_m: Optional[torch.Tensor],
        do_send: bool = True,
        do_recv: bool = True,
    ) -> None:
        """Returns expert_y's rows to their tokens' ranks and writes out_tokens[t] = sum_k weights[t, k] *
        y(indices[t, k], t), summed in fp32. Shapes: out_tokens [m or more rows, hidden_dim] float32, bfloat16
        or float16; indices, weights [m, experts_per_token] uint32 or int64 (as dispatch), float32; expert_y
        [num_local_experts, max_recv_tokens, hidden_dim] bfloat16 or float16, or float32 with 16-bit out_tokens
        (its rows are rounded to out_tokens' type before they travel)."""
        handle = self._live_handle("combine")
        check_combine_tensors(self._shape, out_tokens, indices, weights, expert_y, bound_m, device=self._device)
        _launch_combine(handle, out_tokens, indices, weights, expert_y, bound_m, do_send, do_recv)

    def _launch_checked_dispatch(
        self,
        out_expert_num_tokens: torch.Tensor,
        out_expert_x: torch.Tensor,
        out_expert_x_scale: Optional[torch.Tensor],
        dp_x: torch.Tensor,
        indices: torch.Tensor,
        do_send: bool,
        do_recv: bool,
        fp8_cast: str,
    ) -> None:
        """dispatch without its torch checks, for a front end that made the outputs for this object's shape and
        checked the inputs itself (expertwire.deep_ep): those checks cost more host time than the launch. The
        native call still checks pointers, sizes and the call order before it launches."""
        _launch_dispatch(
            self._live_handle("dispatch"),
            out_expert_num_tokens,
            out_expert_x,
            out_expert_x_scale,
            dp_x,
            None,
            indices,
            None,
            do_send,
            do_recv,
            FP8_CASTS.index(fp8_cast),
        )

    def _launch_checked_combine(
        self,
        out_tokens: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        expert_y: torch.Tensor,
        do_send: bool,
        do_recv: bool,
    ) -> None:
        """combine without its torch checks, as _launch_checked_dispatch."""
        _launch_combine(self._live_handle("combine"), out_tokens, indices, weights, expert_y, None, do_send, do_recv)

    def expert_output_buffer(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """expert_y's home in this rank's communication buffer: a [num_local_experts, max_recv_tokens, hidden_dim]
        tensor of `dtype` (bfloat16 or float16) that peers read combine's rows from. Experts that write their
        outputs here (after dispatch's receive half, on the same stream) and pass this tensor as combine's
        expert_y spare combine a copy of every row. Valid until destroy(); not zeroed."""
        if dtype not in EXPERT_ROW_DTYPES:
            raise ValueError(f"expert_output_buffer: dtype must be {dtype_names(EXPERT_ROW_DTYPES)}, got {dtype}")
        native = ops.native(self._live_handle("expert_output_buffer"))
        shape = (self._shape.num_local_experts, self._shape.max_recv_tokens, self._shape.hidden_dim)
        return tensor_over(native.expert_output_buffer, shape, dtype, self._device, owner=native)

    def dispatch_input_buffer(self, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
        """dp_x's home in this rank's communication buffer: a [max_num_tokens, hidden_dim_bytes / itemsize]
        tensor of `dtype` with rows further apart than their bytes (its stride(0)), where the pull dispatch (every peer
        load/store reachable) stages its tokens for peers to read. Tokens written here (their scales into
        dispatch_input_scale_buffer()) and passed to dispatch, the whole tensor or its first m rows, spare dispatch
        a copy of each; the put path reads them as any dp_x. Peers read them until the combine after that
        dispatch: write them after the previous combine's receive half, on the same stream. Valid until destroy();
        not zeroed."""
        native = ops.native(self._live_handle("dispatch_input_buffer"))
        row_bytes = self._shape.hidden_dim_bytes
        itemsize = torch.empty((), dtype=dtype).element_size()
        if row_bytes % itemsize != 0:
            raise ValueError(
                f"dispatch_input_buffer: dtype must have an element size that divides hidden_dim_bytes={row_bytes}, "
                f"got {dtype} ({itemsize} bytes)"
            )
        return rows_over(
            native.dispatch_input_buffer,
            self._shape.max_num_tokens,
            row_bytes,
            native.dispatch_input_row_stride,
            dtype,
            self._device,
            owner=native,
        )

    def dispatch_input_scale_buffer(self) -> Optional[torch.Tensor]:
        """dp_x_scale's home beside dispatch_input_buffer(): a float32 [max_num_tokens, hidden_dim_scale_bytes /
        4] tensor, rows as far apart as the tokens'; None without scales."""
        native = ops.native(self._live_handle("dispatch_input_scale_buffer"))
        if not self._shape.has_scales:
            return None
        return rows_over(
            native.dispatch_input_scale_buffer,
            self._shape.max_num_tokens,
            self._shape.hidden_dim_scale_bytes,
            native.dispatch_input_row_stride,
            torch.float32,
            self._device,
            owner=native,
        )

    @property
    def fault_tolerant(self) -> bool:
        return bool(ops.native(self._live_handle("fault_tolerant")).fault_tolerant)

    @property
    def active_ranks(self) -> torch.Tensor:
        """The fault-tolerant mode's mask: an int32 [world_size] tensor on this rank's GPU, 1 for each rank this
        one still serves with, 0 for each it has masked out. A wait that runs out on a rank (dead, or stopped
        calling) masks that rank instead of raising, the call goes on without it, and before each combine
        returns every rank has the union of the ranks' masks. Every later call leaves the masked ranks out:
        tokens routed to their experts get no rows and add nothing to combine's sums (re-route them, or accept
        the loss), and nothing is sent to or read from them. The kernels write it in stream order: read it after
        the combine. Raises ValueError in the default mode."""
        native = ops.native(self._live_handle("active_ranks"))
        return active_ranks_view(
            "AllToAll.active_ranks",
            native.fault_tolerant,
            native.active_ranks,
            self._shape.world_size,
            self._device,
            native,
        )

    def set_active_ranks(self, mask: torch.Tensor) -> None:
        """Masks out the ranks whose entry of `mask` (int32/int64/bool [world_size], 0 or 1) is 0, from the next
        call on, as a wait that ran out on them would, but without waiting: for a serving layer that learns of a
        dead rank first. Pass the same mask on every surviving rank. A masked rank cannot come back (make a fresh
        object on every rank), nor can a rank mask itself: both raise ValueError. Synchronizes with the GPU to
        check; the ranks are then masked on the current stream (zeros written, nothing else: no rank that a kernel
        masks meanwhile comes back). Unlike a wait that gives up, this tells no other rank: that is the caller's
        part."""
        current = self.active_ranks
        set_active_ranks(current, int(ops.native(self._live_handle("set_active_ranks")).rank), mask)

    def check_errors(self) -> None:
        """Raises expertwire.DeviceError if a kernel of this object recorded an error (a peer that timed out, an
        expert index out of range, bound_m > m). Synchronize the stream first to see the latest call."""
        ops.native(self._live_handle("check_errors")).check_errors()

    def destroy(self) -> None:
        """Frees the buffers. Collective: every rank destroys its object together. Idempotent."""
        if self._handle is None:
            return
        native = ops.unregister(self._handle)
        self._handle = None
        if native is not None:
            native.destroy()
