// The all-to-all object: dispatch sends each token to the ranks that own its experts, combine brings the expert
// outputs back and sums them with the router weights. Both transports (internode.h, intranode.h) derive from it
// and run the same kernels; this class holds the host logic they share and checks every argument once.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <functional>
#include <memory>

#include "expertwire/all_gather.h"
#include "expertwire/config.h"
#include "expertwire/dtype.h"
#include "expertwire/params.h"
#include "expertwire/strided.h"

namespace expertwire {

struct BufferLayout;  // every offset of the buffers (internal)
namespace device {
struct DispatchArgs;
struct CombineArgs;
}  // namespace device

struct AllToAllOptions {
  uint64_t timeout_ns = 0;      // bound on every device-side wait; 0: EXPERTWIRE_TIMEOUT_MS, default 10 s
  uint32_t max_sm_count = 0;    // blocks per launch at most (pplx_kernels' max_sm_count), leaving SMs to kernels
                                // that overlap with ours; 0: one per SM (EXPERTWIRE_NUM_BLOCKS overrides)
  bool force_puts = false;      // internode only: every byte through NVSHMEM puts and signals, even to peers this
                                // process can load from, as between nodes (the intranode constructor refuses it)
  bool fault_tolerant = false;  // a rank that stops answering is masked out, not an error (active_ranks); the
                                // same on every rank; dp_size 1 only
};

// Blocks and threads of every launch. Every block of a launch must be resident at once: blocks wait for their
// peers' blocks.
struct LaunchShape {
  uint32_t blocks = 0;
  uint32_t threads = 0;
  uint64_t warps() const { return uint64_t(blocks) * (threads / 32); }
};

class AllToAll {
 public:
  virtual ~AllToAll();
  AllToAll(const AllToAll&) = delete;
  AllToAll& operator=(const AllToAll&) = delete;

  // Sends each of the first *bound_m (<= m <= max_num_tokens) tokens to the experts in its row of indices.
  // Argument errors raise ConfigError before anything is launched (the object stays usable).
  void dispatch(const DispatchParams& params, cudaStream_t stream);
  // Sends each expert output row back to the ranks that hold its token and sums them there, per token, with
  // its weights in fp32 (see CombineParams).
  void combine(const CombineParams& params, cudaStream_t stream);

  // Raises DeviceError if a kernel of this object recorded an error (timeout, bad index, bad bound_m). Reads
  // host-mapped memory without synchronizing: synchronize the stream first to see the latest call. Errors are
  // sticky: once one is seen, every later call raises it again (peers' signals may be left half-set, so the
  // object cannot be trusted); make a fresh object, on every rank, to continue.
  void check_errors() const;

  // This rank's expert_outputs region, laid out as expert_y: [num_local_experts][max_recv_tokens][hidden_dim]
  // 16-bit values. Experts that write their outputs here (in stream order after dispatch's receive half) and
  // pass it to combine as expert_y save combine a copy of every row when every peer is load/store reachable;
  // other transports read it as any expert_y. Valid until the object is destroyed.
  void* expert_output_buffer() const;

  // Where this rank's pull dispatch stages its tokens for peers to read: [max_num_tokens][hidden_dim_bytes]
  // and [max_num_tokens][hidden_dim_scale_bytes / 4] scale words (data null without scales), rows further apart
  // than their bytes. A caller that writes its tokens here and passes these views (or their first m rows) as
  // dp_x and dp_x_scale saves the dispatch a copy of each when every peer is load/store reachable; other
  // transports read them as any input. Peers read them until the combine that follows that dispatch: write them
  // in stream order after the previous combine's receive half (or before the first dispatch).
  Strided2D<uint8_t> dispatch_input_buffer() const;
  Strided2D<float> dispatch_input_scale_buffer() const;

  // The fault-tolerant mode (AllToAllOptions::fault_tolerant). active_ranks: int32 [world_size] on the device,
  // 1 for each rank this one still serves with, 0 for each it has masked out: a wait that ran out on a rank masks
  // it, and before each combine returns the ranks agree on the mask (the union of theirs). Every call then
  // leaves the masked ranks out: their tokens are not received, their experts' terms are zero. Written by the
  // kernels in stream order; valid until the object is destroyed (nullptr in the default mode).
  bool fault_tolerant() const;
  int32_t* active_ranks() const;

  const AllToAllConfig& config() const;
  int device() const;  // the CUDA device that owns its buffers (current at construction); calls launch there
  LaunchShape launch_shape() const;

 protected:
  // Stores the configuration and takes the current CUDA device as the object's; nothing is checked or allocated
  // until agree_and_prepare.
  explicit AllToAll(const AllToAllConfig& config);

  // The derived constructor's first step, collective over the ranks `all_gather` reaches: validates the
  // configuration and the launch shape, allocates the local workspace and error record (and a staging row per
  // warp where `transport_may_put`: a put needs a registered source), and runs `transport_checks` (which may use
  // layout()), all as this rank's own checks of the rank agreement (transport/common/agreement.h), so that every
  // rank throws or none does.
  void agree_and_prepare(const AllToAllOptions& options, bool transport_may_put, const char* transport, int rank,
                         int world_size, const AllGatherBytes& all_gather,
                         const std::function<void()>& transport_checks);
  const BufferLayout& layout() const;
  // Derived classes call this once their symmetric buffer exists.
  void set_symmetric_buffer(uint8_t* local_base);

  virtual void launch_dispatch(const device::DispatchArgs& args, cudaStream_t stream) = 0;
  virtual void launch_combine(const device::CombineArgs& args, ScalarType out_type, ScalarType expert_type,
                              cudaStream_t stream) = 0;

 private:
  struct State;
  AllToAllConfig config_;
  int device_;  // the GPU current at construction, which owns every buffer; each call launches there
  std::unique_ptr<State> state_;
};

}  // namespace expertwire
