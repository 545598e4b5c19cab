// All-to-all among the ranks of one node: every rank's buffer is device memory that the other ranks map into
// their address space (symmem/ipc_buffer.h), and every byte moves by NVLink loads and stores. Needs no NVSHMEM.
#pragma once

#include <cstdint>
#include <memory>

#include "symmem/ipc_buffer.h"
#include "transport/common/all_to_all.h"

namespace expertwire {

struct IntranodeOptions {
  uint64_t timeout_ns = 0;    // 0: EXPERTWIRE_TIMEOUT_MS or 10 s
  uint32_t max_sm_count = 0;  // blocks per launch at most (pplx_kernels' max_sm_count); 0: one per SM
};

class AllToAllIntranode final : public AllToAll {
 public:
  // Validates the configuration, allocates this rank's buffer and maps every peer's through `all_gather`
  // (see AllGatherBytes). Collective: every rank constructs (and later destroys) its object together.
  AllToAllIntranode(const AllToAllConfig& config, const AllGatherBytes& all_gather,
                    const IntranodeOptions& options = {});

 private:
  void launch_dispatch(const device::DispatchArgs& args, cudaStream_t stream) override;
  void launch_combine(const device::CombineArgs& args, ScalarType out_type, ScalarType expert_type,
                      cudaStream_t stream) override;

  std::unique_ptr<IpcSymmetricBuffer> buffer_;
};

}  // namespace expertwire
