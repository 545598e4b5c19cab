// One rank's side of a checked dispatch + combine: the calls the multi-rank tests make and the checks of
// what they produced against the CPU reference model. test_all_to_all (random configurations, soak) and
// test_failures (bad input, timeouts) share it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/cuda_utils.h"
#include "core/error.h"
#include "expertwire/all_to_all.h"
#include "expertwire/config.h"
#include "expertwire/dtype.h"
#include "expertwire/params.h"
#include "reference/reference.h"
#include "tests/common/workload.h"

namespace expertwire::harness {

// Collects the first few mismatches of one rank.
class Failures {
 public:
  template <class... Parts>
  void add(Parts&&... parts) {
    if (count_++ < kKept) messages_.push_back(detail::concat(std::forward<Parts>(parts)...));
  }
  bool empty() const { return count_ == 0; }
  // One indented line per kept message, and how many more there were.
  std::string summary() const;

 private:
  static constexpr size_t kKept = 5;
  size_t count_ = 0;
  std::vector<std::string> messages_;
};

// The shape of one dispatch + combine call.
struct CallShape {
  std::vector<int64_t> m_per_group;  // tokens of each DP group
  ScalarType out_type = ScalarType::kFloat32;
  ScalarType expert_type = ScalarType::kBFloat16;
  bool split = false;        // send and receive halves launched separately
  bool use_bound_m = false;  // pass m = max_num_tokens and the real count through bound_m
  // Which ranks' experts write into AllToAll::expert_output_buffer(), passed as expert_y; the others pass their
  // own expert_y. Mixed, readers find some owners' rows in place and others pushed to them.
  enum class InBuffer { kNone, kAll, kOddRanks } expert_y_in_buffer = InBuffer::kNone;
  // How the scale tensors are laid out: contiguous; rows padded with unused words (vLLM's
  // per-token fp8 allocates wider rows than it fills); column-major, each expert's words [word][row] (DeepGEMM's
  // layout; dp_x_scale [word][token]).
  enum class ScaleLayout { kContiguous, kPaddedRows, kColumnMajor } scale_layout = ScaleLayout::kContiguous;
  // Which ranks write their tokens into AllToAll::dispatch_input_buffer() (and their scales into
  // dispatch_input_scale_buffer(), unless column-major), passed as dp_x (and dp_x_scale).
  InBuffer dp_x_in_buffer = InBuffer::kNone;
  bool dp_x_padded_rows = false;  // a caller's dp_x rows lie kDpXRowPadBytes further apart than their bytes
  bool no_expert_slots = false;   // some slots of indices are kNoExpert (DeepEP's -1)
  bool int64_indices = false;     // indices passed as int64, -1 for kNoExpert (IndexType::kInt64)
  bool expert_y_in_buffer_on(int64_t rank) const { return on(expert_y_in_buffer, rank); }
  bool dp_x_in_buffer_on(int64_t rank) const { return on(dp_x_in_buffer, rank); }

 private:
  static bool on(InBuffer which, int64_t rank) {
    return which == InBuffer::kAll || (which == InBuffer::kOddRanks && rank % 2 == 1);
  }
};

// A random call. Index 0 fills every group to max_num_tokens and index 1 leaves group 0 empty, so a sequence
// of calls covers both ends of the range.
CallShape random_call_shape(Rng& rng, const AllToAllConfig& config, int index);
// "m=[3 0] out=float32 expert=bfloat16 split=0 bound_m=1 in_buffer=odd scales=padded"
std::string describe(const CallShape& shape);

// Every DP group's tokens of a call: every rank rebuilds all of them from the seed to predict what it receives.
std::vector<GroupData> make_all_groups(const AllToAllConfig& config, const CallShape& shape, uint64_t seed);

// What each local expert of this rank should receive from `groups`, by the reference model.
std::vector<reference::ExpertInbox> reference_inboxes(const AllToAllConfig& config,
                                                      const std::vector<GroupData>& groups);

// One call of AllToAll::dispatch / ::combine in `mode` (SplitMode), with the rest of `params` as they are.
void call_dispatch(AllToAll& a2a, DispatchParams params, SplitMode mode, cudaStream_t stream);
void call_combine(AllToAll& a2a, CombineParams params, SplitMode mode, cudaStream_t stream);

// This rank's device buffers for the calls of one configuration, allocated once and reused by every call.
// Each output is followed by a guard region, and outputs and guards are filled with a sentinel before every
// call, so the checks see any byte written outside the rows a call may fill.
class RoundTrip {
 public:
  explicit RoundTrip(const AllToAllConfig& config);
  ~RoundTrip();
  RoundTrip(const RoundTrip&) = delete;
  RoundTrip& operator=(const RoundTrip&) = delete;

  // Copies this rank's tokens (rows and scales laid out as `shape` says), indices and weights to the device; the
  // device bound_m holds own.m.
  void upload(const GroupData& own, const CallShape& shape);
  // Replaces the device value behind bound_m (tests of a bad bound_m).
  void set_device_bound_m(uint32_t value);
  // Replaces entry k of token t's row of the int64 indices (tests of int64 values no expert stands for).
  void set_int64_index(uint32_t t, uint32_t k, int64_t value);

  // The arguments of this rank's calls of `shape`, so a test can spoil one and make the call.
  DispatchParams dispatch_arguments(const CallShape& shape) const;
  CombineParams combine_arguments(const CallShape& shape) const;

  // Calls dispatch (in two halves when shape.split), waits for it and raises its device error, if any. When the
  // shape says so, the tokens move into a2a's dispatch input buffers first, in stream order.
  void dispatch(AllToAll& a2a, const CallShape& shape);
  // Checks what the last dispatch (of `shape`) delivered against `expected`: the counts, every row and its
  // scales byte for byte, and the sentinel in every other byte of the outputs and their guards. Remembers each
  // row's source for combine.
  void check_dispatch(const CallShape& shape, const std::vector<reference::ExpertInbox>& expected, Failures& failures);
  // Fills expert_y (or the object's expert_output_buffer(), per shape) with the test experts' outputs for the
  // rows check_dispatch saw, calls combine, waits for it and raises its device error, if any.
  void combine(AllToAll& a2a, const CallShape& shape);
  // Checks out_tokens against the reference combine of `own` (this rank's group), and the sentinel after its
  // first own.m rows.
  void check_combine(const GroupData& own, const CallShape& shape, Failures& failures);
  // Checks that the last combine wrote no byte of out_tokens.
  void check_combine_wrote_nothing(Failures& failures);

  cudaStream_t stream() const { return stream_; }

 private:
  size_t expert_x_bytes() const;
  size_t expert_scale_bytes() const;  // room for the widest scale layout
  Strided3D<float> out_expert_x_scale(const CallShape& shape) const;
  size_t out_tokens_bytes() const;
  // The m a call passes: max_num_tokens when the device bound_m carries the count, else this rank's own m.
  uint32_t call_m(const CallShape& shape) const;
  void fill_dispatch_outputs();
  // Copies the uploaded tokens (and their scales, unless column-major) into a2a's dispatch input buffers and
  // points `params` at them.
  void copy_inputs_into_buffers(AllToAll& a2a, const CallShape& shape, DispatchParams& params) const;

  AllToAllConfig config_;
  cudaStream_t stream_ = nullptr;
  DeviceBuffer dp_x_, dp_x_scale_, indices_, indices_int64_, weights_, bound_m_;
  // The last upload's dp_x_ and dp_x_scale_, as laid out.
  Strided2D<const uint8_t> dp_x_view_;
  Strided2D<const float> dp_x_scale_view_;
  DeviceBuffer num_tokens_, expert_x_, expert_x_scale_, expert_y_, out_tokens_;  // each ends in a guard
  uint32_t own_m_ = 0;
  std::vector<std::vector<std::pair<uint32_t, uint32_t>>> rows_of_;  // (group, token) of each row, per expert
};

// One whole checked call: draws every group's tokens from `seed`, uploads this rank's, dispatches, checks,
// combines, checks. Mismatches go to `failures`; errors raised by the calls propagate.
void run_checked_round_trip(AllToAll& a2a, RoundTrip& trip, const AllToAllConfig& config, const CallShape& shape,
                            uint64_t seed, Failures& failures);

}  // namespace expertwire::harness
