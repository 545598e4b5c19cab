# Sourced by rank_env.sh (export_nvshmem_env) when EXPERTWIRE_REMOTE_TRANSPORT is set: the ranks of this machine
# reach each other through one of NVSHMEM's remote transports instead of its P2P transport, as ranks on different
# nodes do, with the libraries carried in .remote/ (fill it with scripts/device/fetch_remote_libs.sh where a
# registry is reachable; carry it with the command on the device machine).
#   EXPERTWIRE_REMOTE_TRANSPORT=ucx        UCX from .remote/ucx-*-cu13.tar.gz
#   EXPERTWIRE_REMOTE_TRANSPORT=libfabric  libfabric from .remote/deb/*.deb
#   EXPERTWIRE_REMOTE_TRANSPORT=ucx-sysmem UCX as above, with the symmetric heap in host memory
#                                          (NVSHMEM_HEAP_KIND=SYSMEM) and remote/gdrapi_hostmem.c built as the
#                                          libgdrapi.so.2 that NVSHMEM's UCX atomics need on a machine without
#                                          gdrdrv: the configuration that runs (docs/remote_transport.md)
# What it sets (a variable already set keeps its value, except the two NVSHMEM_REMOTE_TRANSPORT and
# LD_LIBRARY_PATH, which it must set):
#   NVSHMEM_DISABLE_P2P=1, NVSHMEM_REMOTE_TRANSPORT=ucx|libfabric, LD_LIBRARY_PATH (the unpacked libraries first)
#   ucx:        UCX_MODULE_DIR (the unpacked module folder), UCX_WARN_UNUSED_ENV_VARS=n. UCX_TLS is passed on when
#               set, but NVSHMEM 3.4.5's UCX transport replaces it (with "posix,ib" when libibverbs reports no
#               device, else "rc"): docs/remote_transport.md
#   libfabric:  FI_PROVIDER=tcp (libfabric's provider), NVSHMEM_LIBFABRIC_PROVIDER=verbs (NVSHMEM's "persona",
#               which must be one of verbs, cxi, efa; it does not pick libfabric's provider)
# REMOTE_TRANSPORT_EXPORTS lists the variables set here that ranks need; run_ranks.sh passes them with -x.
# Env: EXPERTWIRE_REMOTE_DIR (default <repo>/.remote), EXPERTWIRE_REMOTE_PREFIX (where to unpack, default
# /tmp/expertwire-remote; unpacked once, then reused).

remote_transport_unpack_ucx() {
  local tarball
  tarball=$(ls "$EW_REMOTE_DIR"/ucx-*-cu13.tar.gz 2>/dev/null | tail -1)
  if [ -z "$tarball" ]; then
    echo "remote_transport.sh: no $EW_REMOTE_DIR/ucx-*-cu13.tar.gz (run scripts/device/fetch_remote_libs.sh)" >&2
    return 1
  fi
  if [ ! -e "$EW_REMOTE_PREFIX/ucx/.unpacked" ]; then
    local tmp
    tmp=$(mktemp -d "$EW_REMOTE_PREFIX/.ucx.XXXXXX")
    tar -C "$tmp" -xzf "$tarball" || return 1
    touch "$tmp/ucx/.unpacked"
    rm -rf "$EW_REMOTE_PREFIX/ucx"
    mv "$tmp/ucx" "$EW_REMOTE_PREFIX/ucx"
    rmdir "$tmp"
  fi
  EW_REMOTE_LIBS=$EW_REMOTE_PREFIX/ucx/lib
}

# The host-memory GDRCopy stand-in, compiled once into the unpack prefix.
remote_transport_build_gdrapi_shim() {
  local src out
  src=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/remote/gdrapi_hostmem.c
  out=$EW_REMOTE_PREFIX/gdrapi-hostmem
  if [ ! -e "$out/libgdrapi.so.2" ] || [ "$src" -nt "$out/libgdrapi.so.2" ]; then
    mkdir -p "$out" || return 1
    local cuda_include=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}/include
    gcc -O2 -shared -fPIC -I"$cuda_include" -o "$out/libgdrapi.so.2.tmp" "$src" -ldl || return 1
    mv "$out/libgdrapi.so.2.tmp" "$out/libgdrapi.so.2"
  fi
  EW_REMOTE_LIBS=$out:$EW_REMOTE_LIBS
}

remote_transport_unpack_libfabric() {
  local debs=("$EW_REMOTE_DIR"/deb/*.deb)
  if [ ! -e "${debs[0]}" ]; then
    echo "remote_transport.sh: no $EW_REMOTE_DIR/deb/*.deb (run scripts/device/fetch_remote_libs.sh)" >&2
    return 1
  fi
  local root=$EW_REMOTE_PREFIX/fabric
  if [ ! -e "$root/.unpacked" ]; then
    local tmp deb
    tmp=$(mktemp -d "$EW_REMOTE_PREFIX/.fabric.XXXXXX")
    for deb in "${debs[@]}"; do dpkg-deb -x "$deb" "$tmp" || return 1; done
    # Debian installs libpsm_infinipath.so.1 through update-alternatives; make the link it would make.
    local psm
    psm=$(ls "$tmp"/usr/lib/libpsm1/libpsm_infinipath.so.1.* 2>/dev/null | head -1)
    if [ -n "$psm" ]; then ln -sf "../libpsm1/$(basename "$psm")" "$tmp/usr/lib/x86_64-linux-gnu/libpsm_infinipath.so.1"; fi
    touch "$tmp/.unpacked"
    rm -rf "$root"
    mv "$tmp" "$root"
  fi
  EW_REMOTE_LIBS=$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu
  EW_REMOTE_BIN=$root/usr/bin
}

export_remote_transport_env() {
  EW_REMOTE_DIR=${EXPERTWIRE_REMOTE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.remote}
  EW_REMOTE_PREFIX=${EXPERTWIRE_REMOTE_PREFIX:-/tmp/expertwire-remote}
  EW_REMOTE_LIBS="" EW_REMOTE_BIN=""
  mkdir -p "$EW_REMOTE_PREFIX" || return 1
  REMOTE_TRANSPORT_EXPORTS="NVSHMEM_DISABLE_P2P NVSHMEM_REMOTE_TRANSPORT"
  local v
  case "$EXPERTWIRE_REMOTE_TRANSPORT" in
    ucx | ucx-sysmem)
      remote_transport_unpack_ucx || return 1
      if [ "$EXPERTWIRE_REMOTE_TRANSPORT" = ucx-sysmem ]; then
        remote_transport_build_gdrapi_shim || return 1
        export NVSHMEM_HEAP_KIND=${NVSHMEM_HEAP_KIND:-SYSMEM}
        # A SYSMEM heap is a POSIX shared-memory file per rank; a killed job's would stay behind.
        rm -f /dev/shm/sysmem_symm_heap* 2>/dev/null || true
      fi
      export UCX_MODULE_DIR=${UCX_MODULE_DIR:-$EW_REMOTE_PREFIX/ucx/lib/ucx}
      export UCX_WARN_UNUSED_ENV_VARS=${UCX_WARN_UNUSED_ENV_VARS:-n}
      EW_REMOTE_BIN=$EW_REMOTE_PREFIX/ucx/bin
      ;;
    libfabric)
      remote_transport_unpack_libfabric || return 1
      export FI_PROVIDER=${FI_PROVIDER:-tcp}
      export NVSHMEM_LIBFABRIC_PROVIDER=${NVSHMEM_LIBFABRIC_PROVIDER:-verbs}
      ;;
    *)
      echo "remote_transport.sh: EXPERTWIRE_REMOTE_TRANSPORT=$EXPERTWIRE_REMOTE_TRANSPORT: expected ucx, ucx-sysmem or libfabric" >&2
      return 1
      ;;
  esac
  export NVSHMEM_DISABLE_P2P=${NVSHMEM_DISABLE_P2P:-1}
  export NVSHMEM_REMOTE_TRANSPORT=${EXPERTWIRE_REMOTE_TRANSPORT%-sysmem}
  export LD_LIBRARY_PATH="$EW_REMOTE_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  # Every UCX_, FI_ and NVSHMEM_ setting of this environment travels to the ranks, so a caller can tune the
  # transport (UCX_TLS, FI_LOG_LEVEL, NVSHMEM_DEBUG, NVSHMEM_DISABLE_GDRCOPY, ...) without naming it again.
  for v in $(compgen -e | grep -E '^(UCX|FI|NVSHMEM)_' || true); do
    case " $REMOTE_TRANSPORT_EXPORTS " in *" $v "*) ;; *) REMOTE_TRANSPORT_EXPORTS+=" $v" ;; esac
  done
  export EW_REMOTE_BIN
}
