// test_high_throughput: the high-throughput all-to-all against the CPU reference model (reference/high_throughput.h)
// on N ranks. Run as `mpirun -np N ./test_high_throughput [--transport T] [--seed S] [--max-tokens M]`; prints
// "PASS <case>" or "FAIL <case>: <why>" per case, ends with "N passed, N failed", exits non-zero on any failure.
// With --fault-tolerant every object is in the fault-tolerant mode, and every case also checks that no rank was
// masked (every wait answered); then every case runs again with a middle rank masked out by the others (it makes
// no call), against the reference without its tokens and its experts, every transport's paths included (the put
// path's pushed rows and the receivers' RecvBase).
//
// Every case runs a few dispatch + combine rounds on one object, m changing between rounds and ranks, and checks
// on every rank: every received row's payload and scales byte for byte, its expert indices and weights (rank-packed)
// or its expert and weight, padding rows included (expert-contiguous), the per-expert counts and segment starts,
// that rows past the count stay untouched, and the combined tokens (exact for rank-packed rows; within rounding
// for the expert-contiguous sums, whose partial sums the GPU forms with fused multiply-adds), with the per-slot
// values every combine carries back (each slot's from the rank of its expert) and, in odd expert-contiguous
// rounds, the caller's row weights instead of the delivered ones. Cases: m from 0 to
// the maximum, -1 slots, every token on one expert, a rank that receives nothing, alignment 1 and 128, exact and
// worst-case capacity, with and without scales, bf16 and float32 rows, inputs already in the dispatch input
// buffer. Then bad input: an index >= num_experts, a receive capacity too small, outputs too small, payload sizes
// that differ between ranks, m > the maximum, each a named error.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/cuda_utils.h"
#include "core/error.h"
#include "expertwire/high_throughput.h"
#include "reference/high_throughput.h"
#include "tests/common/mpi_harness.h"
#include "tests/common/transports.h"
#include "tests/common/workload.h"

namespace expertwire {
namespace {

using harness::Rng;
using harness::TransportKind;
using reference::HighThroughputShape;
using reference::RankTokens;

struct Options {
  std::string transport = harness::kDefaultTransports;
  uint64_t seed = 11;
  int64_t max_tokens = 512;
  bool fault_tolerant = false;  // objects in the fault-tolerant mode, every rank active throughout
};

Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--fault-tolerant") {
      o.fault_tolerant = true;
      continue;
    }
    EW_REQUIRE(i + 1 < argc, "test_high_throughput: ", arg, " needs a value");
    const std::string value = argv[++i];
    if (arg == "--transport") o.transport = value;
    else if (arg == "--seed") o.seed = std::stoull(value);
    else if (arg == "--max-tokens") o.max_tokens = std::stoll(value);
    else EW_THROW(ConfigError, "test_high_throughput: unknown flag ", arg);
  }
  return o;
}

enum class Routing { kRandom, kHoles, kOneExpert, kLastRankEmpty };

struct Case {
  std::string name;
  int64_t num_experts_per_rank = 4;
  int64_t k = 4;
  int64_t hidden = 256;
  bool scales = true;
  int64_t alignment = 1;
  HighThroughputLayout layout = HighThroughputLayout::kRankPacked;
  bool exact = false;  // outputs sized by counts() (a host synchronization), else the worst case
  ScalarType type = ScalarType::kBFloat16;
  Routing routing = Routing::kRandom;
  bool staged = false;            // x written into dispatch_input_buffer()
  std::vector<int64_t> m_rounds;  // m of rank 0 per round; other ranks vary around it
};

// One rank's tokens of one round.
struct Tokens {
  int64_t m = 0;
  std::vector<uint8_t> x;
  std::vector<uint8_t> x_scale;
  std::vector<int64_t> topk_idx;
  std::vector<float> topk_weights;
  RankTokens view() const {
    return RankTokens{m, x.data(), x_scale.empty() ? nullptr : x_scale.data(), topk_idx.data(), topk_weights.data()};
  }
};

int64_t m_of(const Case& c, int64_t round_m, int rank, int64_t max_tokens) {
  if (round_m == 0 || round_m == max_tokens) return round_m;
  return std::min<int64_t>(max_tokens, round_m + 7 * rank);
}

Tokens make_tokens(const Case& c, const HighThroughputShape& shape, int rank, int64_t m, uint64_t seed) {
  Tokens tokens;
  tokens.m = m;
  const int64_t bytes = shape.hidden_dim_bytes, sbytes = shape.hidden_dim_scale_bytes, k = c.k;
  tokens.x.resize(std::max<int64_t>(m, 1) * bytes);
  tokens.x_scale.resize(std::max<int64_t>(m, 1) * sbytes);
  tokens.topk_idx.assign(std::max<int64_t>(m, 1) * k, -1);
  tokens.topk_weights.assign(std::max<int64_t>(m, 1) * k, 0.0f);
  Rng rng(harness::mix_seed(seed, uint64_t(rank), uint64_t(m)));
  for (auto& b : tokens.x) b = uint8_t(rng.next());
  for (int64_t i = 0; i + 4 <= int64_t(tokens.x_scale.size()); i += 4) {
    const float s = rng.uniform(0.01f, 2.0f);
    std::memcpy(&tokens.x_scale[i], &s, 4);
  }
  const int64_t experts = shape.num_experts, per_rank = shape.num_local_experts();
  for (int64_t t = 0; t < m; ++t) {
    const uint32_t marker[2] = {uint32_t(rank), uint32_t(t)};
    std::memcpy(&tokens.x[t * bytes], marker, sizeof(marker));
    int64_t* row = &tokens.topk_idx[t * k];
    for (int64_t j = 0; j < k; ++j) {
      tokens.topk_weights[t * k + j] = rng.uniform(0.0f, 1.0f);
      if (c.routing == Routing::kOneExpert) {
        row[j] = j == 0 ? 0 : -1;
        continue;
      }
      if (c.routing == Routing::kHoles && rng.below(3) == 0) continue;
      const int64_t pool = c.routing == Routing::kLastRankEmpty ? experts - per_rank : experts;
      int64_t e;
      do {
        e = rng.below(uint32_t(pool));
      } while (std::find(row, row + j, e) != row + j);
      row[j] = e;
    }
  }
  return tokens;
}

// Device memory that the test fills with a sentinel byte, and reads back.
struct DeviceBytes {
  DeviceBytes(uint64_t bytes, uint8_t fill) : buffer(std::max<uint64_t>(bytes, 16)), size(bytes) {
    EW_CUDA_CHECK(cudaMemset(buffer.get(), fill, buffer.bytes()));
  }
  template <class T>
  T* get() const {
    return buffer.get<T>();
  }
  template <class T>
  std::vector<T> read(uint64_t count) const {
    std::vector<T> out(count);
    if (count) EW_CUDA_CHECK(cudaMemcpy(out.data(), buffer.get(), count * sizeof(T), cudaMemcpyDeviceToHost));
    return out;
  }
  void write(const void* data, uint64_t bytes) {
    if (bytes) EW_CUDA_CHECK(cudaMemcpy(buffer.get(), data, bytes, cudaMemcpyHostToDevice));
  }
  DeviceBuffer buffer;
  uint64_t size;
};

class Checker {
 public:
  explicit Checker(std::string* why) : why_(why) {}
  template <class... Parts>
  bool expect(bool ok, const Parts&... parts) {
    if (!ok && why_->empty()) *why_ = detail::concat(parts...);
    return ok;
  }

 private:
  std::string* why_;
};

std::unique_ptr<HighThroughputAllToAll> make_object(TransportKind kind, const HighThroughputConfig& config,
                                                    const Options& o) {
  AllToAllOptions options;
  options.timeout_ns = 5'000'000'000ull;
  options.fault_tolerant = o.fault_tolerant;
  if (kind == TransportKind::kIntranode) {
    return std::make_unique<HighThroughputIntranode>(config, harness::all_gather_bytes, options);
  }
  options.force_puts = kind == TransportKind::kInternodePuts;
  return std::make_unique<HighThroughputInternode>(config, options);
}

float element(const uint8_t* row, int64_t h, ScalarType type) {
  if (type == ScalarType::kFloat32) {
    float v;
    std::memcpy(&v, row + 4 * h, 4);
    return v;
  }
  uint16_t bits;
  std::memcpy(&bits, row + 2 * h, 2);
  return harness::from_bits16(bits, type);
}

void put_element(uint8_t* row, int64_t h, ScalarType type, float value) {
  if (type == ScalarType::kFloat32) {
    std::memcpy(row + 4 * h, &value, 4);
  } else {
    const uint16_t bits = harness::to_bits16(value, type);
    std::memcpy(row + 2 * h, &bits, 2);
  }
}

// In the fault-tolerant mode: "" when the object's mask has every rank active but `masked` (-1: none), else which
// entry differs.
std::string mask_differs(const HighThroughputAllToAll& object, int world, int masked) {
  std::vector<int32_t> active(size_t(world), -1);
  EW_CUDA_CHECK(cudaDeviceSynchronize());
  EW_CUDA_CHECK(
      cudaMemcpy(active.data(), object.active_ranks(), active.size() * sizeof(int32_t), cudaMemcpyDeviceToHost));
  for (int r = 0; r < world; ++r) {
    if (active[size_t(r)] != int32_t(r != masked)) {
      return "active_ranks[" + std::to_string(r) + "] = " + std::to_string(active[size_t(r)]);
    }
  }
  return "";
}

// What the reference is given of round `all`'s tokens with rank `masked` masked out: nothing of its tokens, and no
// slot of the others naming its experts (their calls still name them; the all-to-all leaves them out).
std::vector<Tokens> without_rank(std::vector<Tokens> all, int masked, const Case& c, const HighThroughputShape& shape,
                                 uint64_t seed) {
  if (masked < 0) return all;
  all[size_t(masked)] = make_tokens(c, shape, masked, 0, seed);
  const int64_t per_rank = shape.num_local_experts();
  for (Tokens& tokens : all) {
    for (int64_t& e : tokens.topk_idx) {
      if (e >= 0 && e / per_rank == masked) e = -1;
    }
  }
  return all;
}

// One case on one transport, with rank `masked` (-1: none; the fault-tolerant mode) masked out by the others
// before the first round and making no call; returns "" or why it failed (the same verdict on every rank: the caller
// reduces).
std::string run_case(const harness::MpiSession& mpi, TransportKind kind, const Case& c, const Options& o,
                     int masked = -1) {
  const int rank = mpi.rank(), world = mpi.world_size();
  HighThroughputConfig config;
  config.max_num_tokens = o.max_tokens;
  config.num_experts = c.num_experts_per_rank * world;
  config.experts_per_token = c.k;
  config.rank = rank;
  config.world_size = world;
  config.hidden_dim = c.hidden;
  config.hidden_dim_bytes = c.hidden;  // fp8-sized payloads
  config.hidden_dim_scale_bytes = c.scales ? c.hidden / 128 * 4 : 0;
  config.combine_element_bytes = c.type == ScalarType::kFloat32 ? 4 : 2;
  config.expert_alignment = c.alignment;
  auto object = make_object(kind, config, o);
  HighThroughputShape shape;
  shape.max_tokens_per_rank = config.max_num_tokens;
  shape.num_experts = config.num_experts;
  shape.experts_per_token = c.k;
  shape.world_size = world;
  shape.hidden_dim_bytes = config.hidden_dim_bytes;
  shape.hidden_dim_scale_bytes = config.hidden_dim_scale_bytes;
  shape.expert_alignment = c.alignment;
  const int64_t k = c.k, bytes = config.hidden_dim_bytes, swords = config.hidden_dim_scale_bytes / 4;
  const int64_t local_experts = config.num_local_experts();
  const uint64_t element_bytes = scalar_type_size(c.type), row_bytes = uint64_t(c.hidden) * element_bytes;
  std::string why;
  Checker check(&why);
  if (rank == masked) {
    // No all-to-all call; only the test's own agreements of each round, as the others make them.
    for (size_t round = 0; round < c.m_rounds.size() && harness::all_ranks(true); ++round) harness::all_ranks(true);
    return why;
  }
  if (masked >= 0) EW_CUDA_CHECK(cudaMemset(object->active_ranks() + masked, 0, sizeof(int32_t)));
  auto handle = object->make_handle();
  // Every rank makes the same collectives on every path (the masked rank too, above): one agreement at the start
  // of each round and one after its dispatch, whatever failed or threw.
  for (size_t round = 0; round < c.m_rounds.size() && harness::all_ranks(why.empty()); ++round) {
    bool agreed = false;  // this round's agreement after the dispatch is made
    try {
      const uint64_t seed = harness::mix_seed(o.seed, round, std::hash<std::string>{}(c.name));
      std::vector<Tokens> called;
      for (int s = 0; s < world; ++s) {
        called.push_back(make_tokens(c, shape, s, m_of(c, c.m_rounds[round], s, o.max_tokens), seed));
      }
      const Tokens& call = called[rank];  // what this rank's calls pass
      const std::vector<Tokens> all = without_rank(called, masked, c, shape, seed);
      std::vector<RankTokens> sources;
      for (const Tokens& t : all) sources.push_back(t.view());
      const Tokens& mine = all[rank];  // the same tokens, as the reference sees them
      const int64_t m = mine.m;

      // Inputs on the device.
      DeviceBytes x(m * bytes, 0), scale(m * swords * 4, 0), idx(m * k * 8, 0), weights(m * k * 4, 0);
      scale.write(call.x_scale.data(), m * swords * 4);
      idx.write(call.topk_idx.data(), m * k * 8);
      weights.write(call.topk_weights.data(), m * k * 4);
      HighThroughputDispatchInputs in;
      in.m = uint32_t(m);
      in.topk_idx = idx.get<void>();
      in.topk_idx_int64 = true;
      in.topk_weights = weights.get<float>();
      if (c.staged) {
        const Strided2D<uint8_t> buffer = object->dispatch_input_buffer();
        for (int64_t t = 0; t < m; ++t) {
          EW_CUDA_CHECK(cudaMemcpy(buffer.at(t, 0), &call.x[t * bytes], bytes, cudaMemcpyHostToDevice));
        }
        in.x = read_only(buffer);
      } else {
        x.write(call.x.data(), m * bytes);
        in.x = Strided2D<const uint8_t>{x.get<uint8_t>(), uint64_t(bytes), 1};
      }
      if (swords) in.x_scale = Strided2D<const float>{scale.get<float>(), uint64_t(swords) * 4, 4};

      const bool packed = c.layout == HighThroughputLayout::kRankPacked;
      const int64_t expected_rows = packed ? reference::rank_packed_rows(shape, rank, sources)
                                           : reference::expert_contiguous_rows(shape, rank, sources);
      object->dispatch_layout(in, c.layout, *handle, nullptr);
      uint64_t capacity = packed ? config.recv_rows() : config.max_expert_rows();
      if (c.exact) {
        const HighThroughputCounts counts = object->counts(*handle, nullptr);
        const int64_t got = packed ? counts.num_recv_tokens : counts.num_expert_rows;
        check.expect(got == expected_rows, "counts(): ", got, " rows, expected ", expected_rows);
        capacity = uint64_t(std::max<int64_t>(got, 0));
      }
      DeviceBytes recv_x(capacity * bytes, 0xab), recv_scale(capacity * swords * 4, 0xab);
      DeviceBytes recv_idx(capacity * k * 8, 0xab), recv_w(capacity * k * 4, 0xab);
      DeviceBytes row_expert(capacity * 4, 0xab), row_weight(capacity * 4, 0xab);
      DeviceBytes tpe(local_experts * 4, 0xab), offsets((local_experts + 1) * 4, 0xab), num_rows(4, 0xab);
      HighThroughputDispatchOutputs out;
      out.layout = c.layout;
      out.capacity_rows = capacity;
      out.recv_x = recv_x.get<uint8_t>();
      if (swords) out.recv_x_scale = Strided2D<float>{recv_scale.get<float>(), uint64_t(swords) * 4, 4};
      out.recv_topk_idx = recv_idx.get<int64_t>();
      out.recv_topk_weights = recv_w.get<float>();
      out.row_expert = row_expert.get<int32_t>();
      out.row_weight = row_weight.get<float>();
      out.tokens_per_expert = tpe.get<int32_t>();
      out.expert_offsets = offsets.get<int32_t>();
      out.num_recv_rows = num_rows.get<int32_t>();
      object->dispatch_data(in, *handle, out, nullptr);
      EW_CUDA_CHECK(cudaDeviceSynchronize());
      object->check_errors();

      // Dispatch against the reference.
      const auto got_x = recv_x.read<uint8_t>(capacity * bytes);
      const auto got_scale = recv_scale.read<uint8_t>(capacity * swords * 4);
      const auto got_tpe = tpe.read<int32_t>(local_experts);
      const auto got_rows = num_rows.read<int32_t>(1);
      check.expect(got_rows[0] == expected_rows, "num_recv_rows ", got_rows[0], ", expected ", expected_rows);
      std::vector<float> combine_expected(m * c.hidden);
      std::vector<uint8_t> expert_out(std::max<uint64_t>(capacity, 1) * row_bytes, 0);
      // Per-slot values carried back beside the rows (rank-packed [rows][k], expert-contiguous [rows]): the value of
      // slot j of token t of rank s is slot_value(s, t, j) where this rank holds that slot's expert, and a value naming
      // this rank elsewhere, which the token's rank must never take.
      std::vector<float> slot_values(std::max<uint64_t>(capacity, 1) * (packed ? k : 1), 0.0f);
      auto slot_value = [](uint32_t s, uint32_t t, int64_t j) { return float(s * 100000u + t * 32u + uint32_t(j)); };
      const float not_here = -1.0f - float(rank);
      std::fill(slot_values.begin(), slot_values.end(), not_here);
      // Odd rounds weight the expert-contiguous rows by row_weight = twice the delivered weights (exact in fp32).
      const bool doubled_weights = !packed && round % 2 == 1;
      // The rows this rank's experts output for each received (source, token, local expert).
      std::vector<std::vector<float>> owned_rows;
      auto expert_value_row = [&](uint32_t owner, uint32_t le, uint32_t s, uint32_t t) {
        std::vector<float> row(c.hidden);
        harness::expert_output_row(owner * uint32_t(local_experts) + le, s, t, c.type, c.hidden, row.data());
        return row;
      };
      auto check_row = [&](int64_t row, const reference::ReceivedRow& expected) {
        if (!check.expect(std::memcmp(&got_x[row * bytes], expected.x, bytes) == 0, "recv_x row ", row,
                          " is not token ", expected.token, " of rank ", expected.source_rank)) {
          return;
        }
        if (swords) {
          check.expect(std::memcmp(&got_scale[row * swords * 4], expected.x_scale, swords * 4) == 0, "scales of row ",
                       row);
        }
      };
      auto untouched_after = [&](int64_t rows) {
        for (uint64_t b = uint64_t(rows) * bytes; b < std::min<uint64_t>(capacity, rows + 64) * bytes; ++b) {
          if (!check.expect(got_x[b] == 0xab, "recv_x written past its ", rows, " rows, at byte ", b)) return;
        }
      };
      if (packed) {
        const auto expected = reference::dispatch_rank_packed(shape, rank, sources);
        const auto got_idx = recv_idx.read<int64_t>(capacity * k);
        const auto got_w = recv_w.read<float>(capacity * k);
        for (int64_t e = 0; e < local_experts; ++e) {
          check.expect(got_tpe[e] == expected.tokens_per_expert[e], "tokens_per_expert[", e, "] ", got_tpe[e],
                       ", expected ", expected.tokens_per_expert[e]);
        }
        for (size_t row = 0; row < expected.rows.size() && why.empty(); ++row) {
          check_row(row, expected.rows[row]);
          for (int64_t j = 0; j < k; ++j) {
            check.expect(got_idx[row * k + j] == expected.recv_topk_idx[row * k + j] &&
                             got_w[row * k + j] == expected.recv_topk_weights[row * k + j],
                         "recv_topk of row ", row, " slot ", j, ": ", got_idx[row * k + j], "/", got_w[row * k + j],
                         ", expected ", expected.recv_topk_idx[row * k + j], "/",
                         expected.recv_topk_weights[row * k + j]);
          }
          const auto& r = expected.rows[row];
          const auto values = expert_value_row(rank, 0, r.source_rank, r.token);
          for (int64_t h = 0; h < c.hidden; ++h) put_element(&expert_out[row * row_bytes], h, c.type, values[h]);
          for (int64_t j = 0; j < k; ++j) {
            if (expected.recv_topk_idx[row * k + j] >= 0)
              slot_values[row * k + j] = slot_value(r.source_rank, r.token, j);
          }
        }
        untouched_after(int64_t(expected.rows.size()));
      } else {
        const auto expected = reference::dispatch_expert_contiguous(shape, rank, sources);
        const auto got_expert = row_expert.read<int32_t>(capacity);
        auto got_weight = row_weight.read<float>(capacity);
        const auto got_offsets = offsets.read<int32_t>(local_experts + 1);
        for (int64_t e = 0; e <= local_experts; ++e) {
          check.expect(got_offsets[e] == expected.segment_start[e], "expert_offsets[", e, "] ", got_offsets[e],
                       ", expected ", expected.segment_start[e]);
          if (e < local_experts) {
            check.expect(got_tpe[e] == expected.tokens_per_expert[e], "tokens_per_expert[", e, "] ", got_tpe[e],
                         ", expected ", expected.tokens_per_expert[e]);
          }
        }
        for (size_t row = 0; row < expected.rows.size() && why.empty(); ++row) {
          check.expect(got_expert[row] == expected.row_expert[row] && got_weight[row] == expected.row_weight[row],
                       "row ", row, ": expert/weight ", got_expert[row], "/", got_weight[row], ", expected ",
                       expected.row_expert[row], "/", expected.row_weight[row]);
          if (expected.row_expert[row] < 0) continue;
          check_row(row, expected.rows[row]);
          const auto& r = expected.rows[row];
          const auto values = expert_value_row(rank, uint32_t(expected.row_expert[row]), r.source_rank, r.token);
          for (int64_t h = 0; h < c.hidden; ++h) put_element(&expert_out[row * row_bytes], h, c.type, values[h]);
          const int64_t expert = rank * local_experts + expected.row_expert[row];
          for (int64_t j = 0; j < k; ++j) {
            if (all[r.source_rank].topk_idx[r.token * k + j] == expert)
              slot_values[row] = slot_value(r.source_rank, r.token, j);
          }
        }
        if (doubled_weights) {
          for (size_t row = 0; row < expected.rows.size(); ++row) got_weight[row] *= 2.0f;
          row_weight.write(got_weight.data(), expected.rows.size() * 4);
        }
        untouched_after(int64_t(expected.rows.size()));
      }
      agreed = true;
      if (!harness::all_ranks(why.empty())) {
        // Every rank still combines: peers wait for it.
        if (why.empty()) why = "another rank's dispatch failed";
      }

      // Combine against the reference.
      DeviceBytes expert_dev(std::max<uint64_t>(capacity, 1) * row_bytes, 0), combined(m * row_bytes, 0xab);
      expert_dev.write(expert_out.data(), capacity * row_bytes);
      HighThroughputCombineParams cp;
      cp.expert_out = expert_dev.get<void>();
      cp.type = c.type;
      cp.out = combined.get<void>();
      DeviceBytes slots_dev(slot_values.size() * 4, 0), combined_slots(std::max<int64_t>(m, 1) * k * 4, 0xab);
      slots_dev.write(slot_values.data(), slot_values.size() * 4);
      cp.with_topk_weights = true;
      cp.topk_weights = slots_dev.get<float>();
      cp.out_topk_weights = combined_slots.get<float>();
      if (doubled_weights) cp.row_weight = row_weight.get<float>();
      object->combine(cp, *handle, nullptr);
      EW_CUDA_CHECK(cudaDeviceSynchronize());
      object->check_errors();
      const auto got_out = combined.read<uint8_t>(m * row_bytes);
      const auto got_slots = combined_slots.read<float>(m * k);
      for (int64_t t = 0; t < m && why.empty(); ++t) {
        for (int64_t j = 0; j < k; ++j) {
          const float want = mine.topk_idx[t * k + j] >= 0 ? slot_value(uint32_t(rank), uint32_t(t), j) : 0.0f;
          if (!check.expect(got_slots[t * k + j] == want, "out_topk_weights of token ", t, " slot ", j, ": ",
                            got_slots[t * k + j], ", expected ", want)) {
            break;
          }
        }
      }
      if (packed) {
        reference::combine_rank_packed(
            shape, rank, sources, c.hidden,
            [&](uint32_t owner, uint32_t s, uint32_t t) {
              owned_rows.push_back(expert_value_row(owner, 0, s, t));
              return owned_rows.back().data();
            },
            combine_expected.data());
      } else {
        reference::combine_expert_contiguous(
            shape, rank, sources, c.hidden, c.type,
            [&](uint32_t owner, uint32_t le, uint32_t s, uint32_t t) {
              owned_rows.push_back(expert_value_row(owner, le, s, t));
              return owned_rows.back().data();
            },
            combine_expected.data());
      }
      for (int64_t t = 0; t < m && why.empty(); ++t) {
        for (int64_t h = 0; h < c.hidden; ++h) {
          const float got = element(&got_out[t * row_bytes], h, c.type);
          float want = combine_expected[t * c.hidden + h] * (doubled_weights ? 2.0f : 1.0f);
          if (c.type != ScalarType::kFloat32) want = harness::from_bits16(harness::to_bits16(want, c.type), c.type);
          const float tolerance = packed ? 0.0f : 2e-2f * (1.0f + std::fabs(want));
          if (!check.expect(std::fabs(got - want) <= tolerance, "combined token ", t, " element ", h, ": ", got,
                            ", expected ", want)) {
            break;
          }
        }
      }
      owned_rows.clear();
    } catch (const Error& e) {
      if (why.empty()) why = std::string("threw: ") + e.what();
      if (!agreed) harness::all_ranks(false);
    }
  }
  if (o.fault_tolerant && why.empty()) why = mask_differs(*object, world, masked);
  return why;
}

// A case whose call must fail with `fragment` in the error on the ranks `fails(rank)` names; the others complete.
struct Tally {
  int passed = 0, failed = 0;
  void report(const harness::MpiSession& mpi, const std::string& name, const std::string& why) {
    const bool ok = harness::all_ranks(why.empty());
    if (ok) ++passed;
    else ++failed;
    if (!why.empty()) std::printf("FAIL %s (rank %d): %s\n", name.c_str(), mpi.rank(), why.c_str());
    if (ok && mpi.rank() == 0) std::printf("PASS %s\n", name.c_str());
    std::fflush(stdout);
  }
};

std::string expect_error(const std::function<void()>& call, const char* fragment) {
  try {
    call();
  } catch (const Error& e) {
    if (std::string(e.what()).find(fragment) != std::string::npos) return "";
    return std::string("error without '") + fragment + "': " + e.what();
  }
  return std::string("no error; expected one with '") + fragment + "'";
}

// Bad input: each case on a fresh object (device errors are sticky).
void run_failures(const harness::MpiSession& mpi, TransportKind kind, const Options& o, Tally& tally) {
  const int rank = mpi.rank(), world = mpi.world_size();
  HighThroughputConfig config;
  config.max_num_tokens = 64;
  config.num_experts = 4 * world;
  config.experts_per_token = 2;
  config.rank = rank;
  config.world_size = world;
  config.hidden_dim = 128;
  config.hidden_dim_bytes = 128;
  auto inputs = [&](DeviceBytes& x, DeviceBytes& idx, DeviceBytes& w, int64_t m, int64_t bad_index) {
    std::vector<int64_t> topk(m * 2);
    for (int64_t t = 0; t < m; ++t) {
      // Token t to rank t % world's first two experts: every rank receives at least 16 / world tokens per source.
      topk[2 * t] = (t % world) * config.num_local_experts();
      topk[2 * t + 1] = (t == 0 && bad_index >= 0) ? bad_index : (t % world) * config.num_local_experts() + 1;
    }
    idx.write(topk.data(), topk.size() * 8);
    HighThroughputDispatchInputs in;
    in.m = uint32_t(m);
    in.x = Strided2D<const uint8_t>{x.get<uint8_t>(), 128, 1};
    in.topk_idx = idx.get<void>();
    in.topk_weights = w.get<float>();
    return in;
  };
  auto outputs = [&](DeviceBytes& rx, DeviceBytes& ri, DeviceBytes& rw, uint64_t capacity) {
    HighThroughputDispatchOutputs out;
    out.capacity_rows = capacity;
    out.recv_x = rx.get<uint8_t>();
    out.recv_topk_idx = ri.get<int64_t>();
    out.recv_topk_weights = rw.get<float>();
    return out;
  };
  const uint64_t cap = uint64_t(config.recv_rows());
  DeviceBytes x(64 * 128, 1), idx(64 * 16, 0), w(64 * 8, 0), rx(cap * 128, 0), ri(cap * 16, 0), rw(cap * 8, 0);
  const std::string prefix = std::string(harness::transport_flag_name(kind)) + " failure: ";
  {  // An expert index out of range: that rank's DeviceError names it; nothing was sent for that slot.
    auto object = make_object(kind, config, o);
    auto handle = object->make_handle();
    const auto in = inputs(x, idx, w, 8, rank == 0 ? config.num_experts + 5 : -1);
    object->dispatch(in, *handle, outputs(rx, ri, rw, cap), nullptr);
    EW_CUDA_CHECK(cudaDeviceSynchronize());
    std::string why;
    if (rank == 0) {
      why = expect_error([&] { object->check_errors(); }, "out of range");
    } else {
      try {
        object->check_errors();
      } catch (const Error& e) {
        why = std::string("a rank with valid indices raised: ") + e.what();
      }
    }
    tally.report(mpi, prefix + "expert index >= num_experts", why);
  }
  {  // A receive capacity too small: the ranks it overflows raise, naming the rows needed.
    HighThroughputConfig small = config;
    small.recv_capacity = 3;
    auto object = make_object(kind, small, o);
    auto handle = object->make_handle();
    const auto in = inputs(x, idx, w, 16, -1);
    object->dispatch_layout(in, HighThroughputLayout::kRankPacked, *handle, nullptr);
    const std::string why = expect_error([&] { object->counts(*handle, nullptr); }, "receive capacity");
    tally.report(mpi, prefix + "recv_capacity too small", why);
  }
  {  // Outputs smaller than the rows: DeviceError, no row written.
    auto object = make_object(kind, config, o);
    auto handle = object->make_handle();
    const auto in = inputs(x, idx, w, 16, -1);
    EW_CUDA_CHECK(cudaMemset(rx.get<uint8_t>(), 0xab, cap * 128));
    object->dispatch(in, *handle, outputs(rx, ri, rw, 2), nullptr);
    EW_CUDA_CHECK(cudaDeviceSynchronize());
    std::string why = expect_error([&] { object->check_errors(); }, "no row written");
    const auto bytes = rx.read<uint8_t>(cap * 128);
    if (why.empty() && std::any_of(bytes.begin(), bytes.end(), [](uint8_t b) { return b != 0xab; })) {
      why = "rows written although the outputs are too small";
    }
    tally.report(mpi, prefix + "outputs smaller than the rows", why);
  }
  {  // Rank 0 sends 112 payload bytes a token, the others 128: every rank that receives from a rank of the other
     // size raises, naming it, and writes no row (every rank receives from every rank here).
    auto object = make_object(kind, config, o);
    auto handle = object->make_handle();
    auto in = inputs(x, idx, w, 16, -1);
    in.x_bytes = rank == 0 ? 112 : 128;
    EW_CUDA_CHECK(cudaMemset(rx.get<uint8_t>(), 0xab, cap * 128));
    object->dispatch(in, *handle, outputs(rx, ri, rw, cap), nullptr);
    EW_CUDA_CHECK(cudaDeviceSynchronize());
    const std::string other = rank == 0 ? " dispatches 128 payload bytes" : "rank 0 dispatches 112 payload bytes";
    std::string why = expect_error([&] { object->check_errors(); }, other.c_str());
    const auto bytes = rx.read<uint8_t>(cap * 128);
    if (why.empty() && std::any_of(bytes.begin(), bytes.end(), [](uint8_t b) { return b != 0xab; })) {
      why = "rows written although the payload sizes disagree";
    }
    tally.report(mpi, prefix + "payload bytes that differ between ranks", why);
  }
  {  // m > max_num_tokens: ConfigError before anything is launched; the object then works.
    auto object = make_object(kind, config, o);
    auto handle = object->make_handle();
    auto in = inputs(x, idx, w, 8, -1);
    in.m = 65;
    std::string why = expect_error([&] { object->dispatch(in, *handle, outputs(rx, ri, rw, cap), nullptr); },
                                   "m must be <= max_num_tokens");
    in.m = 8;
    object->dispatch(in, *handle, outputs(rx, ri, rw, cap), nullptr);
    DeviceBytes y(cap * 256, 0), combined(8 * 256, 0);
    HighThroughputCombineParams cp;
    cp.expert_out = y.get<void>();
    cp.out = combined.get<void>();
    object->combine(cp, *handle, nullptr);
    EW_CUDA_CHECK(cudaDeviceSynchronize());
    try {
      object->check_errors();
    } catch (const Error& e) {
      if (why.empty()) why = std::string("the call after the refused one failed: ") + e.what();
    }
    tally.report(mpi, prefix + "m > max_num_tokens", why);
  }
}

std::vector<Case> cases(int64_t max_tokens) {
  std::vector<Case> all;
  using L = HighThroughputLayout;
  all.push_back({"rank-packed, random, changing m",
                 4,
                 4,
                 256,
                 true,
                 1,
                 L::kRankPacked,
                 false,
                 ScalarType::kBFloat16,
                 Routing::kRandom,
                 false,
                 {37, 0, 1, max_tokens, 200}});
  all.push_back({"rank-packed, exact capacity, -1 slots",
                 4,
                 4,
                 256,
                 true,
                 1,
                 L::kRankPacked,
                 true,
                 ScalarType::kBFloat16,
                 Routing::kHoles,
                 false,
                 {100, 3}});
  all.push_back({"rank-packed, no scales, float32 rows, top-8",
                 8,
                 8,
                 128,
                 false,
                 1,
                 L::kRankPacked,
                 false,
                 ScalarType::kFloat32,
                 Routing::kRandom,
                 false,
                 {64}});
  all.push_back({"rank-packed, last rank receives nothing",
                 4,
                 4,
                 256,
                 true,
                 1,
                 L::kRankPacked,
                 false,
                 ScalarType::kBFloat16,
                 Routing::kLastRankEmpty,
                 false,
                 {50}});
  all.push_back({"rank-packed, staged input",
                 4,
                 4,
                 256,
                 true,
                 1,
                 L::kRankPacked,
                 false,
                 ScalarType::kBFloat16,
                 Routing::kRandom,
                 true,
                 {90, 20}});
  all.push_back({"expert-contiguous, alignment 1",
                 4,
                 4,
                 256,
                 true,
                 1,
                 L::kExpertContiguous,
                 false,
                 ScalarType::kBFloat16,
                 Routing::kRandom,
                 false,
                 {37, max_tokens, 0}});
  all.push_back({"expert-contiguous, alignment 128, exact",
                 4,
                 4,
                 256,
                 true,
                 128,
                 L::kExpertContiguous,
                 true,
                 ScalarType::kBFloat16,
                 Routing::kHoles,
                 false,
                 {120, 5}});
  all.push_back({"expert-contiguous, all tokens on one expert",
                 4,
                 4,
                 256,
                 true,
                 128,
                 L::kExpertContiguous,
                 false,
                 ScalarType::kBFloat16,
                 Routing::kOneExpert,
                 false,
                 {max_tokens}});
  all.push_back({"expert-contiguous, float32 rows, no scales",
                 2,
                 2,
                 128,
                 false,
                 1,
                 L::kExpertContiguous,
                 false,
                 ScalarType::kFloat32,
                 Routing::kRandom,
                 false,
                 {33}});
  return all;
}

int run(int argc, char** argv) {
  harness::MpiSession mpi(&argc, &argv);
  const Options options = parse_options(argc, argv);
  if (!harness::select_gpu_or_skip(mpi, "test_high_throughput")) return harness::kSkippedExitCode;
  const std::vector<TransportKind> kinds = harness::transports_from_flag(options.transport);
  std::optional<harness::NvshmemSession> nvshmem;
  if (harness::needs_nvshmem(kinds)) nvshmem.emplace(mpi);
  Tally tally;
  for (const TransportKind kind : kinds) {
    if (mpi.rank() == 0) std::printf("%s (%d ranks)\n", harness::transport_title(kind), mpi.world_size());
    // Each case reported on every rank; false, on every rank, once a case threw on some rank (its objects may be
    // stuck).
    auto run_reported = [&](const Case& c, int masked) {
      std::string why;
      try {
        why = run_case(mpi, kind, c, options, masked);
      } catch (const Error& e) {
        why = std::string("threw: ") + e.what();
      }
      const std::string name = std::string(harness::transport_flag_name(kind)) + ": " + c.name +
                               (masked >= 0 ? ", rank " + std::to_string(masked) + " masked" : "");
      tally.report(mpi, name, why);
      return harness::all_ranks(why.find("threw") == std::string::npos);  // every rank stops together
    };
    for (const Case& c : cases(options.max_tokens)) {
      if (!run_reported(c, -1)) break;
    }
    // The fault-tolerant mode: every case again with a middle rank masked out (every offset after it shifts).
    if (options.fault_tolerant && mpi.world_size() > 1) {
      for (const Case& c : cases(options.max_tokens)) {
        if (!run_reported(c, mpi.world_size() / 2)) break;
      }
    }
    run_failures(mpi, kind, options, tally);
  }
  if (mpi.rank() == 0) std::printf("%d passed, %d failed\n", tally.passed, tally.failed);
  return tally.failed == 0 ? 0 : 1;
}

}  // namespace
}  // namespace expertwire

int main(int argc, char** argv) {
  return expertwire::harness::run_reporting_errors("test_high_throughput", expertwire::run, argc, argv);
}
