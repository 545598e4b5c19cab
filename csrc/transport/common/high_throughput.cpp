// The host half of the high-throughput all-to-all that both transports share: configuration, layout, workspace,
// handles, argument checks and the order of calls.
#include "expertwire/high_throughput.h"

#include <atomic>
#include <limits>
#include <string>
#include <vector>

#include "core/cuda_utils.h"
#include "core/env.h"
#include "core/error.h"
#include "core/ht_layout.h"
#include "device/error_record.h"
#include "transport/common/agreement.h"
#include "transport/common/high_throughput_launch.h"
#include "transport/common/launch_shape.h"

namespace expertwire {
namespace {

// The next call each call may be followed by: dispatch_layout, then dispatch_data, then combine.
enum class NextCall { kDispatchLayout, kDispatchData, kCombine };

const char* next_call_name(NextCall call) {
  switch (call) {
    case NextCall::kDispatchLayout: return "dispatch (or dispatch_layout)";
    case NextCall::kDispatchData: return "dispatch_data";
    case NextCall::kCombine: return "combine";
  }
  return "?";
}

}  // namespace

struct HighThroughputHandle::Memory {
  Memory(const HtHandleLayout& layout, uint32_t local_experts)
      : device(layout.words * sizeof(uint32_t)), host_counts(2 + local_experts) {}
  DeviceBuffer device;
  MappedHostArray<uint32_t> host_counts;
};

HighThroughputHandle::HighThroughputHandle() = default;
HighThroughputHandle::~HighThroughputHandle() = default;

struct HighThroughputAllToAll::State {
  State(const HighThroughputConfig& config, const AllToAllOptions& options, bool may_put)
      : shape(default_launch_shape(options.max_sm_count)),
        layout(make_ht_layout(config, may_put)),
        handle_layout(make_ht_handle_layout(layout)),
        timeout_ns(options.timeout_ns != 0 ? options.timeout_ns : default_timeout_ns()),
        fault_tolerant(options.fault_tolerant),
        workspace(sizeof(device::HtWorkspace)) {
    const std::vector<int32_t> every_rank_active(size_t(config.world_size), 1);
    EW_CUDA_CHECK(cudaMemcpy(active_ranks(), every_rank_active.data(), every_rank_active.size() * sizeof(int32_t),
                             cudaMemcpyHostToDevice));
  }

  int32_t* active_ranks() const { return workspace.get<device::HtWorkspace>()->active_ranks; }

  LaunchShape shape;
  HtLayout layout;
  HtHandleLayout handle_layout;
  uint64_t timeout_ns;
  bool fault_tolerant;
  DeviceBuffer workspace;
  MappedHostObject<ErrorRecord> error;
  uint8_t* symmetric = nullptr;
  bool uses_puts = false;
  NextCall next = NextCall::kDispatchLayout;
  uint64_t dispatches = 0;
};

HighThroughputAllToAll::HighThroughputAllToAll(const HighThroughputConfig& config)
    : config_(config), device_(current_device()) {}
HighThroughputAllToAll::~HighThroughputAllToAll() = default;

void HighThroughputAllToAll::agree_and_prepare(const AllToAllOptions& options, bool transport_may_put,
                                               const char* transport, int rank, int world_size,
                                               const AllGatherBytes& all_gather,
                                               const std::function<void()>& transport_checks) {
  agree_before_allocating(transport, rank, world_size, all_gather, [&] {
    config_.validate();
    state_ = std::make_unique<State>(config_, options, transport_may_put);
    transport_checks();
    return ht_layout_signature(state_->layout, options.fault_tolerant);
  });
}

void HighThroughputAllToAll::set_symmetric_buffer(uint8_t* local_base, bool uses_puts) {
  state_->symmetric = local_base;
  state_->uses_puts = uses_puts;
}

LaunchShape HighThroughputAllToAll::launch_shape() const { return state_->shape; }
bool HighThroughputAllToAll::fault_tolerant() const { return state_->fault_tolerant; }
int32_t* HighThroughputAllToAll::active_ranks() const {
  return state_->fault_tolerant ? state_->active_ranks() : nullptr;
}
uint64_t HighThroughputAllToAll::symmetric_bytes() const { return state_->layout.symmetric_bytes; }
bool HighThroughputAllToAll::uses_puts() const { return state_->uses_puts; }

void* HighThroughputAllToAll::combine_input_buffer() const {
  return state_->symmetric + state_->layout.combine_rows_offset;
}

Strided2D<uint8_t> HighThroughputAllToAll::dispatch_input_buffer() const {
  const HtLayout& l = state_->layout;
  return Strided2D<uint8_t>{state_->symmetric + l.input_rows_offset, l.input_row_bytes, 1};
}

Strided2D<float> HighThroughputAllToAll::dispatch_input_scale_buffer() const {
  const HtLayout& l = state_->layout;
  float* data = l.hidden_dim_scale_bytes == 0
                    ? nullptr
                    : reinterpret_cast<float*>(state_->symmetric + l.input_rows_offset + l.scale_offset);
  return Strided2D<float>{data, l.input_row_bytes, sizeof(float)};
}

std::unique_ptr<HighThroughputHandle> HighThroughputAllToAll::make_handle() const {
  const ScopedDevice on_own_device(device_);
  std::unique_ptr<HighThroughputHandle> handle(new HighThroughputHandle());
  handle->memory_ =
      std::make_unique<HighThroughputHandle::Memory>(state_->handle_layout, state_->layout.num_local_experts);
  return handle;
}

void HighThroughputAllToAll::check_errors() const {
  const volatile ErrorRecord* mapped = state_->error.host();
  ErrorRecord record{};
  record.code = mapped->code;
  std::atomic_thread_fence(std::memory_order_acquire);
  record.phase = mapped->phase;
  record.peer = mapped->peer;
  record.value = mapped->value;
  if (record.code != ErrorCode::kNone) EW_THROW(DeviceError, "expertwire: ", describe(record, config_.rank));
}

HighThroughputAllToAll::Launch HighThroughputAllToAll::make_launch(const HighThroughputHandle& handle) const {
  const HtHandleLayout& hl = state_->handle_layout;
  auto* words = handle.memory_->device.get<uint32_t>();
  device::HtHandleView h{};
  h.block_counts = words + hl.block_counts;
  h.slot_rank_row = reinterpret_cast<int32_t*>(words + hl.slot_rank_row);
  h.slot_expert_row = reinterpret_cast<int32_t*>(words + hl.slot_expert_row);
  h.slot_dest = reinterpret_cast<int32_t*>(words + hl.slot_dest);
  h.recv_base = words + hl.recv_base;
  h.base_at = words + hl.base_at;
  h.send_base = words + hl.send_base;
  h.home_base = words + hl.home_base;
  h.segment_start = words + hl.segment_start;
  h.tokens_per_expert = words + hl.tokens_per_expert;
  h.expert_prefix = words + hl.expert_prefix;
  h.source_m = words + hl.source_m;
  h.recv_slot_row = reinterpret_cast<int32_t*>(words + hl.recv_slot_row);
  h.recv_slot_weight = reinterpret_cast<float*>(words + hl.recv_slot_weight);
  h.host_counts = handle.memory_->host_counts.device();
  Launch launch{};
  launch.shape = state_->shape;
  device::HtArgs& a = launch.args;
  a.l = state_->layout;
  a.symmetric = state_->symmetric;
  a.workspace = state_->workspace.get<device::HtWorkspace>();
  a.error = state_->error.device();
  a.timeout_ns = state_->timeout_ns;
  a.fault_tolerant = state_->fault_tolerant;
  a.h = h;
  a.m = handle.m_;
  a.layout = handle.layout_;
  return launch;
}

namespace {

// The dispatch inputs, checked; x_bytes resolved.
HighThroughputDispatchInputs checked_inputs(const HighThroughputConfig& config, HighThroughputDispatchInputs in) {
  EW_REQUIRE(in.m <= uint64_t(config.max_num_tokens), "dispatch: m must be <= max_num_tokens=", config.max_num_tokens,
             ", got ", in.m);
  if (in.x_bytes == 0) in.x_bytes = uint64_t(config.hidden_dim_bytes);
  EW_REQUIRE(in.x_bytes % 16 == 0 && in.x_bytes <= uint64_t(config.hidden_dim_bytes),
             "dispatch: x_bytes must be a multiple of 16 and <= hidden_dim_bytes=", config.hidden_dim_bytes, ", got ",
             in.x_bytes);
  if (in.m == 0) return in;
  EW_REQUIRE(in.x.data != nullptr, "dispatch: x is null with m=", in.m);
  EW_REQUIRE(in.x.element_stride == 1, "dispatch: x's bytes must be contiguous in a row (element_stride 1), got ",
             in.x.element_stride);
  EW_REQUIRE(in.x.row_stride % 16 == 0 && reinterpret_cast<uintptr_t>(in.x.data) % 16 == 0,
             "dispatch: x and its row stride must be 16-byte aligned, got row_stride ", in.x.row_stride);
  EW_REQUIRE(in.m == 1 || in.x.row_stride >= in.x_bytes, "dispatch: x's rows overlap: row_stride ", in.x.row_stride,
             " < ", in.x_bytes, " bytes");
  if (config.hidden_dim_scale_bytes != 0) {
    EW_REQUIRE(in.x_scale.data != nullptr,
               "dispatch: x_scale is null but hidden_dim_scale_bytes=", config.hidden_dim_scale_bytes);
    EW_REQUIRE(in.x_scale.row_stride % 4 == 0 && in.x_scale.element_stride % 4 == 0 &&
                   reinterpret_cast<uintptr_t>(in.x_scale.data) % 4 == 0,
               "dispatch: x_scale's strides must be multiples of 4 bytes, got ", in.x_scale.row_stride, " and ",
               in.x_scale.element_stride);
  } else {
    EW_REQUIRE(in.x_scale.data == nullptr, "dispatch: x_scale given but hidden_dim_scale_bytes is 0");
  }
  EW_REQUIRE(in.topk_idx != nullptr, "dispatch: topk_idx is null with m=", in.m);
  EW_REQUIRE(in.topk_weights != nullptr, "dispatch: topk_weights is null with m=", in.m);
  return in;
}

}  // namespace

void HighThroughputAllToAll::dispatch_layout(const HighThroughputDispatchInputs& raw, HighThroughputLayout layout,
                                             HighThroughputHandle& handle, cudaStream_t stream) {
  check_errors();
  const ScopedDevice on_own_device(device_);
  const HighThroughputDispatchInputs in = checked_inputs(config_, raw);
  EW_REQUIRE(state_->next != NextCall::kDispatchData,
             "dispatch_layout: the last dispatch_layout still waits for its dispatch_data");
  EW_REQUIRE(state_->next == NextCall::kDispatchLayout,
             "dispatch_layout: every dispatch must be followed by a combine before the next dispatch (calls "
             "alternate on every rank); expected ",
             next_call_name(state_->next));
  handle.m_ = in.m;
  handle.x_bytes_ = in.x_bytes;
  handle.layout_ = layout;
  handle.has_data_ = false;
  handle.dispatch_index_ = ++state_->dispatches;
  Launch launch = make_launch(handle);
  device::HtArgs& a = launch.args;
  a.x = in.x;
  a.x_bytes = uint32_t(in.x_bytes);
  a.x_scale = in.x_scale;
  a.topk_idx = in.topk_idx;
  a.topk_idx_int64 = in.topk_idx_int64;
  a.topk_weights = in.topk_weights;
  const Strided2D<uint8_t> x_buffer = dispatch_input_buffer();
  const Strided2D<float> scale_buffer = dispatch_input_scale_buffer();
  a.x_staged = in.m > 0 && in.x.data == x_buffer.data && (in.m == 1 || in.x.row_stride == x_buffer.row_stride);
  a.scale_staged = in.m > 0 && scale_buffer.data != nullptr && in.x_scale.data == scale_buffer.data &&
                   (in.m == 1 || in.x_scale.row_stride == scale_buffer.row_stride) &&
                   in.x_scale.element_stride == scale_buffer.element_stride;
  launch_route(launch, stream);
  state_->next = NextCall::kDispatchData;
}

HighThroughputCounts HighThroughputAllToAll::counts(const HighThroughputHandle& handle, cudaStream_t stream) const {
  EW_CUDA_CHECK(cudaStreamSynchronize(stream));
  check_errors();
  const volatile uint32_t* words = handle.memory_->host_counts.host();  // written by the offsets kernel
  HighThroughputCounts counts;
  counts.num_recv_tokens = words[0];
  counts.num_expert_rows = words[1];
  for (int64_t e = 0; e < config_.num_local_experts(); ++e) counts.tokens_per_expert.push_back(words[2 + e]);
  return counts;
}

void HighThroughputAllToAll::dispatch_data(const HighThroughputDispatchInputs& raw, HighThroughputHandle& handle,
                                           const HighThroughputDispatchOutputs& out, cudaStream_t stream) {
  // No check_errors() here: bad input that this rank's layout half recorded must not keep it from the data half,
  // which its peers wait for; the next call (or counts()) reports it.
  const ScopedDevice on_own_device(device_);
  EW_REQUIRE(state_->next == NextCall::kDispatchData && handle.dispatch_index_ == state_->dispatches,
             "dispatch_data: must follow dispatch_layout with the same handle; expected ",
             next_call_name(state_->next));
  const HighThroughputDispatchInputs in = checked_inputs(config_, raw);
  EW_REQUIRE(in.m == handle.m_, "dispatch_data: m must be the dispatch_layout's ", handle.m_, ", got ", in.m);
  EW_REQUIRE(in.x_bytes == handle.x_bytes_, "dispatch_data: x_bytes must be the dispatch_layout's ", handle.x_bytes_,
             ", got ", in.x_bytes);
  EW_REQUIRE(out.layout == handle.layout_, "dispatch_data: outputs.layout must be the layout given to dispatch_layout");
  EW_REQUIRE(out.capacity_rows <= uint64_t(std::numeric_limits<int32_t>::max()),
             "dispatch_data: capacity_rows too large for 32-bit rows, got ", out.capacity_rows);
  if (out.capacity_rows > 0) {
    EW_REQUIRE(out.recv_x != nullptr, "dispatch_data: recv_x is null with capacity_rows=", out.capacity_rows);
    EW_REQUIRE(reinterpret_cast<uintptr_t>(out.recv_x) % 16 == 0, "dispatch_data: recv_x must be 16-byte aligned");
    EW_REQUIRE(config_.hidden_dim_scale_bytes == 0 || out.recv_x_scale.data != nullptr,
               "dispatch_data: recv_x_scale is null but hidden_dim_scale_bytes=", config_.hidden_dim_scale_bytes);
    if (out.layout == HighThroughputLayout::kRankPacked) {
      EW_REQUIRE(out.recv_topk_idx != nullptr && out.recv_topk_weights != nullptr,
                 "dispatch_data: the rank-packed layout needs recv_topk_idx and recv_topk_weights");
    } else {
      EW_REQUIRE(out.row_expert != nullptr && out.row_weight != nullptr,
                 "dispatch_data: the expert-contiguous layout needs row_expert and row_weight");
    }
  }
  Launch launch = make_launch(handle);
  device::HtArgs& a = launch.args;
  a.x_bytes = uint32_t(in.x_bytes);
  a.out = out;
  launch_data(launch, stream);
  handle.has_data_ = true;
  state_->next = NextCall::kCombine;
}

void HighThroughputAllToAll::dispatch(const HighThroughputDispatchInputs& inputs, HighThroughputHandle& handle,
                                      const HighThroughputDispatchOutputs& outputs, cudaStream_t stream) {
  dispatch_layout(inputs, outputs.layout, handle, stream);
  dispatch_data(inputs, handle, outputs, stream);
}

void HighThroughputAllToAll::combine(const HighThroughputCombineParams& p, const HighThroughputHandle& handle,
                                     cudaStream_t stream) {
  check_errors();
  const ScopedDevice on_own_device(device_);
  EW_REQUIRE(state_->next == NextCall::kCombine, "combine: expected ", next_call_name(state_->next),
             " (calls alternate: dispatch, combine, dispatch, ...)");
  EW_REQUIRE(handle.has_data_, "combine: the handle's dispatch has not moved its rows (dispatch_data)");
  const uint64_t element_bytes = scalar_type_size(p.type);
  EW_REQUIRE(element_bytes <= uint64_t(config_.combine_element_bytes), "combine: ", scalar_type_name(p.type),
             " rows need combine_element_bytes >= ", element_bytes, ", the configuration has ",
             config_.combine_element_bytes);
  EW_REQUIRE(p.out != nullptr || handle.m_ == 0, "combine: out is null with m=", handle.m_);
  for (const void* pointer : {p.expert_out, static_cast<const void*>(p.out)}) {
    EW_REQUIRE(reinterpret_cast<uintptr_t>(pointer) % 16 == 0, "combine: expert_out and out must be 16-byte aligned");
  }
  const bool staged = p.expert_out == combine_input_buffer();
  EW_REQUIRE(!staged || element_bytes == uint64_t(config_.combine_element_bytes),
             "combine: combine_input_buffer() rows are combine_element_bytes=", config_.combine_element_bytes,
             " per element; ", scalar_type_name(p.type), " rows there would be read at the wrong stride");
  EW_REQUIRE(!staged || handle.layout_ == HighThroughputLayout::kRankPacked,
             "combine: combine_input_buffer() holds rank-packed rows; an expert-contiguous expert_out is the "
             "caller's own");
  EW_REQUIRE(p.row_weight == nullptr || handle.layout_ == HighThroughputLayout::kExpertContiguous,
             "combine: row_weight is for an expert-contiguous dispatch; rank-packed rows are summed as they are");
  EW_REQUIRE(!p.with_topk_weights || p.out_topk_weights != nullptr || handle.m_ == 0,
             "combine: with_topk_weights needs out_topk_weights for m=", handle.m_);
  EW_REQUIRE(p.with_topk_weights || (p.topk_weights == nullptr && p.out_topk_weights == nullptr),
             "combine: topk_weights / out_topk_weights given without with_topk_weights");
  Launch launch = make_launch(handle);
  device::HtArgs& a = launch.args;
  a.expert_out = static_cast<const uint8_t*>(p.expert_out);
  a.combine_out = static_cast<uint8_t*>(p.out);
  a.expert_out_staged = staged;
  a.combine_row_weight = p.row_weight;
  a.combine_carry_slots = p.with_topk_weights;
  a.combine_topk_weights = p.topk_weights;
  a.combine_out_topk_weights = p.out_topk_weights;
  launch_combine(launch, p.type, stream);
  state_->next = NextCall::kDispatchLayout;
}

}  // namespace expertwire
