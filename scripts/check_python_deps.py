"""Compares the installed Python packages with scripts/python-deps.txt.

    python3 scripts/check_python_deps.py GROUP...    e.g. build test

Prints one line a package (kept, or to be installed, and why) on stderr, and on stdout the `name==pinned`
requirements that pip must install: those missing, or installed at a version the file does not accept.
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

DEPS = Path(__file__).resolve().parent / "python-deps.txt"


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: "2.11.0+cu130" -> (2, 11, 0), "3.0.0rc1" -> (3, 0, 0)."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in match.group(0).split("."))


def padded(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)), b + (0,) * (width - len(b))


def accepts(spec: str, version: str) -> bool:
    """Whether `version` meets every clause of `spec`, e.g. ">=3.4.5,<4" (operators >=, <=, >, <, ==)."""
    have = release(version)
    for clause in spec.split(","):
        match = re.fullmatch(r"(>=|<=|==|>|<)(\S+)", clause.strip())
        if match is None:
            raise ValueError(f"{DEPS.name}: bad version clause {clause!r}")
        op, bound = match.groups()
        a, b = padded(have, release(bound))
        ok = {">=": a >= b, "<=": a <= b, "==": a == b, ">": a > b, "<": a < b}[op]
        if not ok:
            return False
    return True


def torch_problem() -> str | None:
    """Why the installed torch cannot load expertwire's extension, if it cannot: it needs torch's CUDA 13
    runtime (libcudart.so.13), which a CPU-only or CUDA 12 build of torch does not ship."""
    try:
        import torch
    except Exception as error:  # a broken install reads as missing
        return f"it does not import ({error})"
    cuda = torch.version.cuda
    if cuda is None:
        return "it is a CPU-only build (expertwire needs a CUDA 13 build)"
    if release(cuda)[0] != 13:
        return f"it is built for CUDA {cuda} (expertwire needs a CUDA 13 build)"
    return None


def main(groups: list[str]) -> int:
    wanted = []
    for line in DEPS.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 4:
            print(f"{DEPS.name}: expected 'package pinned accepted group', got {line!r}", file=sys.stderr)
            return 2
        name, pinned, spec, group = fields
        if group not in groups:
            continue
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            print(f"install_deps: {name}: not installed; installing {pinned}", file=sys.stderr)
            wanted.append(f"{name}=={pinned}")
            continue
        problem = None if accepts(spec, version) else f"{version} is not {spec}"
        if problem is None and name == "torch":
            problem = torch_problem()
        if problem is not None:
            print(f"install_deps: {name}: {problem}; installing {pinned}", file=sys.stderr)
            wanted.append(f"{name}=={pinned}")
        else:
            print(f"install_deps: {name} {version}: installed (accepted: {spec})", file=sys.stderr)
    print("\n".join(wanted))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
