// An experiment, not a GDRCopy: a libgdrapi.so.2 with GDRCopy's entry points (the ones NVSHMEM 3.4.5's UCX
// transport loads with dlsym) that "maps" only memory the CPU can already address: pinned or registered host
// memory (NVSHMEM_HEAP_KIND=SYSMEM puts the symmetric heap in POSIX shared memory registered with
// cudaHostRegister). It refuses device memory, which only the gdrdrv kernel module can map for the CPU.
// Why: without GDRCopy, NVSHMEM's UCX transport (no libibverbs device => "local atomics") fails every AMO
// ("AMO %d not supported with the current configuration (GDRCopy Disabled)"), and nvshmem_init's own barrier is
// one. With this library and a host-memory heap, the target's proxy performs the AMO on memory it can address.
//   gcc -O2 -shared -fPIC -I$CUDA_HOME/include -o bin/libgdrapi.so.2 gdrapi_hostmem.c -ldl
// Env: GDRAPI_HOSTMEM_VERBOSE=1 prints each pin.
#include <cuda.h>
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct gdr_hostmem {
  int unused;
} *gdr_t;

typedef struct {
  unsigned long h;
} gdr_mh_t;

// GDRCopy 2.x's gdr_info (the v1 layout; the v2 one only appends fields). NVSHMEM reads va.
typedef struct {
  uint64_t va;
  uint64_t mapped_size;
  uint32_t page_size;
  uint64_t tm_cycles;
  uint32_t cycles_per_ms;
  unsigned mapped : 1;
  unsigned wc_mapping : 1;
} gdr_info_t;

enum { kMaxPins = 4096 };
struct pin {
  unsigned long addr;  // the address the caller pinned (a device pointer of host memory, under UVA)
  size_t size;
  char* host;  // the CPU address of addr
  int used;
};
static struct pin pins[kMaxPins];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct gdr_hostmem the_handle;

typedef CUresult (*get_attribute_fn)(void*, CUpointer_attribute, CUdeviceptr);
static get_attribute_fn get_attribute;

static int verbose(void) {
  const char* v = getenv("GDRAPI_HOSTMEM_VERBOSE");
  return v && v[0] == '1';
}

void gdr_runtime_get_version(int* major, int* minor) {
  *major = 2;
  *minor = 99;  // NVSHMEM requires the major it was built with and a minor at least as new
}

gdr_t gdr_open(void) {
  void* cuda = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
  if (cuda) get_attribute = (get_attribute_fn)dlsym(cuda, "cuPointerGetAttribute");
  if (!get_attribute) {
    fprintf(stderr, "gdrapi_hostmem: libcuda.so.1 or cuPointerGetAttribute not found\n");
    return NULL;
  }
  if (verbose()) fprintf(stderr, "gdrapi_hostmem: open (host memory only)\n");
  return &the_handle;
}

int gdr_close(gdr_t g) {
  (void)g;
  return 0;
}

int gdr_driver_get_version(gdr_t g, int* major, int* minor) {
  (void)g;
  *major = 2;
  *minor = 99;
  return 0;
}

int gdr_pin_buffer(gdr_t g, unsigned long addr, size_t size, uint64_t p2p_token, uint32_t va_space,
                   gdr_mh_t* handle) {
  (void)g;
  (void)p2p_token;
  (void)va_space;
  unsigned int type = 0;
  void* host = NULL;
  CUresult rc = get_attribute(&type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)addr);
  if (rc == CUDA_SUCCESS && type == CU_MEMORYTYPE_DEVICE) {
    fprintf(stderr,
            "gdrapi_hostmem: refusing to pin %#lx (%zu bytes): device memory; a CPU mapping of it needs the gdrdrv "
            "module (use NVSHMEM_HEAP_KIND=SYSMEM with this library)\n",
            addr, size);
    return EINVAL;
  }
  if (rc == CUDA_SUCCESS) {
    if (get_attribute(&host, CU_POINTER_ATTRIBUTE_HOST_POINTER, (CUdeviceptr)addr) != CUDA_SUCCESS || !host) {
      host = (void*)addr;
    }
  } else if (rc == CUDA_ERROR_INVALID_VALUE) {
    host = (void*)addr;  // memory CUDA does not know: plain host memory
  } else {
    fprintf(stderr, "gdrapi_hostmem: cuPointerGetAttribute(%#lx) failed (%d); not pinning\n", addr, (int)rc);
    return EINVAL;
  }
  pthread_mutex_lock(&lock);
  int slot = -1;
  for (int i = 0; i < kMaxPins; ++i) {
    if (!pins[i].used) {
      slot = i;
      break;
    }
  }
  if (slot >= 0) {
    pins[slot].addr = addr;
    pins[slot].size = size;
    pins[slot].host = (char*)host;
    pins[slot].used = 1;
  }
  pthread_mutex_unlock(&lock);
  if (slot < 0) return ENOMEM;
  handle->h = (unsigned long)slot + 1;
  if (verbose()) fprintf(stderr, "gdrapi_hostmem: pin %#lx (%zu bytes) -> host %p\n", addr, size, host);
  return 0;
}

static struct pin* find(gdr_mh_t handle) {
  if (handle.h == 0 || handle.h > kMaxPins || !pins[handle.h - 1].used) return NULL;
  return &pins[handle.h - 1];
}

int gdr_unpin_buffer(gdr_t g, gdr_mh_t handle) {
  (void)g;
  pthread_mutex_lock(&lock);
  struct pin* p = find(handle);
  if (p) p->used = 0;
  pthread_mutex_unlock(&lock);
  return p ? 0 : EINVAL;
}

int gdr_get_info(gdr_t g, gdr_mh_t handle, gdr_info_t* info) {
  (void)g;
  struct pin* p = find(handle);
  if (!p) return EINVAL;
  info->va = p->addr;
  info->mapped_size = p->size;
  info->page_size = 4096;
  info->mapped = 1;
  info->wc_mapping = 0;
  return 0;
}

int gdr_map(gdr_t g, gdr_mh_t handle, void** va, size_t size) {
  (void)g;
  struct pin* p = find(handle);
  if (!p || size > p->size) return EINVAL;
  *va = p->host;
  return 0;
}

int gdr_unmap(gdr_t g, gdr_mh_t handle, void* va, size_t size) {
  (void)g;
  (void)va;
  (void)size;
  return find(handle) ? 0 : EINVAL;
}

int gdr_copy_to_mapping(gdr_mh_t handle, void* map_d_ptr, const void* h_ptr, size_t size) {
  (void)handle;
  memcpy(map_d_ptr, h_ptr, size);
  return 0;
}

int gdr_copy_from_mapping(gdr_mh_t handle, void* h_ptr, const void* map_d_ptr, size_t size) {
  (void)handle;
  memcpy(h_ptr, map_d_ptr, size);
  return 0;
}
