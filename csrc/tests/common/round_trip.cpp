#include "tests/common/round_trip.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <sstream>
#include <tuple>

namespace expertwire::harness {
namespace {

// Every output byte a call may not write holds this value before the call.
constexpr uint8_t kSentinel = 0xab;
// Bytes after each output buffer that no call may write.
constexpr size_t kGuardBytes = 4096;
// Unused bytes after each row of scales in CallShape::ScaleLayout::kPaddedRows.
constexpr size_t kScaleRowPadBytes = 12;
// Unused bytes after each row of a caller's dp_x in CallShape::dp_x_padded_rows.
constexpr size_t kDpXRowPadBytes = 16;

size_t element_bytes(ScalarType type) { return type == ScalarType::kFloat32 ? 4 : 2; }

float read_element(const uint8_t* data, size_t index, ScalarType type) {
  if (type == ScalarType::kFloat32) {
    float value;
    std::memcpy(&value, data + index * 4, 4);
    return value;
  }
  uint16_t bits;
  std::memcpy(&bits, data + index * 2, 2);
  return from_bits16(bits, type);
}

// Offset of the first byte of [data, data + bytes) that is not the sentinel, or `bytes` when there is none.
// Compares whole blocks with memcmp: a soak scans megabytes per call.
size_t first_non_sentinel(const uint8_t* data, size_t bytes) {
  static const std::vector<uint8_t> block(4096, kSentinel);
  for (size_t offset = 0; offset < bytes; offset += block.size()) {
    const size_t n = std::min(block.size(), bytes - offset);
    if (std::memcmp(data + offset, block.data(), n) != 0) {
      for (size_t i = offset;; ++i) {
        if (data[i] != kSentinel) return i;
      }
    }
  }
  return bytes;
}

// A scale tensor of `rows` rows per expert, `scale_bytes` of scales a row, laid out as `layout` says (data null).
Strided3D<float> scale_view(CallShape::ScaleLayout layout, uint64_t scale_bytes, uint64_t rows) {
  switch (layout) {
    case CallShape::ScaleLayout::kPaddedRows:
      return contiguous_matrices<float>(nullptr, rows, scale_bytes + kScaleRowPadBytes);
    case CallShape::ScaleLayout::kColumnMajor: return Strided3D<float>{nullptr, rows * scale_bytes, 4, rows * 4};
    case CallShape::ScaleLayout::kContiguous: break;
  }
  return contiguous_matrices<float>(nullptr, rows, scale_bytes);
}

const char* in_buffer_name(CallShape::InBuffer which) {
  switch (which) {
    case CallShape::InBuffer::kAll: return "all";
    case CallShape::InBuffer::kOddRanks: return "odd";
    case CallShape::InBuffer::kNone: break;
  }
  return "none";
}

std::vector<SplitMode> modes_of(const CallShape& shape) {
  return shape.split ? std::vector{SplitMode::kSend, SplitMode::kRecv} : std::vector{SplitMode::kNone};
}

std::vector<uint8_t> download(const DeviceBuffer& buffer) {
  std::vector<uint8_t> host(buffer.bytes());
  EW_CUDA_CHECK(cudaMemcpy(host.data(), buffer.get(), buffer.bytes(), cudaMemcpyDeviceToHost));
  return host;
}

// A call's per-token arrays; null in a call without tokens, as a torch tensor of no rows passes them.
template <class T>
T* per_token(const DeviceBuffer& buffer, uint32_t m) {
  return m == 0 ? nullptr : buffer.get<T>();
}

}  // namespace

std::string Failures::summary() const {
  std::string out;
  for (const auto& message : messages_) out += "    " + message + "\n";
  if (count_ > messages_.size()) out += "    ... " + std::to_string(count_ - messages_.size()) + " more\n";
  return out;
}

CallShape random_call_shape(Rng& rng, const AllToAllConfig& config, int index) {
  CallShape shape;
  for (int64_t g = 0; g < config.num_dp_groups(); ++g) {
    int64_t m = int64_t(rng.below(uint32_t(config.max_num_tokens + 1)));
    if (index == 0) m = config.max_num_tokens;
    if (index == 1 && g == 0) m = 0;
    shape.m_per_group.push_back(m);
  }
  // (out_tokens, expert_y) types: every 16-bit expert_y with every output, and float32 expert_y with the 16-bit
  // outputs it allows.
  static constexpr std::pair<ScalarType, ScalarType> kTypes[] = {
      {ScalarType::kFloat32, ScalarType::kBFloat16}, {ScalarType::kBFloat16, ScalarType::kBFloat16},
      {ScalarType::kFloat16, ScalarType::kBFloat16}, {ScalarType::kFloat32, ScalarType::kFloat16},
      {ScalarType::kBFloat16, ScalarType::kFloat16}, {ScalarType::kFloat16, ScalarType::kFloat16},
      {ScalarType::kBFloat16, ScalarType::kFloat32}, {ScalarType::kFloat16, ScalarType::kFloat32}};
  std::tie(shape.out_type, shape.expert_type) = kTypes[rng.below(8)];
  shape.split = rng.below(2) == 1;
  shape.use_bound_m = rng.below(2) == 1;
  static constexpr CallShape::InBuffer kInBuffer[] = {CallShape::InBuffer::kNone, CallShape::InBuffer::kAll,
                                                      CallShape::InBuffer::kOddRanks};
  shape.expert_y_in_buffer = kInBuffer[rng.below(3)];
  // expert_output_buffer() holds 16-bit rows.
  if (shape.expert_type == ScalarType::kFloat32) shape.expert_y_in_buffer = CallShape::InBuffer::kNone;
  static constexpr CallShape::ScaleLayout kScaleLayouts[] = {
      CallShape::ScaleLayout::kContiguous, CallShape::ScaleLayout::kPaddedRows, CallShape::ScaleLayout::kColumnMajor};
  shape.scale_layout = kScaleLayouts[rng.below(3)];
  shape.dp_x_in_buffer = kInBuffer[rng.below(3)];
  shape.dp_x_padded_rows = rng.below(2) == 1;
  shape.no_expert_slots = rng.below(4) == 0;
  shape.int64_indices = rng.below(2) == 1;
  return shape;
}

std::string describe(const CallShape& shape) {
  std::ostringstream out;
  out << "m=[";
  for (size_t g = 0; g < shape.m_per_group.size(); ++g) out << (g ? " " : "") << shape.m_per_group[g];
  out << "] out=" << scalar_type_name(shape.out_type) << " expert=" << scalar_type_name(shape.expert_type)
      << " split=" << int(shape.split) << " bound_m=" << int(shape.use_bound_m)
      << " in_buffer=" << in_buffer_name(shape.expert_y_in_buffer)
      << " dp_x_in_buffer=" << in_buffer_name(shape.dp_x_in_buffer) << " dp_x_padded=" << int(shape.dp_x_padded_rows)
      << " no_expert_slots=" << int(shape.no_expert_slots) << " int64_indices=" << int(shape.int64_indices)
      << " scales="
      << (shape.scale_layout == CallShape::ScaleLayout::kContiguous   ? "contiguous"
          : shape.scale_layout == CallShape::ScaleLayout::kPaddedRows ? "padded"
                                                                      : "column-major");
  return out.str();
}

std::vector<GroupData> make_all_groups(const AllToAllConfig& config, const CallShape& shape, uint64_t seed) {
  std::vector<GroupData> groups;
  for (int64_t g = 0; g < config.num_dp_groups(); ++g) {
    groups.push_back(make_group_data(config, uint32_t(g), shape.m_per_group[g], seed, shape.no_expert_slots));
  }
  return groups;
}

std::vector<reference::ExpertInbox> reference_inboxes(const AllToAllConfig& config,
                                                      const std::vector<GroupData>& groups) {
  std::vector<reference::GroupInput> inputs;
  for (const GroupData& group : groups) inputs.push_back(group.input());
  return reference::dispatch(config, inputs);
}

void call_dispatch(AllToAll& a2a, DispatchParams params, SplitMode mode, cudaStream_t stream) {
  params.split = mode;
  a2a.dispatch(params, stream);
}

void call_combine(AllToAll& a2a, CombineParams params, SplitMode mode, cudaStream_t stream) {
  params.split = mode;
  a2a.combine(params, stream);
}

RoundTrip::RoundTrip(const AllToAllConfig& config)
    : config_(config),
      dp_x_(config.max_num_tokens * (config.hidden_dim_bytes + kDpXRowPadBytes)),
      dp_x_scale_(std::max<size_t>(config.max_num_tokens * (config.hidden_dim_scale_bytes + kScaleRowPadBytes), 16)),
      indices_(config.max_num_tokens * config.experts_per_token * sizeof(uint32_t)),
      indices_int64_(config.max_num_tokens * config.experts_per_token * sizeof(int64_t)),
      weights_(config.max_num_tokens * config.experts_per_token * sizeof(float)),
      bound_m_(sizeof(uint32_t)),
      num_tokens_(config.num_local_experts() * sizeof(int32_t) + kGuardBytes),
      expert_x_(expert_x_bytes() + kGuardBytes),
      expert_x_scale_(expert_scale_bytes() + kGuardBytes),
      expert_y_(config.num_local_experts() * config.max_recv_tokens() * config.hidden_dim * sizeof(float)),
      out_tokens_(out_tokens_bytes() + kGuardBytes),
      rows_of_(config.num_local_experts()) {
  EW_CUDA_CHECK(cudaStreamCreate(&stream_));
}

RoundTrip::~RoundTrip() { cudaStreamDestroy(stream_); }

size_t RoundTrip::expert_x_bytes() const {
  return config_.num_local_experts() * config_.max_recv_tokens() * config_.hidden_dim_bytes;
}

size_t RoundTrip::expert_scale_bytes() const {
  const size_t row_bytes = config_.hidden_dim_scale_bytes == 0 ? 0 : config_.hidden_dim_scale_bytes + kScaleRowPadBytes;
  return config_.num_local_experts() * config_.max_recv_tokens() * row_bytes;
}

Strided3D<float> RoundTrip::out_expert_x_scale(const CallShape& shape) const {
  Strided3D<float> view =
      scale_view(shape.scale_layout, uint64_t(config_.hidden_dim_scale_bytes), uint64_t(config_.max_recv_tokens()));
  view.data = config_.hidden_dim_scale_bytes != 0 ? expert_x_scale_.get<float>() : nullptr;
  return view;
}

// Room for max_num_tokens rows of the widest output type.
size_t RoundTrip::out_tokens_bytes() const { return config_.max_num_tokens * config_.hidden_dim * sizeof(float); }

void RoundTrip::upload(const GroupData& own, const CallShape& shape) {
  const size_t x_row = config_.hidden_dim_bytes, s = config_.hidden_dim_scale_bytes;
  dp_x_view_ =
      Strided2D<const uint8_t>{dp_x_.get<uint8_t>(), x_row + (shape.dp_x_padded_rows ? kDpXRowPadBytes : 0), 1};
  if (own.m > 0) {
    EW_CUDA_CHECK(cudaMemcpy2D(dp_x_.get(), dp_x_view_.row_stride, own.x.data(), x_row, x_row, size_t(own.m),
                               cudaMemcpyHostToDevice));
  }
  // dp_x_scale has no expert dimension: the view's rows and words.
  const Strided3D<float> scale_layout = scale_view(shape.scale_layout, s, uint64_t(config_.max_num_tokens));
  dp_x_scale_view_ =
      Strided2D<const float>{dp_x_scale_.get<float>(), scale_layout.row_stride, scale_layout.element_stride};
  std::vector<uint8_t> scales(dp_x_scale_.bytes(), kSentinel);
  for (size_t t = 0; s != 0 && t < size_t(own.m); ++t) {
    for (size_t w = 0; w < s / 4; ++w) {
      std::memcpy(&scales[dp_x_scale_view_.offset(t, w)], &own.x_scale[t * s + w * 4], 4);
    }
  }
  EW_CUDA_CHECK(cudaMemcpy(dp_x_scale_.get(), scales.data(), scales.size(), cudaMemcpyHostToDevice));
  EW_CUDA_CHECK(
      cudaMemcpy(indices_.get(), own.indices.data(), own.indices.size() * sizeof(uint32_t), cudaMemcpyHostToDevice));
  std::vector<int64_t> wide(own.indices.size());
  std::transform(own.indices.begin(), own.indices.end(), wide.begin(),
                 [](uint32_t expert) { return expert == kNoExpert ? int64_t(-1) : int64_t(expert); });
  EW_CUDA_CHECK(cudaMemcpy(indices_int64_.get(), wide.data(), wide.size() * sizeof(int64_t), cudaMemcpyHostToDevice));
  EW_CUDA_CHECK(
      cudaMemcpy(weights_.get(), own.weights.data(), own.weights.size() * sizeof(float), cudaMemcpyHostToDevice));
  own_m_ = uint32_t(own.m);
  set_device_bound_m(own_m_);
}

void RoundTrip::set_device_bound_m(uint32_t value) {
  EW_CUDA_CHECK(cudaMemcpy(bound_m_.get(), &value, sizeof(value), cudaMemcpyHostToDevice));
}

void RoundTrip::set_int64_index(uint32_t t, uint32_t k, int64_t value) {
  int64_t* entry = indices_int64_.get<int64_t>() + uint64_t(t) * config_.experts_per_token + k;
  EW_CUDA_CHECK(cudaMemcpy(entry, &value, sizeof(value), cudaMemcpyHostToDevice));
}

uint32_t RoundTrip::call_m(const CallShape& shape) const {
  return shape.use_bound_m ? uint32_t(config_.max_num_tokens) : own_m_;
}

DispatchParams RoundTrip::dispatch_arguments(const CallShape& shape) const {
  const bool scales = config_.hidden_dim_scale_bytes != 0;
  const uint32_t m = call_m(shape);
  DispatchParams p;
  p.out_expert_num_tokens = num_tokens_.get<int32_t>();
  p.out_expert_x = expert_x_.get<uint8_t>();
  p.out_expert_x_scale = out_expert_x_scale(shape);
  p.dp_x = dp_x_view_;
  p.dp_x.data = per_token<const uint8_t>(dp_x_, m);
  p.dp_x_scale = dp_x_scale_view_;
  p.dp_x_scale.data = scales ? per_token<const float>(dp_x_scale_, m) : nullptr;
  p.indices = per_token<const void>(shape.int64_indices ? indices_int64_ : indices_, m);
  p.index_type = shape.int64_indices ? IndexType::kInt64 : IndexType::kUInt32;
  p.m = m;
  p.bound_m = shape.use_bound_m ? bound_m_.get<uint32_t>() : nullptr;
  return p;
}

CombineParams RoundTrip::combine_arguments(const CallShape& shape) const {
  const uint32_t m = call_m(shape);
  CombineParams p;
  p.out_tokens = per_token<void>(out_tokens_, m);
  p.out_type = shape.out_type;
  p.indices = per_token<const void>(shape.int64_indices ? indices_int64_ : indices_, m);
  p.index_type = shape.int64_indices ? IndexType::kInt64 : IndexType::kUInt32;
  p.weights = per_token<const float>(weights_, m);
  p.expert_y = expert_y_.get();
  p.expert_type = shape.expert_type;
  p.m = m;
  p.bound_m = shape.use_bound_m ? bound_m_.get<uint32_t>() : nullptr;
  return p;
}

void RoundTrip::copy_inputs_into_buffers(AllToAll& a2a, const CallShape& shape, DispatchParams& params) const {
  const uint64_t x_row = config_.hidden_dim_bytes;
  if (own_m_ == 0) return;
  const Strided2D<uint8_t> rows = a2a.dispatch_input_buffer();
  EW_CUDA_CHECK(cudaMemcpy2DAsync(rows.data, rows.row_stride, dp_x_.get(), dp_x_view_.row_stride, x_row, own_m_,
                                  cudaMemcpyDeviceToDevice, stream_));
  params.dp_x = read_only(rows);
  const uint64_t s = config_.hidden_dim_scale_bytes;
  if (s == 0 || shape.scale_layout == CallShape::ScaleLayout::kColumnMajor) return;
  const Strided2D<float> scales = a2a.dispatch_input_scale_buffer();
  EW_CUDA_CHECK(cudaMemcpy2DAsync(scales.data, scales.row_stride, dp_x_scale_.get(), dp_x_scale_view_.row_stride, s,
                                  own_m_, cudaMemcpyDeviceToDevice, stream_));
  params.dp_x_scale = read_only(scales);
}

void RoundTrip::fill_dispatch_outputs() {
  for (DeviceBuffer* buffer : {&num_tokens_, &expert_x_, &expert_x_scale_}) {
    EW_CUDA_CHECK(cudaMemsetAsync(buffer->get(), kSentinel, buffer->bytes(), stream_));
  }
}

void RoundTrip::dispatch(AllToAll& a2a, const CallShape& shape) {
  fill_dispatch_outputs();
  DispatchParams args = dispatch_arguments(shape);
  if (shape.dp_x_in_buffer_on(config_.rank)) copy_inputs_into_buffers(a2a, shape, args);
  for (const SplitMode mode : modes_of(shape)) call_dispatch(a2a, args, mode, stream_);
  EW_CUDA_CHECK(cudaStreamSynchronize(stream_));
  a2a.check_errors();
}

void RoundTrip::check_dispatch(const CallShape& shape, const std::vector<reference::ExpertInbox>& expected,
                               Failures& fail) {
  const int64_t num_local = config_.num_local_experts(), max_recv = config_.max_recv_tokens(), rank = config_.rank;
  const size_t x_row = config_.hidden_dim_bytes, s_row = config_.hidden_dim_scale_bytes;
  const std::vector<uint8_t> counts = download(num_tokens_), got_x = download(expert_x_);
  // Scales are compared word by word where the layout puts them, then overwritten with the sentinel: what is
  // left must be sentinel everywhere (unused rows, padding, the guard).
  std::vector<uint8_t> got_s = download(expert_x_scale_);
  const Strided3D<float> scale_layout = out_expert_x_scale(shape);
  std::vector<uint8_t> row_scales(s_row);

  for (int64_t le = 0; le < num_local; ++le) {
    rows_of_[le].clear();
    int32_t count;
    std::memcpy(&count, &counts[le * sizeof(int32_t)], sizeof(count));
    const auto& inbox = expected[le].tokens;
    if (count < 0 || count > max_recv) {
      fail.add("rank ", rank, " expert ", le, ": count ", count, " outside [0, max_recv_tokens=", max_recv, "]");
      count = 0;
    } else if (size_t(count) != inbox.size()) {
      fail.add("rank ", rank, " expert ", le, ": ", count, " tokens, expected ", inbox.size());
    }
    // The reference lists each inbox sorted by (group, token): find each received row there.
    std::vector<bool> seen(inbox.size(), false);
    for (int32_t i = 0; i < count; ++i) {
      const uint8_t* row = &got_x[(le * max_recv + i) * x_row];
      uint32_t g, t;
      read_marker(row, &g, &t);
      rows_of_[le].push_back({g, t});
      for (size_t w = 0; w < s_row / 4; ++w) {
        uint8_t* word = &got_s[scale_layout.offset(le, i, w)];
        std::memcpy(&row_scales[w * 4], word, 4);
        std::memset(word, kSentinel, 4);
      }
      const auto it =
          std::lower_bound(inbox.begin(), inbox.end(), std::pair{g, t},
                           [](const reference::ReceivedToken& tok, const std::pair<uint32_t, uint32_t>& key) {
                             return std::pair{tok.source_group, tok.token} < key;
                           });
      const size_t index = size_t(it - inbox.begin());
      if (it == inbox.end() || it->source_group != g || it->token != t || seen[index]) {
        fail.add("rank ", rank, " expert ", le, " row ", i, ": unexpected or repeated token (group ", g, ", token ", t,
                 ")");
        continue;
      }
      seen[index] = true;
      if (std::memcmp(row, it->x, x_row) != 0) {
        fail.add("rank ", rank, " expert ", le, " row ", i, ": payload of (group ", g, ", token ", t, ") differs");
      }
      if (s_row && std::memcmp(row_scales.data(), it->x_scale, s_row) != 0) {
        fail.add("rank ", rank, " expert ", le, " row ", i, ": scales of (group ", g, ", token ", t, ") differ");
      }
    }
    // Rows past the count belong to no token: nothing may have been written there.
    const size_t unused_rows = size_t(max_recv - count);
    const size_t x_bad = first_non_sentinel(&got_x[(le * max_recv + count) * x_row], unused_rows * x_row);
    if (x_bad != unused_rows * x_row) {
      fail.add("rank ", rank, " expert ", le, ": out_expert_x written past its ", count, " rows (row ",
               count + int64_t(x_bad / x_row), ")");
    }
  }
  const size_t s_bad = first_non_sentinel(got_s.data(), got_s.size());
  if (s_bad != got_s.size()) {
    fail.add("rank ", rank, ": out_expert_x_scale written outside the scales of the received rows (byte ", s_bad,
             " of ", got_s.size(), ", the last ", kGuardBytes, " a guard)");
  }
  const struct {
    const char* name;
    const std::vector<uint8_t>& bytes;
    size_t used;
  } guarded[] = {{"out_expert_num_tokens", counts, num_local * sizeof(int32_t)},
                 {"out_expert_x", got_x, expert_x_bytes()}};
  for (const auto& buffer : guarded) {
    if (first_non_sentinel(&buffer.bytes[buffer.used], kGuardBytes) != kGuardBytes) {
      fail.add("rank ", rank, ": ", buffer.name, " written past its end (guard region changed)");
    }
  }
}

void RoundTrip::combine(AllToAll& a2a, const CallShape& shape) {
  const int64_t hidden = config_.hidden_dim, max_recv = config_.max_recv_tokens();
  auto* expert_y =
      static_cast<uint8_t*>(shape.expert_y_in_buffer_on(config_.rank) ? a2a.expert_output_buffer() : expert_y_.get());
  const size_t element = element_bytes(shape.expert_type);
  std::vector<float> values(hidden);
  std::vector<uint8_t> block;
  for (int64_t le = 0; le < config_.num_local_experts(); ++le) {
    const uint32_t expert = uint32_t(config_.rank * config_.num_local_experts() + le);
    const auto& rows = rows_of_[le];
    block.resize(rows.size() * hidden * element);
    for (size_t i = 0; i < rows.size(); ++i) {
      expert_output_row(expert, rows[i].first, rows[i].second, shape.expert_type, hidden, values.data());
      for (int64_t h = 0; h < hidden; ++h) {
        uint8_t* at = &block[(i * hidden + h) * element];
        if (shape.expert_type == ScalarType::kFloat32) {
          std::memcpy(at, &values[h], sizeof(float));
        } else {
          const uint16_t bits = to_bits16(values[h], shape.expert_type);
          std::memcpy(at, &bits, sizeof(bits));
        }
      }
    }
    EW_CUDA_CHECK(
        cudaMemcpy(expert_y + le * max_recv * hidden * element, block.data(), block.size(), cudaMemcpyHostToDevice));
  }
  EW_CUDA_CHECK(cudaMemsetAsync(out_tokens_.get(), kSentinel, out_tokens_.bytes(), stream_));
  CombineParams args = combine_arguments(shape);
  args.expert_y = expert_y;
  for (const SplitMode mode : modes_of(shape)) call_combine(a2a, args, mode, stream_);
  EW_CUDA_CHECK(cudaStreamSynchronize(stream_));
  a2a.check_errors();
}

void RoundTrip::check_combine(const GroupData& own, const CallShape& shape, Failures& fail) {
  const int64_t hidden = config_.hidden_dim, m = own.m;
  std::map<std::tuple<uint32_t, uint32_t, uint32_t>, std::vector<float>> expert_rows;
  auto expert_output = [&](uint32_t expert, uint32_t g, uint32_t t) -> const float* {
    auto& row = expert_rows[{expert, g, t}];
    if (row.empty()) {
      row.resize(hidden);
      // A float32 expert_y's rows are summed as out_tokens' 16-bit type, to which they travel rounded.
      const ScalarType row_type = shape.expert_type == ScalarType::kFloat32 ? shape.out_type : shape.expert_type;
      expert_output_row(expert, g, t, row_type, hidden, row.data());
    }
    return row.data();
  };
  std::vector<float> want(std::max<int64_t>(m, 1) * hidden);
  reference::combine(config_, uint32_t(config_.dp_group()), own.input(), expert_output, want.data());

  const std::vector<uint8_t> got = download(out_tokens_);
  // fp32: FMA against separate multiply-add; 16-bit outputs: one unit in the last place after rounding.
  const float rtol = shape.out_type == ScalarType::kFloat32    ? 1e-5f
                     : shape.out_type == ScalarType::kBFloat16 ? 8e-3f
                                                               : 1e-3f;
  for (int64_t t = 0; t < m; ++t) {
    for (int64_t h = 0; h < hidden; ++h) {
      const float g = read_element(got.data(), t * hidden + h, shape.out_type), w = want[t * hidden + h];
      if (!(std::fabs(g - w) <= 1e-5f + rtol * std::fabs(w))) {
        fail.add("rank ", config_.rank, " combine token ", t, " h ", h, ": got ", g, ", expected ", w);
      }
    }
  }
  const size_t written = size_t(m) * hidden * element_bytes(shape.out_type);
  if (first_non_sentinel(&got[written], got.size() - written) != got.size() - written) {
    fail.add("rank ", config_.rank, " combine wrote past token ", m);
  }
}

void RoundTrip::check_combine_wrote_nothing(Failures& fail) {
  const std::vector<uint8_t> got = download(out_tokens_);
  const size_t bad = first_non_sentinel(got.data(), got.size());
  if (bad != got.size()) fail.add("rank ", config_.rank, " combine wrote byte ", bad, " of out_tokens");
}

void run_checked_round_trip(AllToAll& a2a, RoundTrip& trip, const AllToAllConfig& config, const CallShape& shape,
                            uint64_t seed, Failures& failures) {
  const std::vector<GroupData> groups = make_all_groups(config, shape, seed);
  const GroupData& own = groups[config.dp_group()];
  trip.upload(own, shape);
  trip.dispatch(a2a, shape);
  trip.check_dispatch(shape, reference_inboxes(config, groups), failures);
  trip.combine(a2a, shape);
  trip.check_combine(own, shape, failures);
}

}  // namespace expertwire::harness
