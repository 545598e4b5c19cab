#!/usr/bin/env bash
# Checks expertwire as another CMake project uses it (ctest runs it; no GPU needed):
#   check.sh installed BUILD_DIR SOURCE_DIR      cmake --install, then a consumer that find_package()s it, links
#                                                expertwire::expertwire and runs
#   check.sh subdirectory BUILD_DIR SOURCE_DIR   a project of CUDA architecture 75 that add_subdirectory()s it
#                                                must leave expertwire's targets at their own (configure only)
set -euo pipefail
mode=$1 build=$2 source=$3
work=$build/consumer/$mode
rm -rf "$work"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
case $mode in
  installed)
    cmake --install "$build" --prefix "$build/consumer/prefix" --component cpp >/dev/null
    cmake -S "$source/tests/consumer/installed" -B "$work" "${generator[@]}" \
      -DCMAKE_PREFIX_PATH="$build/consumer/prefix" >/dev/null
    cmake --build "$work" >/dev/null
    "$work/expertwire_consumer"
    ;;
  subdirectory)
    cmake -S "$source/tests/consumer/subdirectory" -B "$work" "${generator[@]}" -DEXPERTWIRE_SOURCE_DIR="$source" |
      grep -E "expertwire|consumer"
    ;;
  *)
    echo "usage: check.sh installed|subdirectory BUILD_DIR SOURCE_DIR" >&2
    exit 2
    ;;
esac
