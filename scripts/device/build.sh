#!/usr/bin/env bash
# Configure and build everything (library, tests, benchmark) into build/ — on the device machine or here.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/env.sh
cmake -S csrc -B build -GNinja -DWITH_TESTS=ON -DWITH_BENCHMARKS=ON ${CMAKE_ARGS:-} >/dev/null
ninja -C build ${NINJA_TARGETS:-}
