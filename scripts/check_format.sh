#!/usr/bin/env bash
# The format check CI runs: C++/CUDA sources against .clang-format (clang-format 14.0.6) and Python against ruff's
# lint and format rules (pyproject.toml), both the versions scripts/python-deps.txt pins (group ci).
#   bash scripts/check_format.sh         check; lists what differs and exits non-zero
#   bash scripts/check_format.sh --fix   rewrite the files instead
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh ci >/dev/null
. scripts/env.sh
mapfile -t sources < <(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh')
if [ "${1:-}" = --fix ]; then
  clang-format -i --style=file "${sources[@]}"
  ruff check --fix src tests scripts
  ruff format src tests scripts
  exit 0
fi
status=0
clang-format --dry-run -Werror --style=file "${sources[@]}" || status=1
ruff check src tests scripts || status=1
ruff format --check src tests scripts || status=1
if [ "$status" -ne 0 ]; then
  echo "check_format: sources differ from their format; bash scripts/check_format.sh --fix rewrites them" >&2
else
  echo "check_format: ${#sources[@]} C++/CUDA files and the Python sources are formatted"
fi
exit "$status"
