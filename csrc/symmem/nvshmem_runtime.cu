#include "symmem/nvshmem_runtime.h"

#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <iterator>
#include <string>

#include "core/env.h"
#include "core/error.h"
#include "core/layout.h"

namespace expertwire {

namespace {
bool g_initialized_here = false;     // by nvshmem_init_with_unique_id
bool g_attached_to_running = false;  // NVSHMEM belongs to another library of this process
std::atomic<bool> g_release_without_collectives{false};
}  // namespace

void nvshmem_release_without_collectives() { g_release_without_collectives = true; }

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
  EW_REQUIRE(unique_id.size() == sizeof(nvshmemx_uniqueid_t), "NVSHMEM unique id must be ", sizeof(nvshmemx_uniqueid_t),
             " bytes, got ", unique_id.size());
  EW_REQUIRE(world_size > 0, "NVSHMEM init: world_size must be > 0, got ", world_size);
  EW_REQUIRE(rank >= 0 && rank < world_size, "NVSHMEM init: rank must be in [0, ", world_size, "), got ", rank);
  nvshmemx_uniqueid_t id;
  std::memcpy(&id, unique_id.data(), sizeof(id));
  // NVSHMEM aborts the process on an id that no rank created. One whose bytes are all zero (an empty id the
  // broadcast never filled) or of another version is refused here.
  EW_REQUIRE(std::any_of(std::begin(id.internal), std::end(id.internal), [](char byte) { return byte != 0; }),
             "NVSHMEM init: the unique id is empty (all zero but for its version): create it on one rank with "
             "nvshmem_unique_id() (Python: nvshmem_get_unique_id()) and broadcast it to every rank before init");
  const nvshmemx_uniqueid_t fresh = NVSHMEMX_UNIQUEID_INITIALIZER;
  EW_REQUIRE(id.version == fresh.version,
             "NVSHMEM init: the unique id is not one of this NVSHMEM version (its version field is ", id.version,
             ", expected ", fresh.version, ")");
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  int status = nvshmemx_set_attr_uniqueid_args(rank, world_size, &id, &attr);
  if (status != 0) EW_THROW(RuntimeError, "nvshmemx_set_attr_uniqueid_args failed with status ", status);
  status = nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr);
  if (status != 0) EW_THROW(RuntimeError, "nvshmemx_init_attr failed with status ", status, " on rank ", rank);
  g_initialized_here = true;
  if (!nvshmem_initialized()) {
    // NVSHMEM returns success without initializing where it finds no usable GPU: say why, not "call init" later.
    int devices = 0;
    const cudaError_t cuda = cudaGetDeviceCount(&devices);
    EW_THROW(RuntimeError, "NVSHMEM init: NVSHMEM did not initialize on rank ", rank, " (",
             cuda != cudaSuccess ? cuda_error_cause(cuda)
                                 : std::to_string(devices) + " CUDA devices visible; set NVSHMEM_DEBUG=INFO to see why",
             ")");
  }
}

bool nvshmem_initialized() { return nvshmemx_init_status() >= NVSHMEM_STATUS_IS_INITIALIZED; }

void nvshmem_attach_to_running() {
  require_nvshmem_initialized();
  if (g_initialized_here || g_attached_to_running) return;
  // An init while NVSHMEM runs bootstraps nothing: it registers the calling device library's state (ours, linked
  // statically), writes the running job's into it and counts one more reference (NVSHMEM exits the process
  // where that fails). nvshmem_finalize_runtime gives the reference back.
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  nvshmemx_init_attr(0, &attr);
  g_attached_to_running = true;
}

void require_nvshmem_initialized() {
  if (!nvshmem_initialized()) {
    EW_THROW(RuntimeError,
             "NVSHMEM is not initialized: call nvshmem_init_with_unique_id (Python: nvshmem_init) on "
             "every rank first");
  }
}

void nvshmem_finalize_runtime() {
  // After an attach this only drops our reference (and our device state) while the owner holds its own; NVSHMEM
  // shuts down at the last finalize, whoever calls it.
  if (nvshmem_initialized()) nvshmem_finalize();
  g_initialized_here = false;
  g_attached_to_running = false;
}

int nvshmem_rank() {
  require_nvshmem_initialized();
  return nvshmem_my_pe();
}
int nvshmem_world_size() {
  require_nvshmem_initialized();
  return nvshmem_n_pes();
}
void nvshmem_barrier_all_ranks() {
  require_nvshmem_initialized();
  nvshmem_barrier_all();
}
void nvshmem_barrier_on_stream(cudaStream_t stream) {
  require_nvshmem_initialized();
  nvshmemx_barrier_all_on_stream(stream);
}

void nvshmem_alltoall_on_stream(void* dest, const void* source, size_t bytes_per_rank, cudaStream_t stream) {
  require_nvshmem_initialized();
  const int status = nvshmemx_alltoallmem_on_stream(NVSHMEM_TEAM_WORLD, dest, source, bytes_per_rank, stream);
  if (status != 0) EW_THROW(RuntimeError, "nvshmemx_alltoallmem_on_stream failed with status ", status);
}

std::vector<std::vector<uint64_t>> nvshmem_all_gather_words(const std::vector<uint64_t>& local) {
  require_nvshmem_initialized();
  const size_t words = std::max<size_t>(local.size(), 1);
  const int pes = nvshmem_n_pes();
  struct Scratch {  // symmetric memory; nvshmem_malloc and nvshmem_free are collective
    uint64_t* words;
    explicit Scratch(size_t bytes) : words(static_cast<uint64_t*>(nvshmem_malloc(bytes))) {
      if (words == nullptr) EW_THROW(RuntimeError, "nvshmem_malloc of ", bytes, " bytes failed");
    }
    ~Scratch() { nvshmem_free(words); }
  };
  const Scratch source(words * sizeof(uint64_t));
  std::vector<uint64_t> padded(local);
  padded.resize(words, 0);
  EW_CUDA_CHECK(cudaMemcpy(source.words, padded.data(), words * sizeof(uint64_t), cudaMemcpyHostToDevice));
  // A copy from pageable memory may return before it lands, and NVSHMEM's barrier runs on a stream of its own:
  // wait for it, or a peer could read the last scratch's words at this address.
  EW_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<std::vector<uint64_t>> by_rank(static_cast<size_t>(pes), std::vector<uint64_t>(local.size()));
  // The same choice on every rank: by the environment every rank shares and the node layout every rank sees.
  const bool through_remote_transport = nvshmem_p2p_disabled() || nvshmem_team_n_pes(NVSHMEMX_TEAM_NODE) != pes;
  if (!through_remote_transport) {
    nvshmem_barrier_all();  // every rank's words written before any is read
    for (int pe = 0; pe < pes; ++pe) {
      for (size_t i = 0; i < local.size(); ++i) by_rank[pe][i] = nvshmem_uint64_g(source.words + i, pe);
    }
    nvshmem_barrier_all();  // every rank's words read before any is freed
    return by_rank;
  }
  // Through a remote transport the host's gets need what its proxy may not offer (GDRCopy, host-mapped peer
  // memory); a collective on the device moves the words by the device's puts, which every transport carries.
  // (Ranks of one node with P2P keep the gets: NVSHMEM refuses collectives there when ranks share a GPU.)
  const Scratch gathered(words * sizeof(uint64_t) * size_t(pes));
  const int status =
      nvshmemx_uint64_fcollect_on_stream(NVSHMEM_TEAM_WORLD, gathered.words, source.words, words, cudaStreamLegacy);
  if (status != 0) EW_THROW(RuntimeError, "nvshmemx_uint64_fcollect_on_stream failed with status ", status);
  // With the symmetric heap in host memory, a rank's collective was seen to finish before its P2P peers' stores
  // into it reached the host: read the words only once every rank's collective has finished.
  EW_CUDA_CHECK(cudaStreamSynchronize(cudaStreamLegacy));
  nvshmem_barrier_all();
  std::vector<uint64_t> all(words * size_t(pes));
  EW_CUDA_CHECK(cudaMemcpy(all.data(), gathered.words, all.size() * sizeof(uint64_t), cudaMemcpyDeviceToHost));
  for (int pe = 0; pe < pes; ++pe) {
    std::copy_n(all.begin() + ptrdiff_t(pe * words), local.size(), by_rank[pe].begin());
  }
  return by_rank;
}

std::vector<std::string> nvshmem_all_gather_bytes(const std::string& local) {
  // Sizes first, then the bytes of every rank packed into as many words as the longest needs.
  size_t longest = 0;
  for (const std::vector<uint64_t>& size : nvshmem_all_gather_words({uint64_t(local.size())})) {
    longest = std::max<size_t>(longest, size[0]);
  }
  std::vector<uint64_t> words((longest + sizeof(uint64_t) - 1) / sizeof(uint64_t) + 1, 0);
  words[0] = local.size();
  std::memcpy(words.data() + 1, local.data(), local.size());
  std::vector<std::string> by_rank;
  for (const std::vector<uint64_t>& gathered : nvshmem_all_gather_words(words)) {
    by_rank.emplace_back(reinterpret_cast<const char*>(gathered.data() + 1), size_t(gathered[0]));
  }
  return by_rank;
}

bool nvshmem_on_any_rank(bool local) {
  for (const std::vector<uint64_t>& flag : nvshmem_all_gather_words({local ? 1u : 0u})) {
    if (flag[0] != 0) return true;
  }
  return false;
}

void NvshmemSymmetricBuffer::Free::operator()(uint8_t* base) const {
  if (g_release_without_collectives) return;  // no wait either: a kernel may still wait out its timeout
  cudaDeviceSynchronize();
  nvshmem_free(base);
}

NvshmemSymmetricBuffer::NvshmemSymmetricBuffer(size_t bytes, bool force_puts) {
  require_nvshmem_initialized();
  base_.reset(static_cast<uint8_t*>(nvshmem_malloc(bytes)));
  if (base_ == nullptr) {
    EW_THROW(RuntimeError, "nvshmem_malloc of ", bytes, " bytes failed; raise NVSHMEM_SYMMETRIC_SIZE");
  }
  EW_CUDA_CHECK(cudaMemset(base_.get(), 0, bytes));
  EW_CUDA_CHECK(cudaDeviceSynchronize());

  const int ranks = nvshmem_n_pes();
  std::vector<uint8_t*> peers(ranks, nullptr);
  for (int pe = 0; pe < ranks; ++pe) {
    peers[pe] = force_puts ? nullptr : static_cast<uint8_t*>(nvshmem_ptr(base_.get(), pe));
    uses_puts_ |= peers[pe] == nullptr;
  }
  peer_table_ = DeviceBuffer(ranks * sizeof(uint8_t*));
  EW_CUDA_CHECK(cudaMemcpy(peer_table_.get(), peers.data(), ranks * sizeof(uint8_t*), cudaMemcpyHostToDevice));
  // Every peer's buffer must be zeroed before anyone signals into it.
  nvshmem_barrier_all();
}

void require_nvshmem_supports(const char* config_name, int64_t world_size, int64_t rank, uint64_t symmetric_bytes) {
  EW_REQUIRE(nvshmem_world_size() == world_size, config_name, ".world_size must equal NVSHMEM's ", nvshmem_world_size(),
             " ranks, got ", world_size);
  EW_REQUIRE(nvshmem_rank() == rank, config_name, ".rank must equal this process's NVSHMEM rank ", nvshmem_rank(),
             ", got ", rank);
  require_fits_symmetric_heap(symmetric_bytes, symmetric_heap_bytes_from_env());
}

}  // namespace expertwire
