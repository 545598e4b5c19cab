// The high-throughput all-to-all, for prefill and training: a rank receives only the rows it really gets, in a
// layout sized by the real counts, and each token crosses to each destination rank once, however many of its
// experts live there.
//
// A dispatch runs in two halves on the stream: dispatch_layout exchanges the counts (every rank learns how many
// rows it receives, from whom, for which expert) and dispatch_data moves the rows. Between them the host may read
// the counts (counts(), one stream synchronization) to allocate outputs of the exact size; dispatch() runs both
// halves into outputs of a caller's worst-case capacity without a host synchronization, so that it can be
// captured in a CUDA graph. Two layouts of the received rows:
//   rank-packed        [num_recv_tokens] rows, one per received token, by source rank then token, with each
//                      token's local expert indices (-1: not on this rank) and weights;
//   expert-contiguous  rows grouped by local expert, each segment starting at a multiple of expert_alignment,
//                      one row per (token, local expert) with that expert's weight; padding rows have expert -1.
// combine() brings rows back in the layout dispatch returned: rank-packed rows are summed per token as they are
// (the caller already weighted them); expert-contiguous rows are first summed per token on the expert's rank,
// with their weights, so that one row per (token, rank) travels back. Sums are fp32. A combine may carry one
// float per slot back beside the rows (the weights' gradients of a training backward).
//
// Calls alternate, on every rank in the same order: dispatch (both halves), combine, dispatch, ... The handle of
// a dispatch stays valid for combines after later dispatches (a training backward combines with the forward's
// handle) as long as calls keep alternating.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "expertwire/all_gather.h"
#include "expertwire/all_to_all.h"
#include "expertwire/dtype.h"
#include "expertwire/strided.h"

namespace expertwire {

struct HighThroughputConfig {
  int64_t max_num_tokens = 0;          // tokens per rank per call, upper bound
  int64_t num_experts = 0;             // global expert count, a multiple of world_size
  int64_t experts_per_token = 0;       // top-k
  int64_t rank = 0;                    // this rank in [0, world_size)
  int64_t world_size = 0;              // ranks taking part, at most kMaxHighThroughputRanks
  int64_t hidden_dim = 0;              // elements of a combine row, a multiple of 8
  int64_t hidden_dim_bytes = 0;        // dispatch payload bytes per token at most, a multiple of 16
  int64_t hidden_dim_scale_bytes = 0;  // dispatch scale bytes per token (0: no scales), a multiple of 4
  int64_t combine_element_bytes = 2;   // bytes of a combine element at most: 2 (bf16, fp16) or 4 (float32)
  int64_t expert_alignment = 1;        // expert-contiguous segments start at multiples of this many rows
  int64_t recv_capacity = 0;           // rank-packed rows a rank can receive; 0: max_num_tokens * world_size

  int64_t num_local_experts() const { return num_experts / world_size; }
  int64_t recv_rows() const { return recv_capacity != 0 ? recv_capacity : max_num_tokens * world_size; }
  // Expert-contiguous rows that recv_rows() received tokens can need at most: every token on every local expert it
  // may name, plus the padding of every segment.
  int64_t max_expert_rows() const;

  // Throws ConfigError naming the first invalid field and its value.
  void validate() const;
};

// Destination ranks of a token are a 64-bit mask.
inline constexpr int kMaxHighThroughputRanks = 64;

enum class HighThroughputLayout : int32_t { kRankPacked = 0, kExpertContiguous = 1 };

// This rank's side of one dispatch: where its tokens went and where its received rows came from, all that a
// combine needs. Made by HighThroughputAllToAll::make_handle (device memory sized for the configuration), filled
// by dispatch_layout and dispatch_data.
class HighThroughputHandle {
 public:
  ~HighThroughputHandle();
  HighThroughputHandle(const HighThroughputHandle&) = delete;
  HighThroughputHandle& operator=(const HighThroughputHandle&) = delete;

  uint32_t m() const { return m_; }
  HighThroughputLayout layout() const { return layout_; }
  bool has_data() const { return has_data_; }  // dispatch_data has run into it
  uint64_t dispatch_index() const { return dispatch_index_; }

 private:
  friend class HighThroughputAllToAll;
  struct Memory;
  HighThroughputHandle();
  std::unique_ptr<Memory> memory_;
  uint32_t m_ = 0;
  HighThroughputLayout layout_ = HighThroughputLayout::kRankPacked;
  bool has_data_ = false;
  uint64_t dispatch_index_ = 0;  // which dispatch of its object filled it (0: none)
  uint64_t x_bytes_ = 0;         // the payload bytes per token its dispatch_layout announced
};

// What a dispatch delivers to this rank, read on the host after dispatch_layout (one stream synchronization).
struct HighThroughputCounts {
  int64_t num_recv_tokens = 0;             // rank-packed rows
  int64_t num_expert_rows = 0;             // expert-contiguous rows, padding included
  std::vector<int64_t> tokens_per_expert;  // [num_local_experts]
};

struct HighThroughputDispatchInputs {
  Strided2D<const uint8_t> x;      // [m][x_bytes], bytes contiguous, rows a multiple of 16 bytes apart
  uint64_t x_bytes = 0;            // payload bytes per token, a multiple of 16, <= hidden_dim_bytes; 0: that
  Strided2D<const float> x_scale;  // [m][hidden_dim_scale_bytes / 4] at any strides; null without scales
  const void* topk_idx = nullptr;  // [m][k] packed, int32 or int64; -1: no expert in that slot
  bool topk_idx_int64 = true;
  const float* topk_weights = nullptr;  // [m][k] packed
  uint32_t m = 0;                       // <= max_num_tokens
};

struct HighThroughputDispatchOutputs {
  HighThroughputLayout layout = HighThroughputLayout::kRankPacked;
  uint64_t capacity_rows = 0;     // rows each per-row output holds; more rows is DeviceError, nothing written
  uint8_t* recv_x = nullptr;      // [capacity_rows][x_bytes], packed
  Strided2D<float> recv_x_scale;  // [capacity_rows][s] at any strides; null without scales
  // Rank-packed layout:
  int64_t* recv_topk_idx = nullptr;    // [capacity_rows][k]: the local expert of each slot, or -1
  float* recv_topk_weights = nullptr;  // [capacity_rows][k]: its weight, or 0
  // Expert-contiguous layout:
  int32_t* row_expert = nullptr;  // [capacity_rows]: the row's local expert, -1 on padding rows
  float* row_weight = nullptr;    // [capacity_rows]: that expert's weight for the row's token, 0 on padding
  // Both (each may be null):
  int32_t* tokens_per_expert = nullptr;  // [num_local_experts]
  int32_t* expert_offsets = nullptr;     // [num_local_experts + 1]: first row of each expert-contiguous segment
  int32_t* num_recv_rows = nullptr;      // [1]: rows of the chosen layout, padding included
};

struct HighThroughputCombineParams {
  // [rows][hidden_dim] of `type`, packed, in the layout of the handle's dispatch: one row per received token
  // (rank-packed) or per expert-contiguous row (null where the rank received none). May be
  // combine_input_buffer() in the rank-packed layout.
  const void* expert_out = nullptr;
  ScalarType type = ScalarType::kBFloat16;  // bf16, fp16 or float32 (combine_element_bytes 4); also out's type
  void* out = nullptr;                      // [m][hidden_dim] of `type`, packed
  // Expert-contiguous only: [rows] the weight of each expert_out row; null: the weights the dispatch delivered.
  // (A training backward passes ones: the gradient of the rows is summed unweighted.)
  const float* row_weight = nullptr;
  // with_topk_weights: one float per slot carried back beside the rows (every rank alike: it is part of the
  // collective), from topk_weights in the layout of the handle's dispatch, [rows][k] as recv_topk_weights
  // (rank-packed) or [rows], the value of the row's slot (expert-contiguous). out_topk_weights[t][j] ([m][k],
  // packed) is the value the rank holding slot j's expert has for it (0 for a slot with no expert): what a
  // training backward needs for the weights' gradients. Either pointer may be null where its extent is 0.
  bool with_topk_weights = false;
  const float* topk_weights = nullptr;
  float* out_topk_weights = nullptr;
};

class HighThroughputAllToAll {
 public:
  virtual ~HighThroughputAllToAll();
  HighThroughputAllToAll(const HighThroughputAllToAll&) = delete;
  HighThroughputAllToAll& operator=(const HighThroughputAllToAll&) = delete;

  std::unique_ptr<HighThroughputHandle> make_handle() const;

  // The count exchange: routes this rank's tokens and tells every rank what it receives. Collective.
  void dispatch_layout(const HighThroughputDispatchInputs& inputs, HighThroughputLayout layout,
                       HighThroughputHandle& handle, cudaStream_t stream);
  // Synchronizes `stream` and reads what the handle's dispatch_layout found (raises DeviceError on a device
  // error, a timeout included).
  HighThroughputCounts counts(const HighThroughputHandle& handle, cudaStream_t stream) const;
  // Moves the rows into `outputs` (in the layout given to dispatch_layout). Collective.
  void dispatch_data(const HighThroughputDispatchInputs& inputs, HighThroughputHandle& handle,
                     const HighThroughputDispatchOutputs& outputs, cudaStream_t stream);
  // Both halves, with no host synchronization.
  void dispatch(const HighThroughputDispatchInputs& inputs, HighThroughputHandle& handle,
                const HighThroughputDispatchOutputs& outputs, cudaStream_t stream);
  // out[t] = the sum over the ranks that received token t of their rows for it (see the file comment). Collective.
  void combine(const HighThroughputCombineParams& params, const HighThroughputHandle& handle, cudaStream_t stream);

  // Raises DeviceError if a kernel of this object recorded an error; sticky, as AllToAll::check_errors.
  void check_errors() const;

  // The fault-tolerant mode (AllToAllOptions::fault_tolerant), as AllToAll's: active_ranks is int32 [world_size]
  // on the device, 1 for each rank this one still serves with, 0 for each it has masked out (nullptr in the default
  // mode). A wait that runs out on a rank masks it; the ranks agree on the mask before each combine's sums. A
  // masked rank's tokens are not received and its rows are left out of the sums (its experts' terms are zero);
  // nothing is sent to it or read from it. Within the dispatch in flight at a death, ranks still hearing of it
  // may receive tokens from the dead rank that others leave out; every row lands where its receiver placed it.
  bool fault_tolerant() const;
  int32_t* active_ranks() const;

  // Rows of this rank's combine input, [recv_rows()][hidden_dim * combine_element_bytes bytes]: rank-packed
  // expert outputs written here (in stream order after dispatch_data) are not copied by combine where every peer
  // is load/store reachable.
  void* combine_input_buffer() const;
  // Where this rank's tokens (and scales) are staged for peers: [max_num_tokens] rows, further apart than their
  // bytes (the views' row_stride). A caller that writes x (x_scale) here and passes these views saves the dispatch
  // a copy of each; write them in stream order after the previous combine.
  Strided2D<uint8_t> dispatch_input_buffer() const;
  Strided2D<float> dispatch_input_scale_buffer() const;

  const HighThroughputConfig& config() const { return config_; }
  int device() const { return device_; }
  LaunchShape launch_shape() const;
  uint64_t symmetric_bytes() const;  // the symmetric buffer of each rank
  bool uses_puts() const;            // rows travel by puts (some peer is not load/store reachable)

 protected:
  explicit HighThroughputAllToAll(const HighThroughputConfig& config);
  // As AllToAll::agree_and_prepare.
  void agree_and_prepare(const AllToAllOptions& options, bool transport_may_put, const char* transport, int rank,
                         int world_size, const AllGatherBytes& all_gather,
                         const std::function<void()>& transport_checks);
  void set_symmetric_buffer(uint8_t* local_base, bool uses_puts);

  struct Launch;  // the kernels' arguments (internal)
  virtual void launch_route(const Launch& launch, cudaStream_t stream) = 0;
  virtual void launch_data(const Launch& launch, cudaStream_t stream) = 0;
  virtual void launch_combine(const Launch& launch, ScalarType type, cudaStream_t stream) = 0;

 private:
  struct State;
  Launch make_launch(const HighThroughputHandle& handle) const;
  HighThroughputConfig config_;
  int device_;
  std::unique_ptr<State> state_;
};

class IpcSymmetricBuffer;
class NvshmemSymmetricBuffer;

// Among the ranks of one node, over peer memory (as AllToAllIntranode).
class HighThroughputIntranode final : public HighThroughputAllToAll {
 public:
  HighThroughputIntranode(const HighThroughputConfig& config, const AllGatherBytes& all_gather,
                          const AllToAllOptions& options = {});
  ~HighThroughputIntranode() override;

 private:
  void launch_route(const Launch& launch, cudaStream_t stream) override;
  void launch_data(const Launch& launch, cudaStream_t stream) override;
  void launch_combine(const Launch& launch, ScalarType type, cudaStream_t stream) override;
  std::unique_ptr<IpcSymmetricBuffer> buffer_;
};

// Through NVSHMEM (as AllToAllInternode): stores to peers it can map, puts to the others.
class HighThroughputInternode final : public HighThroughputAllToAll {
 public:
  explicit HighThroughputInternode(const HighThroughputConfig& config, const AllToAllOptions& options = {});
  ~HighThroughputInternode() override;

 private:
  void launch_route(const Launch& launch, cudaStream_t stream) override;
  void launch_data(const Launch& launch, cudaStream_t stream) override;
  void launch_combine(const Launch& launch, ScalarType type, cudaStream_t stream) override;
  std::unique_ptr<NvshmemSymmetricBuffer> buffer_;
  bool uses_puts_ = false;
};

}  // namespace expertwire
