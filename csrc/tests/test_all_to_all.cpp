// test_all_to_all: random dispatch/combine cases on N ranks, every result checked against the CPU
// reference model. Run as `mpirun -np N ./test_all_to_all [--transport T] [--seed S] [--configs C]
// [--iterations I]`; ends with "N passed, N failed" and exits non-zero on any mismatch.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "core/cuda_utils.h"
#include "tests/common/mpi_harness.h"
#include "tests/common/transports.h"
#include "tests/common/workload.h"

namespace expertwire {
namespace {

using harness::GroupData;
using harness::Rng;

struct Options {
  std::string transport = "all";
  uint64_t seed = 20261125;
  int configs = 10;
  int iterations = 4;
};

Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      EW_REQUIRE(i + 1 < argc, "test_all_to_all: ", arg, " needs a value");
      return argv[++i];
    };
    if (arg == "--transport") o.transport = value();
    else if (arg == "--seed") o.seed = std::stoull(value());
    else if (arg == "--configs") o.configs = std::stoi(value());
    else if (arg == "--iterations") o.iterations = std::stoi(value());
    else EW_THROW(ConfigError, "test_all_to_all: unknown argument '", arg,
                  "' (known: --transport T (", harness::kTransportFlagHelp, "; default all), --seed S, --configs C, "
                  "--iterations I)");
  }
  return o;
}

// A random configuration, the same on every rank (drawn from the shared seed). The first one is the
// DeepSeek-V3 shape: hidden 7168 in fp8 with 128-wide block scales.
AllToAllConfig random_config(Rng& rng, int index, int rank, int world) {
  AllToAllConfig c;
  c.rank = rank;
  c.world_size = world;
  std::vector<int64_t> experts;
  for (int64_t e : {8, 16, 32, 64, 128, 256}) {
    if (e % world == 0) experts.push_back(e);
  }
  c.num_experts = experts[rng.below(uint32_t(experts.size()))];
  c.experts_per_token = 1 + rng.below(uint32_t(std::min<int64_t>(8, c.num_experts)));
  c.dp_size = (world % 2 == 0 && rng.below(2) == 1) ? 2 : 1;
  const int64_t token_choices[] = {1, 3, 16, 33, 64};
  c.max_num_tokens = token_choices[rng.below(5)];
  const int64_t hidden_choices[] = {16, 128, 256, 1024, 2048};
  c.hidden_dim = index == 0 ? 7168 : hidden_choices[rng.below(5)];
  const bool fp8 = index == 0 || rng.below(2) == 0;
  c.hidden_dim_bytes = fp8 ? c.hidden_dim : 2 * c.hidden_dim;
  c.hidden_dim_scale_bytes = fp8 ? (c.hidden_dim + 127) / 128 * 4 : 0;
  if (index == 0) {
    c.experts_per_token = std::min<int64_t>(8, c.num_experts);
    c.max_num_tokens = 64;
  }
  return c;
}

std::string describe_config(const AllToAllConfig& c) {
  std::ostringstream s;
  s << "E=" << c.num_experts << " k=" << c.experts_per_token << " dp=" << c.dp_size << " T=" << c.max_num_tokens
    << " hidden=" << c.hidden_dim << "x" << c.hidden_dim_bytes / c.hidden_dim << "B scales=" << c.hidden_dim_scale_bytes;
  return s.str();
}

size_t element_bytes(ScalarType type) { return type == ScalarType::kFloat32 ? 4 : 2; }

float read_element(const uint8_t* data, size_t index, ScalarType type) {
  if (type == ScalarType::kFloat32) {
    float v;
    std::memcpy(&v, data + index * 4, 4);
    return v;
  }
  uint16_t bits;
  std::memcpy(&bits, data + index * 2, 2);
  return harness::from_bits16(bits, type);
}

// Collects the first few mismatches of one rank.
class Failures {
 public:
  template <class... Parts>
  void add(Parts&&... parts) {
    if (count_++ < 5) messages_.push_back(detail::concat(std::forward<Parts>(parts)...));
  }
  bool empty() const { return count_ == 0; }
  std::string summary() const {
    std::string out;
    for (const auto& m : messages_) out += "    " + m + "\n";
    if (count_ > messages_.size()) out += "    ... " + std::to_string(count_ - messages_.size()) + " more\n";
    return out;
  }

 private:
  size_t count_ = 0;
  std::vector<std::string> messages_;
};

struct Iteration {
  std::vector<int64_t> m_per_group;
  ScalarType out_type;
  ScalarType expert_type;
  bool split;
  bool use_bound_m;  // pass m = max_num_tokens and the real count through bound_m
};

Iteration make_iteration(Rng& rng, const AllToAllConfig& c, int index) {
  Iteration it;
  for (int64_t g = 0; g < c.num_dp_groups(); ++g) {
    int64_t m = int64_t(rng.below(uint32_t(c.max_num_tokens + 1)));
    if (index == 0) m = c.max_num_tokens;   // both ends of the range are always covered
    if (index == 1 && g == 0) m = 0;
    it.m_per_group.push_back(m);
  }
  static constexpr ScalarType kOut[] = {ScalarType::kFloat32, ScalarType::kBFloat16, ScalarType::kFloat16};
  static constexpr ScalarType kExpert[] = {ScalarType::kBFloat16, ScalarType::kFloat16};
  const uint32_t pair = rng.below(6);
  it.out_type = kOut[pair % 3];
  it.expert_type = kExpert[pair / 3];
  it.split = rng.below(2) == 1;
  it.use_bound_m = rng.below(2) == 1;
  return it;
}

// One dispatch + combine on every rank, checked against the reference. Returns this rank's verdict.
bool run_iteration(AllToAll& a2a, const AllToAllConfig& c, const Iteration& it, uint64_t seed, Failures& fail) {
  const int64_t groups = c.num_dp_groups(), num_local = c.num_local_experts(), max_recv = c.max_recv_tokens();
  const int64_t top_k = c.experts_per_token, group = c.dp_group();
  std::vector<GroupData> data;
  std::vector<reference::GroupInput> inputs;
  for (int64_t g = 0; g < groups; ++g) data.push_back(harness::make_group_data(c, uint32_t(g), it.m_per_group[g], seed));
  for (const auto& d : data) inputs.push_back(d.input());
  const GroupData& mine = data[group];
  const int64_t m = mine.m;

  cudaStream_t stream;
  EW_CUDA_CHECK(cudaStreamCreate(&stream));
  DeviceBuffer dp_x(mine.x.size()), dp_x_scale(std::max<size_t>(mine.x_scale.size(), 16)),
      indices(mine.indices.size() * 4), weights(mine.weights.size() * 4), bound_m(4);
  EW_CUDA_CHECK(cudaMemcpy(dp_x.get(), mine.x.data(), mine.x.size(), cudaMemcpyHostToDevice));
  EW_CUDA_CHECK(cudaMemcpy(dp_x_scale.get(), mine.x_scale.data(), mine.x_scale.size(), cudaMemcpyHostToDevice));
  EW_CUDA_CHECK(cudaMemcpy(indices.get(), mine.indices.data(), mine.indices.size() * 4, cudaMemcpyHostToDevice));
  EW_CUDA_CHECK(cudaMemcpy(weights.get(), mine.weights.data(), mine.weights.size() * 4, cudaMemcpyHostToDevice));
  const uint32_t m32 = uint32_t(m);
  EW_CUDA_CHECK(cudaMemcpy(bound_m.get(), &m32, 4, cudaMemcpyHostToDevice));
  const uint32_t m_arg = it.use_bound_m ? uint32_t(c.max_num_tokens) : m32;
  const uint32_t* bound_arg = it.use_bound_m ? bound_m.get<uint32_t>() : nullptr;

  const size_t x_bytes = num_local * max_recv * c.hidden_dim_bytes, s_bytes = num_local * max_recv * c.hidden_dim_scale_bytes;
  DeviceBuffer num_tokens(num_local * 4), out_x(x_bytes), out_s(std::max<size_t>(s_bytes, 16));
  EW_CUDA_CHECK(cudaMemset(num_tokens.get(), 0xff, num_local * 4));
  EW_CUDA_CHECK(cudaMemset(out_x.get(), 0xab, x_bytes));
  EW_CUDA_CHECK(cudaMemset(out_s.get(), 0xab, out_s.bytes()));

  const void* scale_in = c.hidden_dim_scale_bytes ? dp_x_scale.get() : nullptr;
  void* scale_out = c.hidden_dim_scale_bytes ? out_s.get() : nullptr;
  for (SplitMode mode : it.split ? std::vector{SplitMode::kSend, SplitMode::kRecv} : std::vector{SplitMode::kNone}) {
    a2a.dispatch(num_tokens.get<int32_t>(), out_x.get(), scale_out, dp_x.get(), scale_in, indices.get<uint32_t>(), m_arg,
                 bound_arg, mode, stream);
  }
  EW_CUDA_CHECK(cudaStreamSynchronize(stream));
  a2a.check_errors();

  // Dispatch: counts, then every row keyed by its marker and compared byte for byte.
  const std::vector<reference::ExpertInbox> expected = reference::dispatch(c, inputs);
  std::vector<int32_t> got_counts(num_local);
  std::vector<uint8_t> got_x(x_bytes), got_s(s_bytes);
  EW_CUDA_CHECK(cudaMemcpy(got_counts.data(), num_tokens.get(), num_local * 4, cudaMemcpyDeviceToHost));
  EW_CUDA_CHECK(cudaMemcpy(got_x.data(), out_x.get(), x_bytes, cudaMemcpyDeviceToHost));
  if (s_bytes) EW_CUDA_CHECK(cudaMemcpy(got_s.data(), out_s.get(), s_bytes, cudaMemcpyDeviceToHost));
  std::vector<std::vector<std::pair<uint32_t, uint32_t>>> rows_of(num_local);  // (group, token) per row
  for (int64_t le = 0; le < num_local; ++le) {
    const auto& inbox = expected[le].tokens;
    if (got_counts[le] != int32_t(inbox.size())) {
      fail.add("rank ", c.rank, " expert ", le, ": ", got_counts[le], " tokens, expected ", inbox.size());
      continue;
    }
    std::set<std::pair<uint32_t, uint32_t>> want, seen;
    for (const auto& tok : inbox) want.insert({tok.source_group, tok.token});
    for (int64_t i = 0; i < got_counts[le]; ++i) {
      const uint8_t* row = &got_x[(le * max_recv + i) * c.hidden_dim_bytes];
      uint32_t g, t;
      harness::read_marker(row, &g, &t);
      rows_of[le].push_back({g, t});
      if (!want.count({g, t}) || !seen.insert({g, t}).second) {
        fail.add("rank ", c.rank, " expert ", le, " row ", i, ": unexpected or repeated token (group ", g, ", token ", t, ")");
        continue;
      }
      if (std::memcmp(row, &data[g].x[t * c.hidden_dim_bytes], c.hidden_dim_bytes) != 0) {
        fail.add("rank ", c.rank, " expert ", le, " row ", i, ": payload of (group ", g, ", token ", t, ") differs");
      }
      if (s_bytes && std::memcmp(&got_s[(le * max_recv + i) * c.hidden_dim_scale_bytes],
                                 &data[g].x_scale[t * c.hidden_dim_scale_bytes], c.hidden_dim_scale_bytes) != 0) {
        fail.add("rank ", c.rank, " expert ", le, " row ", i, ": scales of (group ", g, ", token ", t, ") differ");
      }
    }
  }

  // The experts' outputs, in the row order dispatch produced.
  const size_t y_elems = num_local * max_recv * c.hidden_dim;
  std::vector<uint16_t> y(y_elems, 0);
  for (int64_t le = 0; le < num_local; ++le) {
    const uint32_t expert = uint32_t(c.rank * num_local + le);
    for (size_t i = 0; i < rows_of[le].size(); ++i) {
      const auto [g, t] = rows_of[le][i];
      for (int64_t h = 0; h < c.hidden_dim; ++h) {
        y[(le * max_recv + i) * c.hidden_dim + h] =
            harness::to_bits16(harness::expert_output_value(expert, g, t, uint32_t(h), it.expert_type), it.expert_type);
      }
    }
  }
  DeviceBuffer expert_y(y_elems * 2);
  EW_CUDA_CHECK(cudaMemcpy(expert_y.get(), y.data(), y_elems * 2, cudaMemcpyHostToDevice));
  const size_t out_bytes = c.max_num_tokens * c.hidden_dim * element_bytes(it.out_type);
  DeviceBuffer out(out_bytes);
  EW_CUDA_CHECK(cudaMemset(out.get(), 0xff, out_bytes));
  for (SplitMode mode : it.split ? std::vector{SplitMode::kSend, SplitMode::kRecv} : std::vector{SplitMode::kNone}) {
    a2a.combine(out.get(), it.out_type, indices.get<uint32_t>(), weights.get<float>(), expert_y.get(), it.expert_type,
                m_arg, bound_arg, mode, stream);
  }
  EW_CUDA_CHECK(cudaStreamSynchronize(stream));
  a2a.check_errors();
  EW_CUDA_CHECK(cudaStreamDestroy(stream));

  std::map<std::tuple<uint32_t, uint32_t, uint32_t>, std::vector<float>> expert_rows;
  auto expert_output = [&](uint32_t expert, uint32_t g, uint32_t t) -> const float* {
    auto& row = expert_rows[{expert, g, t}];
    if (row.empty()) {
      row.resize(c.hidden_dim);
      for (int64_t h = 0; h < c.hidden_dim; ++h) row[h] = harness::expert_output_value(expert, g, t, uint32_t(h), it.expert_type);
    }
    return row.data();
  };
  std::vector<float> want(std::max<int64_t>(m, 1) * c.hidden_dim);
  reference::combine(c, uint32_t(group), inputs[group], expert_output, want.data());
  std::vector<uint8_t> got(out_bytes);
  EW_CUDA_CHECK(cudaMemcpy(got.data(), out.get(), out_bytes, cudaMemcpyDeviceToHost));
  // fp32: FMA against separate multiply-add; 16-bit outputs: one unit in the last place after rounding.
  const float rtol = it.out_type == ScalarType::kFloat32 ? 1e-5f : it.out_type == ScalarType::kBFloat16 ? 8e-3f : 1e-3f;
  for (int64_t t = 0; t < m; ++t) {
    for (int64_t h = 0; h < c.hidden_dim; ++h) {
      const float g = read_element(got.data(), t * c.hidden_dim + h, it.out_type), w = want[t * c.hidden_dim + h];
      if (!(std::fabs(g - w) <= 1e-5f + rtol * std::fabs(w))) {
        fail.add("rank ", c.rank, " combine token ", t, " h ", h, ": got ", g, ", expected ", w);
      }
    }
  }
  for (size_t i = size_t(m) * c.hidden_dim * element_bytes(it.out_type); i < out_bytes; ++i) {
    if (got[i] != 0xff) {
      fail.add("rank ", c.rank, " combine wrote past token ", m, " (byte ", i, ")");
      break;
    }
  }
  return fail.empty();
}

int run(int argc, char** argv) {
  harness::MpiSession mpi(&argc, &argv);
  const Options options = parse_options(argc, argv);
  if (!harness::select_gpu_or_skip(mpi, "test_all_to_all")) return 0;
  harness::NvshmemSession nvshmem(mpi);
  const uint64_t seed = harness::broadcast_from_root(options.seed);
  const bool root = mpi.rank() == 0;
  int passed = 0, failed = 0;
  for (const harness::TransportKind kind : harness::transports_from_flag(options.transport)) {
    if (root) std::printf("%s (%d ranks)\n", harness::transport_title(kind), mpi.world_size());
    Rng rng(harness::mix_seed(seed, uint64_t(kind)));
    for (int ci = 0; ci < options.configs; ++ci) {
      const AllToAllConfig config = random_config(rng, ci, mpi.rank(), mpi.world_size());
      std::unique_ptr<AllToAll> a2a = harness::make_all_to_all(kind, config);
      for (int ii = 0; ii < options.iterations; ++ii) {
        const Iteration it = make_iteration(rng, config, ii);
        Failures failures;
        try {
          run_iteration(*a2a, config, it, harness::mix_seed(seed, ci, ii), failures);
        } catch (const std::exception& e) {
          failures.add("rank ", mpi.rank(), ": ", e.what());
        }
        const bool ok = harness::all_ranks(failures.empty());
        (ok ? passed : failed) += 1;
        std::ostringstream ms;
        for (auto m : it.m_per_group) ms << m << " ";
        if (root) {
          std::printf("  [%s] config %d.%d %s m=[%s] out=%s expert=%s split=%d bound_m=%d\n", ok ? " ok " : "FAIL", ci,
                      ii, describe_config(config).c_str(), ms.str().c_str(), scalar_type_name(it.out_type),
                      scalar_type_name(it.expert_type), int(it.split), int(it.use_bound_m));
        }
        if (!failures.empty()) std::printf("%s", failures.summary().c_str());
        std::fflush(stdout);
        if (!ok) break;  // a failed call may leave peers' signals half-set; start a fresh object
      }
    }
  }
  if (root) std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace
}  // namespace expertwire

int main(int argc, char** argv) {
  try {
    return expertwire::run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "test_all_to_all: %s\n", e.what());
    return 2;
  }
}
