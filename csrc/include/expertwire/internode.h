// All-to-all across nodes through NVSHMEM: the symmetric buffer comes from nvshmem_malloc; peers this process
// can map (same node: NVLink, or a shared GPU) are written with loads and stores, the others with puts and
// signals.
#pragma once

#include <memory>

#include "expertwire/all_to_all.h"
#include "expertwire/nvshmem.h"

namespace expertwire {

class NvshmemSymmetricBuffer;

class AllToAllInternode final : public AllToAll {
 public:
  // Collective: every rank constructs (and later destroys) its object together; NVSHMEM must be initialized.
  // Ranks agree before allocating: one rank's failed check (NVSHMEM's world size or rank, a symmetric heap too
  // small for NVSHMEM_SYMMETRIC_SIZE) or a layout that differs between ranks throws ConfigError on every rank.
  explicit AllToAllInternode(const AllToAllConfig& config, const AllToAllOptions& options = {});
  ~AllToAllInternode() override;

  // The bytes of symmetric heap an object of `config` takes on the current CUDA device, with the launch shape
  // options.max_sm_count gives it. Local: needs no NVSHMEM.
  static uint64_t symmetric_bytes(const AllToAllConfig& config, const AllToAllOptions& options = {});

 private:
  void launch_dispatch(const device::DispatchArgs& args, cudaStream_t stream) override;
  void launch_combine(const device::CombineArgs& args, ScalarType out_type, ScalarType expert_type,
                      cudaStream_t stream) override;

  std::unique_ptr<NvshmemSymmetricBuffer> buffer_;
  // Whether the kernels run the puts protocol (push) rather than pulls: the same on every rank.
  bool uses_puts_ = false;
};

}  // namespace expertwire
