#include "core/arguments.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#include "core/error.h"

namespace expertwire {
namespace {

bool sends(SplitMode split) { return split != SplitMode::kRecv; }
bool receives(SplitMode split) { return split != SplitMode::kSend; }

// Kernels read 16-byte vectors of rows and whole words of everything else.
void require_pointer(const void* pointer, const char* name, uintptr_t alignment) {
  EW_REQUIRE(pointer != nullptr, name, " must not be null");
  EW_REQUIRE(reinterpret_cast<uintptr_t>(pointer) % alignment == 0, name, " must be ", alignment,
             "-byte aligned, got address ", pointer);
}

void require_index_type(const char* op, IndexType type) {
  EW_REQUIRE(uint8_t(type) <= uint8_t(IndexType::kInt64), op, ": index_type must be one of IndexType's values, got ",
             int(type));
}

// Entries are read whole: 4-byte words, or 8-byte int64s. `name`: "<op>: indices".
void require_indices(const void* indices, IndexType type, const char* name) {
  require_pointer(indices, name, type == IndexType::kInt64 ? 8 : 4);
}

void require_m(const char* op, const AllToAllConfig& config, uint32_t m) {
  EW_REQUIRE(m <= config.max_num_tokens, op, ": m must be <= max_num_tokens=", config.max_num_tokens, ", got ", m);
}

// Scales are read and written as 4-byte words.
void require_word_strides(const char* name, std::initializer_list<std::pair<const char*, uint64_t>> strides) {
  for (const auto& [what, stride] : strides) {
    EW_REQUIRE(stride % 4 == 0, name, ": ", what, " stride must be a multiple of 4 bytes, got ", stride);
  }
}

// No two words of an output at one address: with the dimensions of more than one index in stride order, each
// stride must reach past every word of the dimensions before it.
void require_no_self_overlap(const char* name, const Strided3D<float>& view, const std::array<uint64_t, 3>& sizes) {
  std::array<std::pair<uint64_t, uint64_t>, 3> dims{
      {{view.matrix_stride, sizes[0]}, {view.row_stride, sizes[1]}, {view.element_stride, sizes[2]}}};
  std::sort(dims.begin(), dims.end());
  uint64_t reach = 4;  // the bytes one word covers
  for (const auto& [stride, size] : dims) {
    if (size <= 1) continue;
    EW_REQUIRE(stride >= reach, name, " must not overlap itself (two words at one address), got byte strides (",
               view.matrix_stride, ", ", view.row_stride, ", ", view.element_stride, ") over shape [", sizes[0], ", ",
               sizes[1], ", ", sizes[2], "]");
    reach += stride * (size - 1);
  }
}

// The configuration a cast needs (params.h): fp8 payload bytes of hidden_dim, its scales' bytes.
void require_cast_config(const AllToAllConfig& config, Fp8Cast cast) {
  const bool ue8m0 = cast == Fp8Cast::kUe8m0Scales;
  const int64_t block = ue8m0 ? 512 : 128;
  EW_REQUIRE(config.hidden_dim % block == 0, "dispatch: an fp8 cast", ue8m0 ? " with UE8M0 scales" : "",
             " needs hidden_dim a multiple of ", block, ", got ", config.hidden_dim);
  EW_REQUIRE(config.hidden_dim_bytes == config.hidden_dim,
             "dispatch: an fp8 cast needs hidden_dim_bytes = hidden_dim=", config.hidden_dim,
             " (one e4m3 byte a value), got ", config.hidden_dim_bytes);
  const int64_t scale_bytes = config.hidden_dim / block * 4;
  EW_REQUIRE(config.hidden_dim_scale_bytes == scale_bytes, "dispatch: an fp8 cast", ue8m0 ? " with UE8M0 scales" : "",
             " needs hidden_dim_scale_bytes=", scale_bytes, ", got ", config.hidden_dim_scale_bytes);
}

}  // namespace

uint64_t dispatch_input_row_bytes(const AllToAllConfig& config, Fp8Cast cast) {
  return cast != Fp8Cast::kNone ? 2 * uint64_t(config.hidden_dim) : uint64_t(config.hidden_dim_bytes);
}

void check_dispatch_layout(const AllToAllConfig& config, const DispatchParams& p) {
  require_m("dispatch", config, p.m);
  require_index_type("dispatch", p.index_type);
  EW_REQUIRE(uint8_t(p.cast) <= uint8_t(Fp8Cast::kUe8m0Scales), "dispatch: cast must be one of Fp8Cast's values, got ",
             int(p.cast));
  const bool casts = p.cast != Fp8Cast::kNone;
  if (casts) require_cast_config(config, p.cast);
  // With a cast, dp_x's rows are the bf16 values and dp_x_scale is unused.
  const uint64_t x_row_bytes = dispatch_input_row_bytes(config, p.cast);
  const uint64_t input_words = casts ? 0 : uint64_t(config.hidden_dim_scale_bytes) / 4;
  const uint64_t words = uint64_t(config.hidden_dim_scale_bytes) / 4;
  if (sends(p.split) && p.m > 0) {
    EW_REQUIRE(p.dp_x.element_stride == 1,
               "dispatch: dp_x's bytes must be contiguous within a row (element stride 1 byte), got an element "
               "stride of ",
               p.dp_x.element_stride, " bytes");
    if (p.m > 1) {
      EW_REQUIRE(p.dp_x.row_stride >= x_row_bytes && p.dp_x.row_stride % 16 == 0,
                 "dispatch: dp_x's rows must lie a multiple of 16 bytes apart, at least ",
                 casts ? "2 * hidden_dim=" : "hidden_dim_bytes=", x_row_bytes, ", got a row stride of ",
                 p.dp_x.row_stride, " bytes");
    }
    if (input_words != 0) {
      require_word_strides("dispatch: dp_x_scale", {{"row", p.m > 1 ? p.dp_x_scale.row_stride : 0},
                                                    {"word", input_words > 1 ? p.dp_x_scale.element_stride : 0}});
    }
  }
  if (receives(p.split) && words != 0) {
    const Strided3D<float>& s = p.out_expert_x_scale;
    require_word_strides("dispatch: out_expert_x_scale",
                         {{"expert", s.matrix_stride}, {"row", s.row_stride}, {"word", s.element_stride}});
    require_no_self_overlap("dispatch: out_expert_x_scale", s,
                            {uint64_t(config.num_local_experts()), uint64_t(config.max_recv_tokens()), words});
  }
}

void check_dispatch_pointers(const AllToAllConfig& config, const DispatchParams& p) {
  const bool scales = config.hidden_dim_scale_bytes != 0;
  // Without tokens the per-token arrays may be empty, and null (a torch tensor of no rows has no storage): the
  // kernels read them only below m.
  if (sends(p.split) && p.m > 0) {
    require_pointer(p.dp_x.data, "dispatch: dp_x", 16);
    require_indices(p.indices, p.index_type, "dispatch: indices");
    if (p.cast != Fp8Cast::kNone) {
      EW_REQUIRE(p.dp_x_scale.data == nullptr,
                 "dispatch: dp_x_scale must be null with an fp8 cast (the cast makes the scales)");
    } else if (scales) {
      require_pointer(p.dp_x_scale.data, "dispatch: dp_x_scale", 4);
    }
  }
  if (receives(p.split)) {
    require_pointer(p.out_expert_num_tokens, "dispatch: out_expert_num_tokens", 4);
    require_pointer(p.out_expert_x, "dispatch: out_expert_x", 16);
    if (scales) require_pointer(p.out_expert_x_scale.data, "dispatch: out_expert_x_scale", 4);
  }
  if (p.bound_m != nullptr) require_pointer(p.bound_m, "dispatch: bound_m", 4);
}

void check_combine_layout(const AllToAllConfig& config, const CombineParams& p) {
  require_m("combine", config, p.m);
  require_index_type("combine", p.index_type);
  // Rows travel at 16 bits: a float32 expert_y's as out_tokens' type, which must then be one of those (as in
  // pplx_kernels, which takes a float32 expert_y with bfloat16 or float16 out_tokens only).
  if (p.expert_type == ScalarType::kFloat32) {
    EW_REQUIRE(p.out_type != ScalarType::kFloat32,
               "combine: a float32 expert_y needs bfloat16 or float16 out_tokens (its rows travel as that type), "
               "got float32 out_tokens");
  }
}

void check_combine_pointers(const AllToAllConfig&, const CombineParams& p) {
  if (sends(p.split)) require_pointer(p.expert_y, "combine: expert_y", 16);
  if (receives(p.split) && p.m > 0) {  // as in dispatch: without tokens the per-token arrays may be null
    require_pointer(p.out_tokens, "combine: out_tokens", 16);
    require_indices(p.indices, p.index_type, "combine: indices");
    require_pointer(p.weights, "combine: weights", 4);
  }
  if (p.bound_m != nullptr) require_pointer(p.bound_m, "combine: bound_m", 4);
}

}  // namespace expertwire
