"""CPU-only: the package imports with NVSHMEM found, matches pplx_kernels' API, registers its ops for
torch.compile and CUDA graphs, and refuses calls on a destroyed object."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import expertwire
from expertwire.all_to_all import AllToAll, _resolve_group

from .distributed import free_port
from .test_checks import SHAPE, combine_args, dispatch_args

PPLX_CONFIG_ARGS = [
    "max_num_tokens",
    "num_experts",
    "experts_per_token",
    "rank",
    "world_size",
    "dp_size",
    "hidden_dim",
    "hidden_dim_bytes",
    "hidden_dim_scale_bytes",
]


class NativeStub:
    """Stands in for the native object, which needs a GPU to exist."""

    device = 0

    def __init__(self) -> None:
        self.destroyed = False

    def destroy(self) -> None:
        self.destroyed = True


def parameters(fn: Any) -> list[str]:
    return [name for name in inspect.signature(fn).parameters if name not in ("self", "cls")]


def test_import_finds_nvshmem() -> None:
    assert (expertwire._native.NVSHMEM_LIBRARY_DIR / "libnvshmem_host.so.3").is_file()
    assert expertwire.nvshmem_unique_id_size() > 0
    assert issubclass(expertwire.DeviceError, RuntimeError)


def test_api_is_argument_for_argument_pplx_kernels() -> None:
    # pplx_kernels' arguments, then expertwire's keyword-only force_puts and fault_tolerant.
    assert parameters(AllToAll.internode) == [*PPLX_CONFIG_ARGS, "max_sm_count", "force_puts", "fault_tolerant"]
    assert parameters(AllToAll.intranode) == [*PPLX_CONFIG_ARGS, "group_name", "max_sm_count", "fault_tolerant"]
    for factory, names in (
        (AllToAll.internode, ("force_puts", "fault_tolerant")),
        (AllToAll.intranode, ("fault_tolerant",)),
    ):
        for name in names:
            option = inspect.signature(factory).parameters[name]
            assert option.kind == inspect.Parameter.KEYWORD_ONLY and option.default is False, (factory, name)
    assert inspect.signature(AllToAll.intranode).parameters["group_name"].default == "default"
    assert parameters(AllToAll.dispatch) == [
        "out_expert_num_tokens",
        "out_expert_x",
        "out_expert_x_scale",
        "dp_x",
        "dp_x_scale",
        "indices",
        "bound_m",
        "do_send",
        "do_recv",
        "fp8_cast",  # expertwire's, keyword-only
    ]
    fp8_cast = inspect.signature(AllToAll.dispatch).parameters["fp8_cast"]
    assert fp8_cast.kind == inspect.Parameter.KEYWORD_ONLY and fp8_cast.default == "none"
    assert parameters(AllToAll.combine) == [
        "out_tokens",
        "indices",
        "weights",
        "expert_y",
        "bound_m",
        "do_send",
        "do_recv",
    ]
    # nvshmem_init takes both of pplx_kernels' forms: August 2025's and the current one.
    assert parameters(expertwire.nvshmem._join_with_uid) == ["uid", "rank", "world_size"]
    assert parameters(expertwire.nvshmem._join_over_torch_distributed) == [
        "global_rank",
        "local_rank",
        "world_size",
        "device",
        "uid",
    ]
    assert inspect.signature(expertwire.nvshmem._join_over_torch_distributed).parameters["uid"].default is None
    assert expertwire.PyTorchStreamWrapper is expertwire.nvshmem.PyTorchStreamWrapper
    for name in (
        "nvshmem_get_unique_id",
        "nvshmem_alloc_empty_unique_id",
        "nvshmem_finalize",
        "nvshmem_my_pe",
        "nvshmem_n_pes",
    ):
        assert callable(getattr(expertwire, name))


def test_unique_id_round_trips_as_a_cpu_uint8_tensor() -> None:
    uid = expertwire.nvshmem_get_unique_id()
    empty = expertwire.nvshmem_alloc_empty_unique_id()
    assert uid.dtype == empty.dtype == torch.uint8
    assert uid.shape == empty.shape == (expertwire.nvshmem_unique_id_size(),)
    assert uid.device.type == empty.device.type == "cpu"


@pytest.mark.parametrize(
    "uid, message",
    [
        (
            torch.zeros(3, dtype=torch.uint8),
            r"uid must be a uint8 tensor of \d+ elements, got torch.uint8 of shape \[3\]",
        ),
        ("bytes", "uid must be a torch.Tensor, got str"),
    ],
)
def test_nvshmem_init_checks_the_uid(uid: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        expertwire.nvshmem_init(uid, 0, 1)  # type: ignore[arg-type]


def test_invalid_configuration_raises_value_error_before_touching_the_gpu() -> None:
    with pytest.raises(ValueError, match="num_experts"):
        AllToAll.internode(8, 7, 2, 0, 2, 1, 128, 256, 0)
    with pytest.raises(ValueError, match="experts_per_token"):
        AllToAll.intranode(8, 8, 9, 0, 2, 1, 128, 256, 0)


def test_calls_after_destroy_raise() -> None:
    native = NativeStub()
    a2a = AllToAll(native, SHAPE, uses_nvshmem=False)  # type: ignore[arg-type]
    a2a.destroy()
    assert native.destroyed
    a2a.destroy()  # idempotent
    with FakeTensorMode():
        d, c = dispatch_args(SHAPE), combine_args(SHAPE)
    with pytest.raises(RuntimeError, match="AllToAll.dispatch: this AllToAll was destroyed"):
        a2a.dispatch(**d)
    with pytest.raises(RuntimeError, match="AllToAll.combine: this AllToAll was destroyed"):
        a2a.combine(**c)
    with pytest.raises(RuntimeError, match="AllToAll.expert_output_buffer: this AllToAll was destroyed"):
        a2a.expert_output_buffer()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn, torch.int16])
def test_expert_output_buffer_takes_16_bit_float_types_only(dtype: torch.dtype) -> None:
    a2a = AllToAll(NativeStub(), SHAPE, uses_nvshmem=False)  # type: ignore[arg-type]
    message = f"expert_output_buffer: dtype must be torch.bfloat16 or torch.float16, got {dtype}"
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        a2a.expert_output_buffer(dtype)
    a2a.destroy()


def test_ops_declare_their_outputs_mutated() -> None:
    dispatch = torch.ops.expertwire.dispatch.default._schema
    combine = torch.ops.expertwire.combine.default._schema
    mutated = {arg.name for arg in dispatch.arguments if arg.alias_info is not None and arg.alias_info.is_write}
    assert mutated == {"out_expert_num_tokens", "out_expert_x", "out_expert_x_scale"}
    mutated = {arg.name for arg in combine.arguments if arg.alias_info is not None and arg.alias_info.is_write}
    assert mutated == {"out_tokens"}


def test_dispatch_and_combine_trace_as_single_ops() -> None:
    """What torch.compile's tracer sees: one node per call, through the fake implementations, on fake CUDA tensors
    (the GPU tests run torch.compile itself)."""
    a2a = AllToAll(NativeStub(), SHAPE, uses_nvshmem=False)  # type: ignore[arg-type]
    with FakeTensorMode():
        d, c = dispatch_args(SHAPE), combine_args(SHAPE)
    names = ["out_expert_num_tokens", "out_expert_x", "out_expert_x_scale", "dp_x", "dp_x_scale", "indices", "bound_m"]

    def step(*tensors: torch.Tensor) -> torch.Tensor:
        args = dict(zip(names, tensors, strict=False))
        a2a.dispatch(**args)
        out_tokens, weights, expert_y = tensors[len(names) :]
        a2a.combine(out_tokens, args["indices"], weights, expert_y, args["bound_m"])
        return out_tokens

    graph = make_fx(step, tracing_mode="fake")(*[d[n] for n in names], c["out_tokens"], c["weights"], c["expert_y"])
    code = graph.code
    assert code.count("expertwire.dispatch") == 1 and code.count("expertwire.combine") == 1, code
    a2a.destroy()


@pytest.fixture
def single_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_intranode_finds_its_process_group_by_name(single_rank_group: None) -> None:
    assert _resolve_group("default") is dist.group.WORLD  # pplx_kernels' tests register the world group so
    subgroup = dist.new_group([0])
    assert _resolve_group(subgroup.group_name) is subgroup
    with pytest.raises(ValueError, match="intranode: group_name 'nope' names no process group"):
        _resolve_group("nope")


def test_intranode_rank_and_world_must_match_the_group(single_rank_group: None) -> None:
    with pytest.raises(ValueError, match=r"has 1 ranks and this process is its rank 0, but world_size=2, rank=1"):
        AllToAll.intranode(8, 8, 2, 1, 2, 1, 128, 256, 0)


@pytest.mark.parametrize("value", ["1", "true", "Yes", "ON"])
def test_peer_memory_unavailable_reason_names_nvshmem_disable_p2p(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.delenv("NVSHMEM_DISABLE_P2P", raising=False)
    assert expertwire.peer_memory_unavailable_reason() is None
    monkeypatch.setenv("NVSHMEM_DISABLE_P2P", value)
    reason = expertwire.peer_memory_unavailable_reason()
    assert reason is not None and "NVSHMEM_DISABLE_P2P" in reason and "internode" in reason
    monkeypatch.setenv("NVSHMEM_DISABLE_P2P", "0")
    assert expertwire.peer_memory_unavailable_reason() is None


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 0, 1, 0), "torch.distributed's default group, which is not initialized"),
        ((0, 0, 1, "cpu"), "device must be a CUDA device, got cpu"),
        ((1, 0, 1, 0), "global_rank must be < world_size=1, got 1"),
        ((0, 0, 1, 1.5), "device must be a CUDA device index, a torch.device or an object with device_id"),
        ((0, "0", 1, 0), "local_rank must be an int, got str '0'"),
    ],
)
def test_nvshmem_init_current_form_checks_its_arguments(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        expertwire.nvshmem_init(*args)


def test_nvshmem_init_current_form_by_keyword_and_a_wrong_call() -> None:
    with pytest.raises(ValueError, match="not initialized"):
        expertwire.nvshmem_init(global_rank=0, local_rank=0, world_size=1, device=0)
    with pytest.raises(TypeError, match=r"the forms are nvshmem_init\(uid, rank, world_size\) and"):
        expertwire.nvshmem_init(0, 0)
    with pytest.raises(ValueError, match=r"uid must be a torch.Tensor, got int \(the current form is"):
        expertwire.nvshmem_init(0, 0, 1)


def test_nvshmem_init_current_form_must_match_the_default_group(single_rank_group: None) -> None:
    with pytest.raises(
        ValueError, match="must be this process's rank in torch.distributed's default group, which is rank 0 of 1"
    ):
        expertwire.nvshmem_init(0, 0, 2, 0)


def test_pytorch_stream_wrapper_speaks_the_cuda_stream_protocol() -> None:
    class Stream:
        cuda_stream = 0x1234

    wrapped = expertwire.PyTorchStreamWrapper(Stream())  # type: ignore[arg-type]
    assert wrapped.handle == 0x1234 and wrapped.__cuda_stream__() == (0, 0x1234)
