#include "symmem/nvshmem_runtime.h"

#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>
#include <cstring>

#include "core/error.h"

namespace expertwire {

std::vector<uint8_t> nvshmem_unique_id() {
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  const int status = nvshmemx_get_uniqueid(&id);
  if (status != 0) EW_THROW(RuntimeError, "nvshmemx_get_uniqueid failed with status ", status);
  std::vector<uint8_t> bytes(sizeof(id));
  std::memcpy(bytes.data(), &id, sizeof(id));
  return bytes;
}

size_t nvshmem_unique_id_bytes() { return sizeof(nvshmemx_uniqueid_t); }

void nvshmem_init_with_unique_id(const std::vector<uint8_t>& unique_id, int rank, int world_size) {
  EW_REQUIRE(unique_id.size() == sizeof(nvshmemx_uniqueid_t), "NVSHMEM unique id must be ",
             sizeof(nvshmemx_uniqueid_t), " bytes, got ", unique_id.size());
  EW_REQUIRE(rank >= 0 && rank < world_size, "NVSHMEM init: rank must be in [0, ", world_size, "), got ", rank);
  nvshmemx_uniqueid_t id;
  std::memcpy(&id, unique_id.data(), sizeof(id));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  int status = nvshmemx_set_attr_uniqueid_args(rank, world_size, &id, &attr);
  if (status != 0) EW_THROW(RuntimeError, "nvshmemx_set_attr_uniqueid_args failed with status ", status);
  status = nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr);
  if (status != 0) EW_THROW(RuntimeError, "nvshmemx_init_attr failed with status ", status, " on rank ", rank);
}

bool nvshmem_initialized() { return nvshmemx_init_status() >= NVSHMEM_STATUS_IS_INITIALIZED; }

void require_nvshmem_initialized() {
  if (!nvshmem_initialized()) {
    EW_THROW(RuntimeError, "NVSHMEM is not initialized: call nvshmem_init_with_unique_id (Python: nvshmem_init) on "
                           "every rank before creating an internode all-to-all");
  }
}

void nvshmem_finalize_runtime() {
  if (nvshmem_initialized()) nvshmem_finalize();
}

int nvshmem_rank() { return nvshmem_my_pe(); }
int nvshmem_world_size() { return nvshmem_n_pes(); }
void nvshmem_barrier_all_ranks() { nvshmem_barrier_all(); }
void nvshmem_barrier_on_stream(cudaStream_t stream) { nvshmemx_barrier_all_on_stream(stream); }

void nvshmem_alltoall_on_stream(void* dest, const void* source, size_t bytes_per_rank, cudaStream_t stream) {
  require_nvshmem_initialized();
  const int status = nvshmemx_alltoallmem_on_stream(NVSHMEM_TEAM_WORLD, dest, source, bytes_per_rank, stream);
  if (status != 0) EW_THROW(RuntimeError, "nvshmemx_alltoallmem_on_stream failed with status ", status);
}

std::vector<std::vector<uint64_t>> nvshmem_all_gather_words(const std::vector<uint64_t>& local) {
  require_nvshmem_initialized();
  const size_t bytes = std::max<size_t>(local.size(), 1) * sizeof(uint64_t);
  struct Scratch {  // this rank's words, in symmetric memory
    uint64_t* words;
    explicit Scratch(size_t bytes) : words(static_cast<uint64_t*>(nvshmem_malloc(bytes))) {}
    ~Scratch() {
      if (words != nullptr) nvshmem_free(words);
    }
  } scratch(bytes);
  if (scratch.words == nullptr) EW_THROW(RuntimeError, "nvshmem_malloc of ", bytes, " bytes failed");
  EW_CUDA_CHECK(cudaMemcpy(scratch.words, local.data(), local.size() * sizeof(uint64_t), cudaMemcpyHostToDevice));
  // A copy from pageable memory may return before it lands, and NVSHMEM's barrier runs on a stream of its own:
  // wait for it, or a peer could read the last scratch's words at this address.
  EW_CUDA_CHECK(cudaDeviceSynchronize());
  nvshmem_barrier_all();  // every rank's words written before any is read
  std::vector<std::vector<uint64_t>> by_rank(size_t(nvshmem_n_pes()), std::vector<uint64_t>(local.size()));
  for (int pe = 0; pe < nvshmem_n_pes(); ++pe) {
    for (size_t i = 0; i < local.size(); ++i) by_rank[pe][i] = nvshmem_uint64_g(scratch.words + i, pe);
  }
  nvshmem_barrier_all();  // every rank's words read before any is freed
  return by_rank;
}

bool nvshmem_on_any_rank(bool local) {
  for (const std::vector<uint64_t>& flag : nvshmem_all_gather_words({local ? 1u : 0u})) {
    if (flag[0] != 0) return true;
  }
  return false;
}

NvshmemSymmetricBuffer::NvshmemSymmetricBuffer(size_t bytes, bool force_puts) {
  require_nvshmem_initialized();
  base_ = static_cast<uint8_t*>(nvshmem_malloc(bytes));
  if (base_ == nullptr) {
    EW_THROW(RuntimeError, "nvshmem_malloc of ", bytes, " bytes failed; raise NVSHMEM_SYMMETRIC_SIZE");
  }
  EW_CUDA_CHECK(cudaMemset(base_, 0, bytes));
  EW_CUDA_CHECK(cudaDeviceSynchronize());

  const int ranks = nvshmem_n_pes();
  std::vector<uint8_t*> peers(ranks, nullptr);
  for (int pe = 0; pe < ranks; ++pe) {
    peers[pe] = force_puts ? nullptr : static_cast<uint8_t*>(nvshmem_ptr(base_, pe));
    uses_puts_ |= peers[pe] == nullptr;
  }
  peer_table_ = DeviceBuffer(ranks * sizeof(uint8_t*));
  EW_CUDA_CHECK(cudaMemcpy(peer_table_.get(), peers.data(), ranks * sizeof(uint8_t*), cudaMemcpyHostToDevice));
  // Every peer's buffer must be zeroed before anyone signals into it.
  nvshmem_barrier_all();
}

NvshmemSymmetricBuffer::~NvshmemSymmetricBuffer() {
  if (base_ != nullptr) {
    cudaDeviceSynchronize();
    nvshmem_free(base_);
  }
}

}  // namespace expertwire
