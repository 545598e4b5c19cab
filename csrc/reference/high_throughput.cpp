#include "reference/high_throughput.h"

#include <algorithm>

#include "core/error.h"
#include "reference/reference.h"

namespace expertwire::reference {
namespace {

constexpr int64_t kNoExpert = -1;

// Checks every rank's routing the way the GPU path must reject it, before anything is produced.
void validate_sources(const HighThroughputShape& shape, const char* caller, int64_t rank,
                      const std::vector<RankTokens>& sources) {
  shape.validate();
  EW_REQUIRE(rank >= 0 && rank < shape.world_size, "reference::", caller,
             ": rank must be in [0, world_size=", shape.world_size, "), got ", rank);
  EW_REQUIRE(int64_t(sources.size()) == shape.world_size, "reference::", caller, ": got ", sources.size(),
             " ranks' tokens, expected world_size=", shape.world_size);
  const int64_t k = shape.experts_per_token;
  for (size_t s = 0; s < sources.size(); ++s) {
    const RankTokens& source = sources[s];
    EW_REQUIRE(source.m >= 0 && source.m <= shape.max_tokens_per_rank, "reference::", caller, ": rank ", s,
               ": m=", source.m, " is outside [0, max_tokens_per_rank=", shape.max_tokens_per_rank, "]");
    if (source.m == 0) continue;
    EW_REQUIRE(source.topk_idx != nullptr && source.topk_weights != nullptr, "reference::", caller, ": rank ", s,
               ": topk_idx and topk_weights are required with m=", source.m);
    for (int64_t t = 0; t < source.m; ++t) {
      const int64_t* slots = source.topk_idx + t * k;
      for (int64_t j = 0; j < k; ++j) {
        EW_REQUIRE(slots[j] >= kNoExpert && slots[j] < shape.num_experts, "reference::", caller, ": rank ", s,
                   ", token ", t, ", slot ", j, ": expert index ", slots[j],
                   " is outside [-1, num_experts=", shape.num_experts, ")");
        for (int64_t i = 0; i < j && slots[j] != kNoExpert; ++i) {
          EW_REQUIRE(slots[i] != slots[j], "reference::", caller, ": rank ", s, ", token ", t, ", slot ", j,
                     ": expert index ", slots[j], " repeats the expert of slot ", i);
        }
      }
    }
  }
}

// The local index on `rank` of expert `expert`, or -1 where it lives elsewhere (or is no expert).
int64_t local_index(const HighThroughputShape& shape, int64_t rank, int64_t expert) {
  const int64_t local = shape.num_local_experts();
  return expert != kNoExpert && expert / local == rank ? expert % local : kNoExpert;
}

ReceivedRow row_of(const HighThroughputShape& shape, const RankTokens& source, uint32_t source_rank, uint32_t token) {
  ReceivedRow row;
  row.source_rank = source_rank;
  row.token = token;
  row.x = source.x == nullptr ? nullptr : source.x + token * shape.hidden_dim_bytes;
  row.x_scale = source.x_scale == nullptr ? nullptr : source.x_scale + token * shape.hidden_dim_scale_bytes;
  return row;
}

// Calls visit(source rank, token, slot, local expert, weight) for every slot of every token that names an
// expert of `rank`, in (source rank, token, slot) order.
template <class Visit>
void for_each_local_slot(const HighThroughputShape& shape, int64_t rank, const std::vector<RankTokens>& sources,
                         Visit visit) {
  const int64_t k = shape.experts_per_token;
  for (size_t s = 0; s < sources.size(); ++s) {
    for (int64_t t = 0; t < sources[s].m; ++t) {
      for (int64_t j = 0; j < k; ++j) {
        const int64_t le = local_index(shape, rank, sources[s].topk_idx[t * k + j]);
        if (le != kNoExpert) visit(uint32_t(s), uint32_t(t), j, le, sources[s].topk_weights[t * k + j]);
      }
    }
  }
}

float rounded_to(float value, ScalarType type) {
  switch (type) {
    case ScalarType::kBFloat16: return bf16_to_float(float_to_bf16(value));
    case ScalarType::kFloat16: return half_to_float(float_to_half(value));
    case ScalarType::kFloat32: break;
  }
  return value;
}

}  // namespace

void HighThroughputShape::validate() const {
  const std::pair<const char*, int64_t> positive[] = {
      {"max_tokens_per_rank", max_tokens_per_rank}, {"num_experts", num_experts},
      {"experts_per_token", experts_per_token},     {"world_size", world_size},
      {"hidden_dim_bytes", hidden_dim_bytes},       {"expert_alignment", expert_alignment}};
  for (const auto& [field, value] : positive) {
    EW_REQUIRE(value > 0, "HighThroughputShape.", field, " must be > 0, got ", value);
  }
  EW_REQUIRE(hidden_dim_scale_bytes >= 0, "HighThroughputShape.hidden_dim_scale_bytes must be >= 0, got ",
             hidden_dim_scale_bytes);
  EW_REQUIRE(num_experts % world_size == 0,
             "HighThroughputShape.num_experts must be divisible by world_size=", world_size, ", got ", num_experts);
  EW_REQUIRE(experts_per_token <= num_experts,
             "HighThroughputShape.experts_per_token must be <= num_experts=", num_experts, ", got ", experts_per_token);
}

RankPackedReceive dispatch_rank_packed(const HighThroughputShape& shape, int64_t rank,
                                       const std::vector<RankTokens>& sources) {
  validate_sources(shape, "dispatch_rank_packed", rank, sources);
  const int64_t k = shape.experts_per_token;
  RankPackedReceive out;
  out.tokens_per_expert.assign(size_t(shape.num_local_experts()), 0);
  for (size_t s = 0; s < sources.size(); ++s) {
    const RankTokens& source = sources[s];
    for (int64_t t = 0; t < source.m; ++t) {
      bool received = false;
      for (int64_t j = 0; j < k; ++j) received |= local_index(shape, rank, source.topk_idx[t * k + j]) != kNoExpert;
      if (!received) continue;
      out.rows.push_back(row_of(shape, source, uint32_t(s), uint32_t(t)));
      for (int64_t j = 0; j < k; ++j) {
        const int64_t le = local_index(shape, rank, source.topk_idx[t * k + j]);
        out.recv_topk_idx.push_back(le);
        out.recv_topk_weights.push_back(le == kNoExpert ? 0.0f : source.topk_weights[t * k + j]);
        if (le != kNoExpert) ++out.tokens_per_expert[size_t(le)];
      }
    }
  }
  return out;
}

ExpertContiguousReceive dispatch_expert_contiguous(const HighThroughputShape& shape, int64_t rank,
                                                   const std::vector<RankTokens>& sources) {
  validate_sources(shape, "dispatch_expert_contiguous", rank, sources);
  const size_t local = size_t(shape.num_local_experts());
  std::vector<std::vector<std::pair<ReceivedRow, float>>> segments(local);
  for_each_local_slot(shape, rank, sources, [&](uint32_t s, uint32_t t, int64_t, int64_t le, float weight) {
    segments[size_t(le)].push_back({row_of(shape, sources[s], s, t), weight});
  });
  ExpertContiguousReceive out;
  out.segment_start.push_back(0);
  for (size_t le = 0; le < local; ++le) {
    out.tokens_per_expert.push_back(int64_t(segments[le].size()));
    for (const auto& [row, weight] : segments[le]) {
      out.rows.push_back(row);
      out.row_expert.push_back(int64_t(le));
      out.row_weight.push_back(weight);
    }
    // Padding up to the next segment's aligned start (after the last segment too: the layout's rows are whole).
    while (int64_t(out.rows.size()) % shape.expert_alignment != 0) {
      out.rows.push_back(ReceivedRow{});
      out.row_expert.push_back(kNoExpert);
      out.row_weight.push_back(0.0f);
    }
    out.segment_start.push_back(int64_t(out.rows.size()));
  }
  return out;
}

void combine_rank_packed(const HighThroughputShape& shape, int64_t rank, const std::vector<RankTokens>& sources,
                         int64_t hidden_dim, const RankRowFn& row, float* out) {
  validate_sources(shape, "combine_rank_packed", rank, sources);
  const RankTokens& own = sources[size_t(rank)];
  const int64_t k = shape.experts_per_token;
  std::fill(out, out + own.m * hidden_dim, 0.0f);
  for (int64_t t = 0; t < own.m; ++t) {
    for (int64_t r = 0; r < shape.world_size; ++r) {
      bool received = false;
      for (int64_t j = 0; j < k; ++j) received |= local_index(shape, r, own.topk_idx[t * k + j]) != kNoExpert;
      if (!received) continue;
      const float* y = row(uint32_t(r), uint32_t(rank), uint32_t(t));
      for (int64_t h = 0; h < hidden_dim; ++h) out[t * hidden_dim + h] += y[h];
    }
  }
}

void combine_expert_contiguous(const HighThroughputShape& shape, int64_t rank, const std::vector<RankTokens>& sources,
                               int64_t hidden_dim, ScalarType row_type, const ExpertRowFn& expert_row, float* out) {
  validate_sources(shape, "combine_expert_contiguous", rank, sources);
  const RankTokens& own = sources[size_t(rank)];
  const int64_t k = shape.experts_per_token;
  std::fill(out, out + own.m * hidden_dim, 0.0f);
  std::vector<float> partial(static_cast<size_t>(hidden_dim));
  for (int64_t t = 0; t < own.m; ++t) {
    for (int64_t r = 0; r < shape.world_size; ++r) {
      bool received = false;
      std::fill(partial.begin(), partial.end(), 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t le = local_index(shape, r, own.topk_idx[t * k + j]);
        if (le == kNoExpert) continue;
        received = true;
        const float weight = own.topk_weights[t * k + j];
        const float* y = expert_row(uint32_t(r), uint32_t(le), uint32_t(rank), uint32_t(t));
        for (int64_t h = 0; h < hidden_dim; ++h) partial[size_t(h)] += weight * y[h];
      }
      if (!received) continue;
      for (int64_t h = 0; h < hidden_dim; ++h) out[t * hidden_dim + h] += rounded_to(partial[size_t(h)], row_type);
    }
  }
}

int64_t rank_packed_rows(const HighThroughputShape& shape, int64_t rank, const std::vector<RankTokens>& sources) {
  return int64_t(dispatch_rank_packed(shape, rank, sources).rows.size());
}

int64_t expert_contiguous_rows(const HighThroughputShape& shape, int64_t rank, const std::vector<RankTokens>& sources) {
  return dispatch_expert_contiguous(shape, rank, sources).segment_start.back();
}

}  // namespace expertwire::reference
