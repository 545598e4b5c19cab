#!/usr/bin/env bash
# Fill .remote/ (git-excluded) with the libraries of NVSHMEM's UCX and libfabric remote transports, on a machine
# that reaches PyPI and Debian's archive, so that a device machine without network can run the ranks through them
# (scripts/device/remote_transport.sh unpacks them there):
#   bash scripts/device/fetch_remote_libs.sh          then carry .remote with the command
#   .remote/ucx-<version>-cu13.tar.gz   UCX's shared libraries, its module folder (lib/ucx: cma, cuda) and ucx_info,
#                                       from the libucx-cu13 wheel (the wheel is 43 MB; the static libraries, headers
#                                       and ucx_perftest's CUDA module are left out)
#   .remote/deb/*.deb                   libfabric1, libfabric-bin (fi_info) and the shared libraries libfabric1
#                                       links (rdma-core's libibverbs, librdmacm, libefa; libpsm2; libpsm-infinipath;
#                                       libnl; libnuma; libatomic), from this machine's apt sources
#   .remote/MANIFEST.txt                what each file is, with its sha256
# Env: UCX_WHEEL_VERSION (default 1.22.0).
set -euo pipefail
cd "$(dirname "$0")/../.."
UCX_VERSION=${UCX_WHEEL_VERSION:-1.22.0}
DEST=.remote
grep -qx '/.remote/' .git/info/exclude 2>/dev/null || echo '/.remote/' >> .git/info/exclude
mkdir -p "$DEST/deb"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# UCX: the wheel's manylinux x86-64 build for CUDA 13, trimmed to what a process loads.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$work" "libucx-cu13==$UCX_VERSION"
unzip -q "$work"/libucx_cu13-*.whl -d "$work/wheel"
src=$work/wheel/libucx
pkg=$work/pkg/ucx
mkdir -p "$pkg/lib/ucx" "$pkg/bin"
for lib in libucs libucp libuct libucm; do cp "$src/lib/$lib.so.0" "$pkg/lib/"; done
for mod in libuct_cma libuct_cuda libucm_cuda; do cp "$src/lib/ucx/$mod.so.0" "$pkg/lib/ucx/"; done
cp "$src/bin/ucx_info" "$pkg/bin/"
cp "$src/UCX_WHEEL_VERSION.txt" "$src/GIT_COMMIT" "$pkg/"
ucx_tar=$DEST/ucx-$UCX_VERSION-cu13.tar.gz
rm -f "$DEST"/ucx-*-cu13.tar.gz
tar -C "$work/pkg" -czf "$ucx_tar" ucx

# libfabric and the libraries it links (only the names it needs at load time; its providers are built in).
rm -f "$DEST"/deb/*.deb
(cd "$DEST/deb" && apt-get download libfabric1 libfabric-bin libibverbs1 ibverbs-providers librdmacm1 libpsm2-2 \
  libpsm-infinipath1 libnl-3-200 libnl-route-3-200 libnuma1 libatomic1 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)

{
  echo "# .remote: libraries for NVSHMEM's remote transports (scripts/device/fetch_remote_libs.sh, $(date -u +%F))"
  echo "$ucx_tar: from libucx-cu13==$UCX_VERSION ($(basename "$work"/libucx_cu13-*.whl)), UCX commit $(cat "$src/GIT_COMMIT")"
  for deb in "$DEST"/deb/*.deb; do
    echo "$deb: $(dpkg-deb -f "$deb" Package Version | paste -sd' ') ($(. /etc/os-release; echo "$PRETTY_NAME"))"
  done
  echo "# sha256"
  (cd "$DEST" && sha256sum "$(basename "$ucx_tar")" deb/*.deb)
} > "$DEST/MANIFEST.txt"
du -sh "$DEST"
cat "$DEST/MANIFEST.txt"
