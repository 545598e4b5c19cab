// The host half both transports share: configuration, buffer layout, local workspace, the device error record,
// the launch shape and the argument checks. A transport owns the symmetric memory and launches the kernels with
// its own device Transport.
#include "expertwire/all_to_all.h"

#include <atomic>
#include <vector>

#include "core/arguments.h"
#include "core/call_order.h"
#include "core/cuda_utils.h"
#include "core/env.h"
#include "core/error.h"
#include "core/layout.h"
#include "device/error_record.h"
#include "device/kernel_args.h"
#include "device/wire_protocol.h"
#include "transport/common/agreement.h"
#include "transport/common/launch_shape.h"

namespace expertwire {

// One block per SM the process may use (EXPERTWIRE_NUM_BLOCKS overrides), at most `max_sm_count` blocks when it
// is non-zero, EXPERTWIRE_BLOCK_THREADS threads (default 512).
LaunchShape default_launch_shape(uint32_t max_sm_count) {
  int sms = 0;
  EW_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, current_device()));
  const uint32_t threads = positive_uint32_from_env("EXPERTWIRE_BLOCK_THREADS", 512);
  EW_REQUIRE(threads % 32 == 0 && threads <= device::kMaxBlockThreads,
             "EXPERTWIRE_BLOCK_THREADS must be a multiple of 32 <= ", device::kMaxBlockThreads, ", got ", threads);
  uint32_t blocks = positive_uint32_from_env("EXPERTWIRE_NUM_BLOCKS", uint32_t(sms));
  if (max_sm_count != 0 && max_sm_count < blocks) blocks = max_sm_count;
  EW_REQUIRE(blocks <= ArrivalSignal::kMaxBlocks, "EXPERTWIRE_NUM_BLOCKS must be <= ", ArrivalSignal::kMaxBlocks,
             " (arrival signals count blocks in 16 bits), got ", blocks);
  // Blocks wait for their peers' blocks, so every block of the grid must be resident at once.
  const uint64_t resident = uint64_t(device::kMinBlocksPerSm) * uint64_t(sms);
  EW_REQUIRE(blocks <= resident, "EXPERTWIRE_NUM_BLOCKS must be <= ", device::kMinBlocksPerSm, " blocks per SM x ", sms,
             " SMs = ", resident, " (every block must be resident at once: blocks wait for their peers'), got ",
             blocks);
  return LaunchShape{blocks, threads};
}

namespace {

// Whether a dispatch input, `extent` bytes from `input`, is already staged: it lies in the staging rows
// [rows, rows + rows_bytes) as the dispatch would stage it (`is_buffer_in_its_layout`), so the dispatch copies
// nothing of it. Any other overlap with the staging rows is refused: staging the input would overwrite bytes
// that it has yet to read.
bool input_is_staged(const void* input, uint64_t extent, bool is_buffer_in_its_layout, const uint8_t* rows,
                     uint64_t rows_bytes, const char* name, const char* buffer_name, const void* buffer,
                     uint64_t row_stride) {
  const auto begin = reinterpret_cast<uintptr_t>(input), rows_begin = reinterpret_cast<uintptr_t>(rows);
  if (begin >= rows_begin + rows_bytes || rows_begin >= begin + extent) return false;
  EW_REQUIRE(is_buffer_in_its_layout, name, " overlaps the rows the dispatch stages tokens in without being ",
             buffer_name, "() in its layout (that address, rows ", row_stride, " bytes apart): it starts ",
             int64_t(begin - reinterpret_cast<uintptr_t>(buffer)), " bytes from it, ", extent,
             " bytes long; pass the buffer itself, or a view of its first m rows");
  return true;
}

}  // namespace

struct AllToAll::State {
  State(const AllToAllConfig& config, const AllToAllOptions& options, bool transport_may_put)
      : shape(default_launch_shape(options.max_sm_count)),
        // A put needs a registered source: one staging row per warp where the transport may put.
        layout(make_buffer_layout(config, transport_may_put ? shape.warps() : 0)),
        timeout_ns(options.timeout_ns != 0 ? options.timeout_ns : default_timeout_ns()),
        fault_tolerant(options.fault_tolerant),
        workspace(layout.workspace_bytes) {
    EW_REQUIRE(!fault_tolerant || config.dp_size == 1,
               "AllToAllOptions.fault_tolerant needs dp_size 1 (a lost rank's DP group would be served by only some "
               "of its receivers), got dp_size ",
               config.dp_size);
    const std::vector<int32_t> every_rank_active(size_t(config.world_size), 1);
    EW_CUDA_CHECK(cudaMemcpy(workspace.get<uint8_t>() + layout.active_ranks_offset, every_rank_active.data(),
                             every_rank_active.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
  }

  device::RankContext context(const AllToAllConfig& config) const {
    return device::RankContext{layout,
                               uint32_t(config.rank),
                               uint32_t(config.dp_rank()),
                               uint32_t(config.dp_group()),
                               symmetric,
                               workspace.get<uint8_t>(),
                               error.device(),
                               timeout_ns,
                               fault_tolerant};
  }

  LaunchShape shape;
  BufferLayout layout;
  uint64_t timeout_ns;
  bool fault_tolerant;
  DeviceBuffer workspace;
  MappedHostObject<ErrorRecord> error;
  uint8_t* symmetric = nullptr;
  CallOrder order;
};

AllToAll::AllToAll(const AllToAllConfig& config) : config_(config), device_(current_device()) {}

AllToAll::~AllToAll() = default;

void AllToAll::agree_and_prepare(const AllToAllOptions& options, bool transport_may_put, const char* transport,
                                 int rank, int world_size, const AllGatherBytes& all_gather,
                                 const std::function<void()>& transport_checks) {
  agree_before_allocating(transport, rank, world_size, all_gather, [&] {
    state_ = std::make_unique<State>(config_, options, transport_may_put);
    transport_checks();
    return layout_signature(state_->layout, options.fault_tolerant);
  });
}

const AllToAllConfig& AllToAll::config() const { return config_; }
bool AllToAll::fault_tolerant() const { return state_->fault_tolerant; }
int32_t* AllToAll::active_ranks() const {
  if (!state_->fault_tolerant) return nullptr;
  return reinterpret_cast<int32_t*>(state_->workspace.get<uint8_t>() + state_->layout.active_ranks_offset);
}
int AllToAll::device() const { return device_; }
LaunchShape AllToAll::launch_shape() const { return state_->shape; }
const BufferLayout& AllToAll::layout() const { return state_->layout; }
void AllToAll::set_symmetric_buffer(uint8_t* local_base) { state_->symmetric = local_base; }

void* AllToAll::expert_output_buffer() const { return state_->symmetric + state_->layout.expert_outputs_offset; }

Strided2D<uint8_t> AllToAll::dispatch_input_buffer() const {
  const BufferLayout& l = state_->layout;
  return Strided2D<uint8_t>{state_->symmetric + l.send_row_offset(0) + l.payload_offset_in_token(),
                            l.dispatch_token_bytes, 1};
}

Strided2D<float> AllToAll::dispatch_input_scale_buffer() const {
  const BufferLayout& l = state_->layout;
  float* data = l.hidden_dim_scale_bytes == 0
                    ? nullptr
                    : reinterpret_cast<float*>(state_->symmetric + l.send_row_offset(0) + l.scale_offset_in_token());
  return Strided2D<float>{data, l.dispatch_token_bytes, sizeof(float)};
}

void AllToAll::check_errors() const {
  // Kernels write the record while the host may read it: read each field through volatile, the code first
  // (published after the fields it goes with, see record_error).
  const volatile ErrorRecord* mapped = state_->error.host();
  ErrorRecord record{};
  record.code = mapped->code;
  std::atomic_thread_fence(std::memory_order_acquire);  // the fields after the code, also on weakly ordered hosts
  record.phase = mapped->phase;
  record.peer = mapped->peer;
  record.value = mapped->value;
  if (record.code != ErrorCode::kNone) EW_THROW(DeviceError, "expertwire: ", describe(record, config_.rank));
}

void AllToAll::dispatch(const DispatchParams& p, cudaStream_t stream) {
  check_errors();
  const ScopedDevice on_own_device(device_);
  const AllToAllConfig& config = config_;
  const BufferLayout& l = state_->layout;
  check_dispatch_layout(config, p);
  check_dispatch_pointers(config, p);
  const bool send = p.split != SplitMode::kRecv, recv = p.split != SplitMode::kSend;
  // Inputs in the dispatch input buffers are not copied; other inputs must not overlap them.
  bool dp_x_in_send_rows = false, dp_x_scale_in_send_rows = false;
  if (send && p.m > 0) {
    const bool casts = p.cast != Fp8Cast::kNone;
    const uint8_t* rows = state_->symmetric + l.send_rows_offset;
    const uint64_t rows_bytes = uint64_t(config.max_num_tokens) * l.dispatch_token_bytes;
    const Strided2D<uint8_t> x_buffer = dispatch_input_buffer();
    // bf16 rows to cast are never the staged payload: any overlap with the staging rows is refused.
    dp_x_in_send_rows = input_is_staged(
        p.dp_x.data, (p.m - 1) * p.dp_x.row_stride + dispatch_input_row_bytes(config, p.cast),
        !casts && p.dp_x.data == x_buffer.data && (p.m == 1 || p.dp_x.row_stride == x_buffer.row_stride), rows,
        rows_bytes, "dispatch: dp_x", "dispatch_input_buffer", x_buffer.data, x_buffer.row_stride);
    const uint64_t words = casts ? 0 : uint64_t(config.hidden_dim_scale_bytes) / 4;
    if (words != 0) {
      const Strided2D<float> scale_buffer = dispatch_input_scale_buffer();
      const bool is_buffer_in_its_layout = p.dp_x_scale.data == scale_buffer.data &&
                                           (p.m == 1 || p.dp_x_scale.row_stride == scale_buffer.row_stride) &&
                                           (words == 1 || p.dp_x_scale.element_stride == scale_buffer.element_stride);
      dp_x_scale_in_send_rows = input_is_staged(
          p.dp_x_scale.data, p.dp_x_scale.offset(p.m - 1, words - 1) + 4, is_buffer_in_its_layout, rows, rows_bytes,
          "dispatch: dp_x_scale", "dispatch_input_scale_buffer", scale_buffer.data, scale_buffer.row_stride);
    }
  }
  state_->order.check(Operation::kDispatch, p.split);
  const device::DispatchArgs args{state_->context(config_),
                                  p.out_expert_num_tokens,
                                  p.out_expert_x,
                                  p.out_expert_x_scale,
                                  p.dp_x,
                                  p.dp_x_scale,
                                  {p.indices, p.index_type},
                                  p.m,
                                  p.bound_m,
                                  send,
                                  recv,
                                  dp_x_in_send_rows,
                                  dp_x_scale_in_send_rows,
                                  p.cast};
  launch_dispatch(args, stream);
  state_->order.advance(Operation::kDispatch, p.split);
}

void AllToAll::combine(const CombineParams& p, cudaStream_t stream) {
  check_errors();
  const ScopedDevice on_own_device(device_);
  check_combine_layout(config_, p);
  check_combine_pointers(config_, p);
  EW_REQUIRE(p.expert_type != ScalarType::kFloat32 || p.expert_y != expert_output_buffer(),
             "combine: expert_output_buffer() holds 16-bit rows; a float32 expert_y must be the caller's own");
  state_->order.check(Operation::kCombine, p.split);
  const device::CombineArgs args{state_->context(config_),
                                 p.out_tokens,
                                 {p.indices, p.index_type},
                                 p.weights,
                                 static_cast<const uint8_t*>(p.expert_y),
                                 p.m,
                                 p.bound_m,
                                 p.split != SplitMode::kRecv,
                                 p.split != SplitMode::kSend};
  launch_combine(args, p.out_type, p.expert_type, stream);
  state_->order.advance(Operation::kCombine, p.split);
}

}  // namespace expertwire
