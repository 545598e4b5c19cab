// The host half shared by both transports: configuration, buffer layout, local workspace, the device error
// record, the launch shape and every argument check. A transport owns the symmetric memory and launches
// the kernels with its own device Transport policy.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/call_order.h"
#include "core/config.h"
#include "core/cuda_utils.h"
#include "core/dtype.h"
#include "core/layout.h"
#include "device/kernel_args.h"

namespace expertwire {

class AllToAll {
 public:
  virtual ~AllToAll() = default;
  AllToAll(const AllToAll&) = delete;
  AllToAll& operator=(const AllToAll&) = delete;

  // Sends each of the first *bound_m (<= m <= max_num_tokens) tokens to the experts in its row of
  // `indices`. Layouts (row-major, contiguous; dp_x and dp_x_scale may also be the dispatch input buffers):
  //   out_expert_num_tokens [num_local_experts] int32
  //   out_expert_x          [num_local_experts][max_recv_tokens][hidden_dim_bytes]
  //   out_expert_x_scale    [num_local_experts][max_recv_tokens][hidden_dim_scale_bytes] (null if no scales)
  //   dp_x                  [m][hidden_dim_bytes];  dp_x_scale [m][hidden_dim_scale_bytes] (null if no scales)
  //   indices               [m][experts_per_token] uint32
  // bound_m is a device pointer (may be null: m tokens), read by the kernels so a CUDA graph can replay
  // the call with another token count.
  void dispatch(int32_t* out_expert_num_tokens, void* out_expert_x, void* out_expert_x_scale, const void* dp_x,
                const void* dp_x_scale, const uint32_t* indices, uint32_t m, const uint32_t* bound_m,
                SplitMode split_mode, cudaStream_t stream);
  // The same with scale tensors of any layout, their words where `out_expert_x_scale_strides` and
  // `dp_x_scale_strides` say (byte strides, each a multiple of 4; dp_x_scale's expert stride is unused), and
  // dp_x's rows `dp_x_row_stride` bytes apart (a multiple of 16, at least hidden_dim_bytes).
  void dispatch(int32_t* out_expert_num_tokens, void* out_expert_x, void* out_expert_x_scale, const void* dp_x,
                const void* dp_x_scale, const uint32_t* indices, uint32_t m, const uint32_t* bound_m,
                SplitMode split_mode, cudaStream_t stream, const ScaleStrides& out_expert_x_scale_strides,
                const ScaleStrides& dp_x_scale_strides, uint64_t dp_x_row_stride);

  // Sends each expert output row back to the ranks that hold its token and sums, per token,
  // weights[t][k] * expert_y(expert indices[t][k]) in fp32 into out_tokens. Layouts:
  //   out_tokens [m][hidden_dim] out_type;  indices, weights [m][experts_per_token] (uint32, float32)
  //   expert_y   [num_local_experts][max_recv_tokens][hidden_dim] expert_type (bfloat16 or float16; float32
  //              with 16-bit out_tokens, whose type its rows are rounded to before they travel)
  void combine(void* out_tokens, ScalarType out_type, const uint32_t* indices, const float* weights,
               const void* expert_y, ScalarType expert_type, uint32_t m, const uint32_t* bound_m,
               SplitMode split_mode, cudaStream_t stream);

  // Raises DeviceError if a kernel of this object recorded an error (timeout, bad index, bad bound_m).
  // Reads host-mapped memory without synchronizing: synchronize the stream first to see the latest call.
  // Errors are sticky: once one is seen, every later call raises it again (peers' signals may be left
  // half-set, so the object cannot be trusted); make a fresh object to continue.
  void check_errors() const;

  // This rank's expert_outputs region of the symmetric buffer, laid out as expert_y: [num_local_experts]
  // [max_recv_tokens][hidden_dim] 16-bit values. Experts that write their outputs here (in stream order after
  // dispatch's receive half) and pass it to combine as expert_y save combine a copy of every row when every
  // peer is load/store reachable; other transports read it as any expert_y. Valid until the object is destroyed.
  void* expert_output_buffer() const { return symmetric_ + layout_.expert_outputs_offset; }

  // Where this rank's pull dispatch stages its tokens, as dp_x ([max_num_tokens] rows of hidden_dim_bytes) and
  // dp_x_scale ([max_num_tokens] rows of hidden_dim_scale_bytes / 4 contiguous words; null without scales), both
  // with rows dispatch_input_row_stride() bytes apart. A caller that writes its tokens here and passes them (or
  // their first m rows, at that row stride) to dispatch saves the dispatch a copy of each when every peer is
  // load/store reachable; other transports read them as any dp_x. Peers read them until the combine that follows
  // that dispatch: write them in stream order after the previous combine's receive half (or before the first
  // dispatch). Valid until the object is destroyed.
  void* dispatch_input_buffer() const {
    return symmetric_ + layout_.send_row_offset(0) + layout_.payload_offset_in_token();
  }
  void* dispatch_input_scale_buffer() const {
    if (layout_.hidden_dim_scale_bytes == 0) return nullptr;
    return symmetric_ + layout_.send_row_offset(0) + layout_.scale_offset_in_token();
  }
  uint64_t dispatch_input_row_stride() const { return layout_.dispatch_token_bytes; }
  // dispatch_input_scale_buffer()'s layout, as dispatch takes dp_x_scale's.
  ScaleStrides dispatch_input_scale_strides() const { return ScaleStrides{0, dispatch_input_row_stride(), 4}; }

  const AllToAllConfig& config() const { return config_; }
  int device() const { return device_; }  // the CUDA device that owns its buffers (current at construction)
  const BufferLayout& layout() const { return layout_; }
  device::LaunchShape launch_shape() const { return shape_; }

 protected:
  // `staging_rows_per_warp`: 1 for transports that may put through NVSHMEM, 0 otherwise. `timeout_ns` bounds
  // every device-side wait; 0 takes EXPERTWIRE_TIMEOUT_MS (default 10 s). `max_sm_count` caps the blocks of
  // every launch (0: no cap), leaving SMs to kernels that overlap with ours.
  AllToAll(const AllToAllConfig& config, uint64_t staging_rows_per_warp, uint64_t timeout_ns,
           uint32_t max_sm_count);

  // Derived classes call this once their symmetric buffer exists.
  void set_symmetric_buffer(uint8_t* local_base) { symmetric_ = local_base; }

  virtual void launch_dispatch(const device::DispatchArgs& args, cudaStream_t stream) = 0;
  virtual void launch_combine(const device::CombineArgs& args, ScalarType out_type, ScalarType expert_type,
                              cudaStream_t stream) = 0;

 private:
  device::RankContext context() const;

  int device_;  // the GPU current at construction, which owns every buffer; each call launches there
  AllToAllConfig config_;
  device::LaunchShape shape_;
  BufferLayout layout_;
  uint64_t timeout_ns_;
  DeviceBuffer workspace_;
  MappedHostObject<ErrorRecord> error_;
  uint8_t* symmetric_ = nullptr;
  CallOrder order_;
};

// Blocks and threads of every launch: one block per SM the process may use (EXPERTWIRE_NUM_BLOCKS overrides),
// at most `max_sm_count` blocks when it is non-zero, EXPERTWIRE_BLOCK_THREADS threads (default 512). Every
// block must be resident at once, as blocks of one launch wait on each other's peers.
device::LaunchShape default_launch_shape(uint32_t max_sm_count = 0);

}  // namespace expertwire
