// All-to-all among the ranks of one node: every rank's buffer is device memory that the other ranks map into
// their address space, and every byte moves by loads and stores (NVLink, or a GPU the ranks share). Needs no
// NVSHMEM.
#pragma once

#include <memory>

#include "expertwire/all_to_all.h"

namespace expertwire {

// At most this many ranks share peer memory: one node's GPUs (or ranks sharing one GPU under MPS).
inline constexpr int kMaxIntranodeRanks = 8;

class IpcSymmetricBuffer;

class AllToAllIntranode final : public AllToAll {
 public:
  // Collective over the ranks `all_gather` reaches, which must share a host (buffers travel as file
  // descriptors over abstract Unix sockets). Ranks agree before allocating: one rank's failed check or a layout
  // that differs between ranks throws ConfigError on every rank; a peer whose buffer does not arrive within
  // 60 s is RuntimeError naming it. options.force_puts is refused (ConfigError): there are no puts here.
  AllToAllIntranode(const AllToAllConfig& config, const AllGatherBytes& all_gather,
                    const AllToAllOptions& options = {});
  ~AllToAllIntranode() override;

 private:
  void launch_dispatch(const device::DispatchArgs& args, cudaStream_t stream) override;
  void launch_combine(const device::CombineArgs& args, ScalarType out_type, ScalarType expert_type,
                      cudaStream_t stream) override;

  std::unique_ptr<IpcSymmetricBuffer> buffer_;
};

}  // namespace expertwire
