"""CPU-only: what a new user meets before any GPU work. The set-up scripts stop with a message naming what is
missing; the package imports and exits without warnings; NVSHMEM's helpers and the constructors raise an
exception naming the mistake instead of aborting the process."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import expertwire
from expertwire import AllToAll

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def bare_env(path: str) -> dict[str, str]:
    """An environment with only `path` to find commands on, no active virtual environment and no CUDA_HOME."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "CUDA_HOME", "CUDACXX")}
    env["PATH"] = path
    env["EXPERTWIRE_PYTHON"] = sys.executable
    return env


def test_install_deps_names_a_missing_cuda_toolkit(tmp_path: Path) -> None:
    env = {**bare_env("/usr/bin:/bin"), "CUDA_HOME": str(tmp_path / "no-cuda")}
    result = run(["bash", "scripts/install_deps.sh"], env)
    assert result.returncode != 0
    assert "install_deps: no CUDA compiler" in result.stderr
    assert "expertwire needs the CUDA 13 toolkit" in result.stderr


def test_install_deps_refuses_a_cuda_12_compiler(tmp_path: Path) -> None:
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    fake.chmod(0o755)
    result = run(["bash", "scripts/install_deps.sh"], bare_env(f"{tmp_path}:/usr/bin:/bin"))
    assert result.returncode != 0
    assert f"nvcc at {fake} is CUDA 12.4; expertwire needs the CUDA 13 toolkit" in result.stderr


def test_cmake_names_a_missing_cuda_compiler(tmp_path: Path) -> None:
    result = run(["cmake", "-S", str(ROOT / "csrc"), "-B", str(tmp_path)], bare_env("/usr/bin:/bin"))
    assert result.returncode != 0
    assert "expertwire: no CUDA compiler found" in " ".join(result.stderr.split())


def test_env_uses_the_active_virtual_environment_else_the_projects() -> None:
    script = ". scripts/env.sh; echo $EW_PYTHON"
    env = {**bare_env("/usr/bin:/bin")}
    del env["EXPERTWIRE_PYTHON"]
    active = run(["bash", "-c", script], {**env, "VIRTUAL_ENV": sys.prefix})
    assert active.stdout.strip() == f"{sys.prefix}/bin/python3"
    none = run(["bash", "-c", script], env)
    if run(["bash", "-c", "command -v python3"], env).returncode == 0:
        system_is_venv = run(["python3", "-c", "import sys; sys.exit(sys.prefix == sys.base_prefix)"], env)
        if system_is_venv.returncode == 0:
            pytest.skip("the system's python3 runs inside a virtual environment (it is used as the active one)")
    assert none.stdout.strip() == f"{ROOT}/.venv/bin/python3"


def test_python_deps_pin_what_they_install() -> None:
    """Every package the set-up installs has a version pin; the check reports installed versions it accepts."""
    check = run([sys.executable, "scripts/check_python_deps.py", "build", "test"], dict(os.environ))
    assert check.returncode == 0
    for line in (ROOT / "scripts/python-deps.txt").read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            name, pinned, _, _ = fields
            assert pinned[0].isdigit(), f"{name} has no pinned version"
    assert "install_deps: torch" in check.stderr


def test_import_and_exit_print_no_warnings() -> None:
    """No 'Failed to initialize NumPy' on import, no nanobind leak report for an object alive at exit."""
    code = "import expertwire; config = expertwire.reference.AllToAllConfig(8, 8, 2, 0, 4, 1, 256, 256, 8)"
    result = run([sys.executable, "-W", "error", "-c", code], dict(os.environ))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_nvshmem_init_refuses_an_empty_unique_id() -> None:
    """Forgetting the broadcast used to abort the process inside NVSHMEM."""
    with pytest.raises(ValueError, match=r"the unique id is empty .* broadcast it to every rank before init"):
        expertwire.nvshmem_init(expertwire.nvshmem_alloc_empty_unique_id(), 0, 1)


@pytest.mark.parametrize(
    "rank, world_size, message",
    [
        (0, 0, "NVSHMEM init: world_size must be > 0, got 0"),
        (1, 1, r"NVSHMEM init: rank must be in \[0, 1\), got 1"),
        ("0", 1, "nvshmem_init: rank must be an int, got str '0'"),
    ],
)
def test_nvshmem_init_names_a_bad_rank_or_world_size(rank: object, world_size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        expertwire.nvshmem_init(expertwire.nvshmem_get_unique_id(), rank, world_size)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "call",
    [expertwire.nvshmem_barrier_all, expertwire.nvshmem_my_pe, expertwire.nvshmem_n_pes],
    ids=lambda f: f.__name__,
)
def test_nvshmem_helpers_before_init_raise(call: object) -> None:
    """nvshmem_barrier_all() used to abort; nvshmem_my_pe() and nvshmem_n_pes() returned 0."""
    with pytest.raises(RuntimeError, match="NVSHMEM is not initialized: call nvshmem_init_with_unique_id"):
        call()  # type: ignore[operator]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU driver")
def test_no_driver_is_named_as_such_without_build_paths() -> None:
    with pytest.raises(RuntimeError) as raised:
        AllToAll.internode(8, 8, 2, 0, 1, 1, 128, 128, 0)
    message = str(raised.value)
    assert "no NVIDIA driver is installed on this machine" in message
    assert "insufficient" not in message and ".h:" not in message and ".cpp:" not in message


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_sm_count": -1}, "AllToAll.internode: max_sm_count must be in [0, 4294967295], got -1"),
        ({"max_sm_count": 2**33}, "AllToAll.internode: max_sm_count must be in [0, 4294967295], got 8589934592"),
        (
            {"max_num_tokens": 2**70},
            "AllToAll.internode: max_num_tokens must be in [-9223372036854775808, 9223372036854775807], got "
            + str(2**70),
        ),
        ({"max_sm_count": 1.5}, "AllToAll.internode: max_sm_count must be an int, got float 1.5"),
        ({"max_num_tokens": "8"}, "AllToAll.internode: max_num_tokens must be an int, got str '8'"),
        ({"hidden_dim": None}, "AllToAll.internode: hidden_dim must be an int, got NoneType None"),
    ],
)
def test_bad_scalar_arguments_are_value_errors_naming_them(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = dict(
        max_num_tokens=8,
        num_experts=8,
        experts_per_token=2,
        rank=0,
        world_size=1,
        dp_size=1,
        hidden_dim=128,
        hidden_dim_bytes=128,
        hidden_dim_scale_bytes=0,
    )
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        AllToAll.internode(**{**args, **kwargs})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "cuda, message",
    [
        (None, r"this torch 2\.11\.0 is a CPU-only build"),
        ("12.8", r"this torch 2\.11\.0 is built for CUDA 12\.8"),
    ],
)
def test_import_names_a_torch_without_cuda_13(cuda: "str | None", message: str) -> None:
    """A CUDA 12 or CPU-only torch satisfies torch>=2.4 but cannot load the extension's CUDA 13 runtime."""
    from expertwire._native import require_cuda_torch

    require_cuda_torch("2.11.0+cu130", "13.0")
    with pytest.raises(ImportError, match=r"expertwire needs a CUDA 13 build of torch .*" + message):
        require_cuda_torch("2.11.0", cuda)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
@pytest.mark.parametrize("program", ["test_all_to_all", "test_failures", "test_nvshmem_signal", "bench_all_to_all"])
def test_every_test_binary_exits_77_when_it_skips(program: str) -> None:
    """Run directly (no mpirun, no run_ranks.sh), as README's building by hand allows; ctest's SKIP_RETURN_CODE."""
    binary = ROOT / "build" / program
    if not binary.is_file():
        pytest.skip(f"{binary} is not built (bash scripts/device/build.sh)")
    result = run([str(binary)], dict(os.environ))
    assert result.returncode == 77, result.stdout + result.stderr
    assert f"{program}: SKIPPED: no CUDA device visible" in result.stdout


def test_install_deps_refuses_a_system_managed_python() -> None:
    """pip refuses such a Python (externally-managed-environment); the set-up says so and what to do instead."""
    system = Path("/usr/bin/python3")
    managed = (
        system.is_file()
        and run(
            [
                str(system),
                "-c",
                "import os, sys, sysconfig; sys.exit(not (sys.prefix == sys.base_prefix and os.path.isfile("
                "os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED'))))",
            ],
            dict(os.environ),
        ).returncode
        == 0
    )
    if not managed:
        pytest.skip("this machine has no system-managed /usr/bin/python3")
    env = {**dict(os.environ), "EXPERTWIRE_PYTHON": str(system)}
    env.pop("VIRTUAL_ENV", None)
    result = run(["bash", "scripts/install_deps.sh", "build"], env)
    assert result.returncode != 0
    assert "is a Python the system manages (EXTERNALLY-MANAGED): pip may not install" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_nvshmem_init_without_a_gpu_says_why() -> None:
    """NVSHMEM returns success without initializing there; every later helper would then say "not initialized"."""
    code = (
        "import expertwire\n"
        "try:\n"
        "    expertwire.nvshmem_init(expertwire.nvshmem_get_unique_id(), 0, 1)\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    result = run([sys.executable, "-c", code], dict(os.environ))
    assert "NVSHMEM init: NVSHMEM did not initialize on rank 0 (no NVIDIA driver is installed" in result.stdout, (
        result.stdout + result.stderr
    )


def _two_groups(world: str, command: list[str], **extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", MASTER_PORT="29611", **extra)  # no GPU: no MPS daemon
    return run(["bash", "scripts/device/two_groups.sh", world, *command], env)


PRINT_NODE = [
    sys.executable,
    "-c",
    "import os, socket; e = os.environ; "
    "print('node', e['NODE_RANK'], e['WORLD_SIZE'], e['WORLD_LOCAL_SIZE'], e['MASTER_ADDR'], e['MASTER_PORT'], "
    "socket.gethostname())",
]


def test_two_groups_starts_nodes_0_and_1_of_one_job() -> None:
    result = _two_groups("4", PRINT_NODE)
    assert result.returncode == 0, result.stderr + result.stdout
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("[node"))
    assert [line.split()[:8] for line in lines] == [
        ["[node", "0]", "node", "0", "4", "2", "127.0.0.1", "29611"],
        ["[node", "1]", "node", "1", "4", "2", "127.0.0.1", "29611"],
    ], result.stdout


def test_two_groups_fails_when_a_group_fails_and_refuses_an_odd_world() -> None:
    failing = _two_groups("2", ["bash", "-c", '[ "$NODE_RANK" = 0 ]'])
    assert failing.returncode != 0 and "node 1 exit 1" in failing.stdout, failing.stdout
    odd = _two_groups("3", ["true"])
    assert odd.returncode == 2 and "even number" in odd.stderr


def test_two_groups_gives_each_group_a_host_name_of_its_own() -> None:
    probe = subprocess.run(["unshare", "--uts", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare --uts is not allowed here: {probe.stderr.decode().strip()}")
    result = _two_groups("2", PRINT_NODE, TWO_GROUPS_UTS="1")
    assert result.returncode == 0, result.stderr + result.stdout
    names = sorted(line.split()[-1] for line in result.stdout.splitlines() if line.startswith("[node"))
    assert names == ["expertwire-node0", "expertwire-node1"], result.stdout
    # The name resolves (bootstraps look their host up), and the bootstraps are pointed at the loopback interface.
    resolve = "import os, socket; print(socket.gethostbyname(socket.gethostname()), os.environ['GLOO_SOCKET_IFNAME'])"
    resolved = _two_groups("2", [sys.executable, "-c", resolve], TWO_GROUPS_UTS="1")
    assert resolved.returncode == 0, resolved.stderr + resolved.stdout
    assert sorted(line.split()[2:] for line in resolved.stdout.splitlines() if line.startswith("[node")) == [
        ["127.0.0.1", "lo"],
        ["127.0.0.1", "lo"],
    ], resolved.stdout


def test_two_groups_gives_each_group_a_dev_shm_of_its_own() -> None:
    probe = subprocess.run(["unshare", "--uts", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare --uts --mount is not allowed here: {probe.stderr.decode().strip()}")
    # NVSHMEM's host-memory heap has one name on every host: each group must see its own /dev/shm, not the
    # machine's, and not the other group's.
    with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="expertwire-probe-") as machine_file:
        name = os.path.basename(machine_file.name)
        look = f"touch /dev/shm/group-$NODE_RANK; sleep 1; echo seen $(ls /dev/shm | grep -c -e {name} -e group-)"
        private = _two_groups("2", ["bash", "-c", look], TWO_GROUPS_UTS="1")
        assert private.returncode == 0, private.stderr + private.stdout
        assert [line.split()[2:] for line in private.stdout.splitlines() if line.startswith("[node")] == [
            ["seen", "1"],
            ["seen", "1"],
        ], private.stdout
        try:
            shared = _two_groups("2", ["bash", "-c", look], TWO_GROUPS_UTS="1", TWO_GROUPS_PRIVATE_SHM="0")
        finally:
            for node in (0, 1):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(f"/dev/shm/group-{node}")
        assert shared.returncode == 0, shared.stderr + shared.stdout
        assert [line.split()[2:] for line in shared.stdout.splitlines() if line.startswith("[node")] == [
            ["seen", "3"],
            ["seen", "3"],
        ], shared.stdout


def test_check_all_to_all_refuses_an_unknown_check() -> None:
    env = dict(os.environ, NODE_RANK="0", WORLD_SIZE="2", WORLD_LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1")
    result = run([sys.executable, "-m", "tests.check_all_to_all", "--checks", "low-latency,no-such-check"], env)
    assert result.returncode == 2 and "unknown checks ['no-such-check']" in result.stderr, result.stderr


def test_kill_rank_checks_its_arguments_and_skips_without_a_gpu() -> None:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    bad = run([sys.executable, "-m", "tests.kill_rank", "--steps", "4", "--kill-step", "4"], env)
    assert bad.returncode == 2 and "--kill-step must be in [0, --steps - 1 = 3), got 4" in bad.stderr, bad.stderr
    skipped = run(
        [
            sys.executable,
            "-m",
            "tests.kill_rank",
            "--kind",
            "high-throughput",
            "--ranks",
            "2",
            "--transport",
            "internode",
        ],
        env,
    )
    assert skipped.returncode == 0, skipped.stderr
    assert "kill_rank: internode skipped: no GPU visible" in skipped.stdout, skipped.stdout


def test_survive_rank_checks_its_arguments_and_skips_without_a_gpu() -> None:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    bad = run([sys.executable, "-m", "tests.survive_rank", "--steps", "6", "--kill-step", "2"], env)
    assert bad.returncode == 2 and "--kill-step must be in [0, --steps - 4 = 2), got 2" in bad.stderr, bad.stderr
    few = run([sys.executable, "-m", "tests.survive_rank", "--ranks", "2"], env)
    assert few.returncode == 2 and "--ranks must be >= 3" in few.stderr, few.stderr
    kind = run([sys.executable, "-m", "tests.survive_rank", "--kind", "padded"], env)
    assert kind.returncode == 2 and "invalid choice: 'padded'" in kind.stderr, kind.stderr
    for kind in ("low-latency", "high-throughput"):
        skipped = run(
            [sys.executable, "-m", "tests.survive_rank", "--kind", kind, "--ranks", "4", "--transport", "all"], env
        )
        assert skipped.returncode == 0, skipped.stderr
        for transport in ("internode", "intranode"):
            assert f"survive_rank: {transport} skipped: no GPU visible" in skipped.stdout, skipped.stdout


def test_mps_client_shim_runs_one_client_at_a_time(tmp_path: Path) -> None:
    # A stand-in for the real client that records when each command starts and ends.
    real = tmp_path / "real-mps-control"
    log = tmp_path / "log"
    real.write_text(f'#!/usr/bin/env bash\necho "start $(cat)" >> {log}\nsleep 0.2\necho end >> {log}\n')
    real.chmod(0o755)
    env = dict(os.environ, EXPERTWIRE_REAL_MPS_CONTROL=str(real), CUDA_MPS_PIPE_DIRECTORY=str(tmp_path))
    shim = str(ROOT / "scripts/device/mps_client/nvidia-cuda-mps-control")
    clients = [subprocess.Popen([shim], stdin=subprocess.PIPE, env=env, text=True) for _ in range(4)]
    for i, client in enumerate(clients):  # every input first: a client waiting for the lock reads none yet
        assert client.stdin is not None
        client.stdin.write(f"get_server_list {i}")
        client.stdin.close()
    for client in clients:
        assert client.wait(timeout=30) == 0
    lines = log.read_text().split("\n")[:-1]
    # Each command ran to its end before the next one started, and each got its input.
    assert [line.split()[0] for line in lines] == ["start", "end"] * 4, lines
    assert sorted(line for line in lines if line.startswith("start")) == [
        f"start get_server_list {i}" for i in range(4)
    ]
