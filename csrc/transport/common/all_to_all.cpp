#include "transport/common/all_to_all.h"

#include <atomic>
#include <string>
#include <utility>

#include "core/error.h"

namespace expertwire {
namespace {

// Kernels read 16-byte vectors of rows and whole words of everything else.
void require_pointer(const void* pointer, const char* name, uintptr_t alignment) {
  EW_REQUIRE(pointer != nullptr, name, " must not be null");
  EW_REQUIRE(reinterpret_cast<uintptr_t>(pointer) % alignment == 0, name, " must be ", alignment,
             "-byte aligned, got address ", pointer);
}

// Scales are read and written as 4-byte words.
void require_word_strides(const ScaleStrides& strides, const char* name) {
  for (const auto& [what, stride] : {std::pair{"expert", strides.expert}, std::pair{"row", strides.row},
                                     std::pair{"word", strides.word}}) {
    EW_REQUIRE(stride % 4 == 0, name, ": ", what, " stride must be a multiple of 4 bytes, got ", stride);
  }
}

// Whether a dispatch input, `extent` bytes from `input`, is already staged: it lies in the staging rows
// [rows, rows + rows_bytes) as the dispatch would stage it (`is_buffer_in_its_layout`: at `buffer`, rows
// `row_stride` apart), so the dispatch copies nothing of it. Any other overlap with the staging rows is refused:
// staging the input would overwrite bytes that it has yet to read.
bool input_is_staged(const void* input, uint64_t extent, bool is_buffer_in_its_layout, const uint8_t* rows,
                     uint64_t rows_bytes, const char* name, const char* buffer_name, const void* buffer,
                     uint64_t row_stride) {
  const auto begin = reinterpret_cast<uintptr_t>(input), rows_begin = reinterpret_cast<uintptr_t>(rows);
  if (begin >= rows_begin + rows_bytes || rows_begin >= begin + extent) return false;
  EW_REQUIRE(is_buffer_in_its_layout, name, " overlaps the rows the dispatch stages tokens in without being ", buffer_name,
             "() in its layout (that address, rows ", row_stride, " bytes apart): it starts ",
             int64_t(begin - reinterpret_cast<uintptr_t>(buffer)), " bytes from it, ", extent,
             " bytes long; pass the buffer itself, or a view of its first m rows");
  return true;
}

}  // namespace

device::LaunchShape default_launch_shape(uint32_t max_sm_count) {
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
  return device::LaunchShape{blocks, threads};
}

AllToAll::AllToAll(const AllToAllConfig& config, uint64_t staging_rows_per_warp, uint64_t timeout_ns,
                   uint32_t max_sm_count)
    : device_(current_device()),
      config_(config),
      shape_(default_launch_shape(max_sm_count)),
      layout_(make_buffer_layout(config, staging_rows_per_warp * shape_.warps())),
      timeout_ns_(timeout_ns != 0 ? timeout_ns : default_timeout_ns()),
      workspace_(layout_.workspace_bytes) {}

device::RankContext AllToAll::context() const {
  return device::RankContext{layout_,
                             uint32_t(config_.rank),
                             uint32_t(config_.dp_rank()),
                             uint32_t(config_.dp_group()),
                             symmetric_,
                             workspace_.get<uint8_t>(),
                             error_.device(),
                             timeout_ns_};
}

void AllToAll::check_errors() const {
  // Kernels write the record while the host may read it: read each field through volatile, the code first
  // (published after the fields it goes with, see record_error).
  const volatile ErrorRecord* mapped = error_.host();
  ErrorRecord record{};
  record.code = mapped->code;
  std::atomic_thread_fence(std::memory_order_acquire);  // the fields after the code, also on weakly ordered hosts
  record.phase = mapped->phase;
  record.peer = mapped->peer;
  record.value = mapped->value;
  if (record.code != ErrorCode::kNone) EW_THROW(DeviceError, "expertwire: ", describe(record, config_.rank));
}

void AllToAll::dispatch(int32_t* out_expert_num_tokens, void* out_expert_x, void* out_expert_x_scale,
                        const void* dp_x, const void* dp_x_scale, const uint32_t* indices, uint32_t m,
                        const uint32_t* bound_m, SplitMode split_mode, cudaStream_t stream) {
  // Contiguous, but for the dispatch input buffers, which have their own row stride.
  const uint64_t scale_bytes = uint64_t(config_.hidden_dim_scale_bytes);
  const bool x_in_buffer = dp_x == dispatch_input_buffer();
  const bool scale_in_buffer = scale_bytes != 0 && dp_x_scale == dispatch_input_scale_buffer();
  dispatch(out_expert_num_tokens, out_expert_x, out_expert_x_scale, dp_x, dp_x_scale, indices, m, bound_m, split_mode,
           stream, ScaleStrides::contiguous(scale_bytes, uint64_t(config_.max_recv_tokens())),
           scale_in_buffer ? dispatch_input_scale_strides() : ScaleStrides::contiguous(scale_bytes, 0),
           x_in_buffer ? dispatch_input_row_stride() : uint64_t(config_.hidden_dim_bytes));
}

void AllToAll::dispatch(int32_t* out_expert_num_tokens, void* out_expert_x, void* out_expert_x_scale,
                        const void* dp_x, const void* dp_x_scale, const uint32_t* indices, uint32_t m,
                        const uint32_t* bound_m, SplitMode split_mode, cudaStream_t stream,
                        const ScaleStrides& out_expert_x_scale_strides, const ScaleStrides& dp_x_scale_strides,
                        uint64_t dp_x_row_stride) {
  check_errors();
  const ScopedDevice on_own_device(device_);
  EW_REQUIRE(m <= config_.max_num_tokens, "dispatch: m must be <= max_num_tokens=", config_.max_num_tokens, ", got ",
             m);
  const bool send = split_mode != SplitMode::kRecv, recv = split_mode != SplitMode::kSend;
  const bool scales = config_.hidden_dim_scale_bytes != 0;
  // Without tokens the per-token arrays may be empty, and null (a torch tensor of no rows has no storage): the
  // kernels read them only below m.
  bool dp_x_in_send_rows = false, dp_x_scale_in_send_rows = false;
  if (send && m > 0) {
    require_pointer(dp_x, "dispatch: dp_x", 16);
    require_pointer(indices, "dispatch: indices", 4);
    const uint64_t token_bytes = layout_.dispatch_token_bytes;
    const uint8_t* rows = symmetric_ + layout_.send_rows_offset;
    const uint64_t rows_bytes = uint64_t(config_.max_num_tokens) * token_bytes;
    if (m > 1) {
      EW_REQUIRE(dp_x_row_stride >= uint64_t(config_.hidden_dim_bytes) && dp_x_row_stride % 16 == 0,
                 "dispatch: dp_x's rows must lie a multiple of 16 bytes apart, at least hidden_dim_bytes=",
                 config_.hidden_dim_bytes, ", got a row stride of ", dp_x_row_stride, " bytes");
    }
    dp_x_in_send_rows = input_is_staged(
        dp_x, (m - 1) * dp_x_row_stride + uint64_t(config_.hidden_dim_bytes),
        dp_x == dispatch_input_buffer() && (m == 1 || dp_x_row_stride == token_bytes), rows, rows_bytes,
        "dispatch: dp_x", "dispatch_input_buffer", dispatch_input_buffer(), token_bytes);
    if (scales) {
      require_pointer(dp_x_scale, "dispatch: dp_x_scale", 4);
      require_word_strides(dp_x_scale_strides, "dispatch: dp_x_scale");
      const uint64_t words = uint64_t(config_.hidden_dim_scale_bytes) / 4;
      const ScaleStrides buffer = dispatch_input_scale_strides();
      const bool is_buffer_in_its_layout = dp_x_scale == dispatch_input_scale_buffer() &&
                                           (m == 1 || dp_x_scale_strides.row == buffer.row) &&
                                           (words == 1 || dp_x_scale_strides.word == buffer.word);
      dp_x_scale_in_send_rows = input_is_staged(dp_x_scale, dp_x_scale_strides.offset(0, m - 1, words - 1) + 4,
                                                is_buffer_in_its_layout, rows, rows_bytes, "dispatch: dp_x_scale",
                                                "dispatch_input_scale_buffer", dispatch_input_scale_buffer(),
                                                token_bytes);
    }
  }
  if (recv) {
    require_pointer(out_expert_num_tokens, "dispatch: out_expert_num_tokens", 4);
    require_pointer(out_expert_x, "dispatch: out_expert_x", 16);
    if (scales) {
      require_pointer(out_expert_x_scale, "dispatch: out_expert_x_scale", 4);
      require_word_strides(out_expert_x_scale_strides, "dispatch: out_expert_x_scale");
    }
  }
  if (bound_m != nullptr) require_pointer(bound_m, "dispatch: bound_m", 4);
  order_.check(Operation::kDispatch, split_mode);
  device::DispatchArgs args{context(),
                            out_expert_num_tokens,
                            static_cast<uint8_t*>(out_expert_x),
                            static_cast<uint8_t*>(out_expert_x_scale),
                            static_cast<const uint8_t*>(dp_x),
                            static_cast<const uint8_t*>(dp_x_scale),
                            out_expert_x_scale_strides,
                            dp_x_scale_strides,
                            indices,
                            m,
                            bound_m,
                            send,
                            recv,
                            dp_x_row_stride,
                            dp_x_in_send_rows,
                            dp_x_scale_in_send_rows};
  launch_dispatch(args, stream);
  order_.advance(Operation::kDispatch, split_mode);
}

void AllToAll::combine(void* out_tokens, ScalarType out_type, const uint32_t* indices, const float* weights,
                       const void* expert_y, ScalarType expert_type, uint32_t m, const uint32_t* bound_m,
                       SplitMode split_mode, cudaStream_t stream) {
  check_errors();
  const ScopedDevice on_own_device(device_);
  EW_REQUIRE(m <= config_.max_num_tokens, "combine: m must be <= max_num_tokens=", config_.max_num_tokens, ", got ",
             m);
  // Rows travel at 16 bits: a float32 expert_y's as out_tokens' type, which must then be one of those (as in
  // pplx_kernels, which takes a float32 expert_y with bfloat16 or float16 out_tokens only).
  if (expert_type == ScalarType::kFloat32) {
    EW_REQUIRE(out_type != ScalarType::kFloat32,
               "combine: a float32 expert_y needs bfloat16 or float16 out_tokens (its rows travel as that type), "
               "got float32 out_tokens");
    EW_REQUIRE(expert_y != expert_output_buffer(),
               "combine: expert_output_buffer() holds 16-bit rows; a float32 expert_y must be the caller's own");
  }
  const bool send = split_mode != SplitMode::kRecv, recv = split_mode != SplitMode::kSend;
  if (send) require_pointer(expert_y, "combine: expert_y", 16);
  if (recv && m > 0) {  // as in dispatch: without tokens the per-token arrays may be null
    require_pointer(out_tokens, "combine: out_tokens", 16);
    require_pointer(indices, "combine: indices", 4);
    require_pointer(weights, "combine: weights", 4);
  }
  if (bound_m != nullptr) require_pointer(bound_m, "combine: bound_m", 4);
  order_.check(Operation::kCombine, split_mode);
  device::CombineArgs args{context(), out_tokens, indices, weights, static_cast<const uint8_t*>(expert_y),
                           m,         bound_m,    send,    recv};
  launch_combine(args, out_type, expert_type, stream);
  order_.advance(Operation::kCombine, split_mode);
}

}  // namespace expertwire
