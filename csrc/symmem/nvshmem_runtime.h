// What the internode transport needs of NVSHMEM beyond its bootstrap (expertwire/nvshmem.h): all-gathers over
// the host API, and the RAII owner of one symmetric allocation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/cuda_utils.h"
#include "expertwire/nvshmem.h"

namespace expertwire {

// Every rank's `local` words, in rank order (each rank passes as many). Ranks of one node with P2P read every
// rank's from symmetric scratch with gets between two barriers, not an NVSHMEM collective (NVSHMEM refuses those
// when ranks share a GPU without MPS); across nodes or with NVSHMEM_DISABLE_P2P, an nvshmemx fcollect on the
// device. Collective.
std::vector<std::vector<uint64_t>> nvshmem_all_gather_words(const std::vector<uint64_t>& local);
// Every rank's bytes in rank order, over nvshmem_all_gather_words (an AllGatherBytes). Collective.
std::vector<std::string> nvshmem_all_gather_bytes(const std::string& local);
// Whether `local` is true on some rank. Collective.
bool nvshmem_on_any_rank(bool local);

// The checks every internode all-to-all makes before it allocates: its configuration's world_size and rank are
// NVSHMEM's (`config_name` names the configuration type in the messages), and `symmetric_bytes` fit the heap that
// NVSHMEM_SYMMETRIC_SIZE gives. Throws ConfigError.
void require_nvshmem_supports(const char* config_name, int64_t world_size, int64_t rank, uint64_t symmetric_bytes);

// One nvshmem_malloc'd buffer, zeroed, plus a device table of the address at which this process can load
// and store each peer's copy (nvshmem_ptr; null where only puts reach the peer). Allocation and release
// are collective: every rank constructs and destroys its buffer together.
class NvshmemSymmetricBuffer {
 public:
  // Throws RuntimeError when NVSHMEM is not initialized. `force_puts` leaves the peer table empty so every
  // byte travels through NVSHMEM puts, as it does between nodes.
  NvshmemSymmetricBuffer(size_t bytes, bool force_puts);
  NvshmemSymmetricBuffer(const NvshmemSymmetricBuffer&) = delete;
  NvshmemSymmetricBuffer& operator=(const NvshmemSymmetricBuffer&) = delete;

  uint8_t* local() const { return base_.get(); }
  uint8_t* const* device_peer_table() const { return peer_table_.get<uint8_t*>(); }
  bool uses_puts() const { return uses_puts_; }  // some peer of this rank is reached only through puts

 private:
  struct Free {
    void operator()(uint8_t* base) const;
  };
  std::unique_ptr<uint8_t, Free> base_;  // freed (after the device is idle) whatever throws after the allocation
  DeviceBuffer peer_table_;
  bool uses_puts_ = false;
};

}  // namespace expertwire
