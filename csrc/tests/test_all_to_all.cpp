// test_all_to_all: random dispatch/combine cases on N ranks, every result checked against the CPU
// reference model. Run as `mpirun -np N ./test_all_to_all [--transport T] [--seed S] [--configs C]
// [--iterations I] [--soak N [--staged]] [--fault-tolerant]`; ends with "N passed, N failed" and exits non-zero on
// any mismatch.
//   default   C random configurations per transport, I random calls on one object each; then per transport
//             each fp8 cast of the dispatch (bf16 tokens cast on the way), whole and split.
//   --soak N  N random calls (random m per DP group, sometimes through bound_m, random indices) on one object
//             per transport with a fixed mid-sized configuration: a long run that a leak, a stale signal or a
//             counter that is not reset between calls would break.
//   --staged  with --soak: every call from the caller's memory, tokens and float32 expert outputs, which the put
//             path writes into its staging rows before each put (where an ordering between the writes and the
//             put shows).
//   --fault-tolerant  every object in the fault-tolerant mode (configurations drawn with dp_size 1): each call
//             must match the reference as in the default mode and leave every rank active.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "core/cuda_utils.h"
#include "reference/fp8_blocks.h"
#include "reference/reference.h"
#include "tests/common/mpi_harness.h"
#include "tests/common/round_trip.h"
#include "tests/common/transports.h"
#include "tests/common/workload.h"

namespace expertwire {
namespace {

using harness::CallShape;
using harness::Failures;
using harness::Rng;

struct Options {
  std::string transport = "all";
  uint64_t seed = 20261125;
  int configs = 10;
  int iterations = 4;
  long soak = 0;                // > 0: run the soak instead of the random configurations
  bool staged = false;          // the soak's calls all stage their rows (see the file comment)
  bool fault_tolerant = false;  // objects in the fault-tolerant mode (dp_size 1), every rank active throughout
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
    else if (arg == "--soak") o.soak = std::stol(value());
    else if (arg == "--staged") o.staged = true;
    else if (arg == "--fault-tolerant") o.fault_tolerant = true;
    else
      EW_THROW(ConfigError, "test_all_to_all: unknown argument '", arg, "' (known: --transport T (",
               harness::kTransportFlagHelp,
               "; default all), --seed S, --configs C, "
               "--iterations I, --soak N, --staged, --fault-tolerant)");
  }
  EW_REQUIRE(o.soak >= 0, "test_all_to_all: --soak must be >= 0, got ", o.soak);
  EW_REQUIRE(!o.staged || o.soak > 0, "test_all_to_all: --staged applies to --soak N only");
  return o;
}

// A random configuration, the same on every rank (drawn from the shared seed). The first one is the
// DeepSeek-V3 shape: hidden 7168 in fp8 with 128-wide block scales; the second has top-40 of 64 experts, wider
// than a warp (the kernels take such rows in passes of 32).
AllToAllConfig random_config(Rng& rng, int index, int rank, int world, bool fault_tolerant) {
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
  if (fault_tolerant) c.dp_size = 1;  // the mode's requirement (the draw above keeps the seed's sequence)
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
  } else if (index == 1 && 64 % world == 0) {
    c.num_experts = 64;
    c.experts_per_token = 40;
  }
  return c;
}

// The soak's configuration: big enough to spread tokens over every rank and expert, small enough that the
// host side of a call (data, reference, downloads, comparison) stays short: it dominates a call's time, and grows
// with hidden and tokens. 64 experts when the world divides 64, else
// the next multiple of the world; top-8; hidden 1024 in fp8 with block scales; 32 tokens.
AllToAllConfig soak_config(int rank, int world) {
  AllToAllConfig c;
  c.rank = rank;
  c.world_size = world;
  c.num_experts = (64 + world - 1) / world * world;
  c.experts_per_token = std::min<int64_t>(8, c.num_experts);
  c.max_num_tokens = 32;
  c.hidden_dim = 1024;
  c.hidden_dim_bytes = 1024;
  c.hidden_dim_scale_bytes = 1024 / 128 * 4;
  return c;
}

std::string describe_config(const AllToAllConfig& c) {
  std::ostringstream s;
  s << "E=" << c.num_experts << " k=" << c.experts_per_token << " dp=" << c.dp_size << " T=" << c.max_num_tokens
    << " hidden=" << c.hidden_dim << "x" << c.hidden_dim_bytes / c.hidden_dim
    << "B scales=" << c.hidden_dim_scale_bytes;
  return s.str();
}

// One checked call on every rank; prints this rank's mismatches and returns whether every rank passed.
bool checked_call_on_all_ranks(AllToAll& a2a, harness::RoundTrip& trip, const AllToAllConfig& config,
                               const CallShape& shape, uint64_t seed) {
  Failures failures;
  try {
    harness::run_checked_round_trip(a2a, trip, config, shape, seed, failures);
  } catch (const std::exception& e) {
    failures.add("rank ", config.rank, ": ", e.what());
  }
  if (!failures.empty()) std::printf("%s", failures.summary().c_str());
  return harness::all_ranks(failures.empty());
}

// Whether the fault-tolerant object's mask still has every rank active (no wait gave up), on every rank.
bool every_rank_active(const AllToAll& a2a, const AllToAllConfig& config) {
  std::vector<int32_t> active(size_t(config.world_size), -1);
  EW_CUDA_CHECK(cudaDeviceSynchronize());
  EW_CUDA_CHECK(cudaMemcpy(active.data(), a2a.active_ranks(), active.size() * sizeof(int32_t), cudaMemcpyDeviceToHost));
  bool all_active = true;
  for (size_t r = 0; r < active.size(); ++r) {
    if (active[r] != 1) {
      std::printf("  rank %ld: active_ranks[%zu] = %d after a call without a failure\n", long(config.rank), r,
                  active[r]);
      all_active = false;
    }
  }
  return harness::all_ranks(all_active);
}

struct Tally {
  int passed = 0;
  int failed = 0;
  void add(bool ok) { (ok ? passed : failed) += 1; }
};

void run_random_configs(const harness::MpiSession& mpi, const Options& options, harness::TransportKind kind,
                        uint64_t seed, Tally& tally) {
  const bool root = mpi.rank() == 0;
  Rng rng(harness::mix_seed(seed, uint64_t(kind)));
  for (int ci = 0; ci < options.configs; ++ci) {
    const AllToAllConfig config = random_config(rng, ci, mpi.rank(), mpi.world_size(), options.fault_tolerant);
    std::unique_ptr<AllToAll> a2a = harness::make_all_to_all(kind, config, 0, options.fault_tolerant);
    harness::RoundTrip trip(config);
    for (int ii = 0; ii < options.iterations; ++ii) {
      const CallShape shape = harness::random_call_shape(rng, config, ii);
      bool ok = checked_call_on_all_ranks(*a2a, trip, config, shape, harness::mix_seed(seed, ci, ii));
      if (options.fault_tolerant) ok = every_rank_active(*a2a, config) && ok;
      tally.add(ok);
      if (root) {
        std::printf("  [%s] config %d.%d %s %s\n", ok ? " ok " : "FAIL", ci, ii, describe_config(config).c_str(),
                    harness::describe(shape).c_str());
      }
      std::fflush(stdout);
      if (!ok) break;  // a failed call may leave peers' signals half-set; start a fresh object
    }
  }
}

void run_soak(const harness::MpiSession& mpi, const Options& options, harness::TransportKind kind, uint64_t seed,
              Tally& tally) {
  const bool root = mpi.rank() == 0;
  const AllToAllConfig config = soak_config(mpi.rank(), mpi.world_size());
  if (root) {
    std::printf("  soak: %ld calls%s, %s\n", options.soak, options.staged ? " staging every row" : "",
                describe_config(config).c_str());
  }
  Rng rng(harness::mix_seed(seed, uint64_t(kind), 0x50a4));
  std::unique_ptr<AllToAll> a2a = harness::make_all_to_all(kind, config, 0, options.fault_tolerant);
  harness::RoundTrip trip(config);
  const Tally before = tally;
  const long report_every = std::max(1L, options.soak / 10);
  const auto start = std::chrono::steady_clock::now();
  for (long i = 0; i < options.soak; ++i) {
    CallShape shape = harness::random_call_shape(rng, config, int(std::min(i, 2L)));
    if (options.staged) {
      shape.expert_type = ScalarType::kFloat32;  // converted into a staging row, never read in place
      if (shape.out_type == ScalarType::kFloat32) shape.out_type = ScalarType::kBFloat16;
      shape.expert_y_in_buffer = CallShape::InBuffer::kNone;
      shape.dp_x_in_buffer = CallShape::InBuffer::kNone;
    }
    bool ok = checked_call_on_all_ranks(*a2a, trip, config, shape, harness::mix_seed(seed, uint64_t(kind), i));
    if (options.fault_tolerant) ok = every_rank_active(*a2a, config) && ok;
    tally.add(ok);
    if (!ok) {
      if (root) std::printf("  [FAIL] soak call %ld %s\n", i, harness::describe(shape).c_str());
      a2a.reset();  // every rank's kernels are done: the old buffers can go before the new ones are made
      a2a = harness::make_all_to_all(kind, config, 0, options.fault_tolerant);
    }
    if (root && ((i + 1) % report_every == 0 || i + 1 == options.soak)) {
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::printf("  soak %ld/%ld: %d passed, %d failed, %.1f s\n", i + 1, options.soak, tally.passed - before.passed,
                  tally.failed - before.failed, seconds);
    }
    std::fflush(stdout);
  }
}

// ---------------------------------------------------------------------------------------------------------
// The dispatch's fp8 cast (DispatchParams::cast): every rank's bf16 tokens, cast by the send, must arrive as the
// reference casts them. Rows carry no marker through a cast, so each local expert's rows are compared as a
// multiset of (payload, scale) bytes with those of the tokens that name it.

constexpr int64_t kCastHidden = 1024;
constexpr int64_t kCastTokens = 12;

struct CastTokens {
  std::vector<uint16_t> x;        // [m][kCastHidden] bf16
  std::vector<uint32_t> indices;  // [m][k]
  int64_t m = 0;
};

// A rank's tokens for one call, the same wherever they are made: values over many magnitudes, and in the first
// tokens the cast's edges (a zero block, a tiny one, 448, ties, saturation, signed zeros and NaNs).
CastTokens cast_tokens(const AllToAllConfig& c, int rank, uint64_t seed) {
  Rng rng(harness::mix_seed(seed, uint64_t(rank), 0xca57));
  CastTokens t;
  t.m = int64_t(rng.below(uint32_t(kCastTokens + 1)));
  t.x.resize(size_t(t.m * kCastHidden));
  for (int64_t i = 0; i < t.m * kCastHidden; ++i) {
    const float magnitude = std::ldexp(1.0f, int(rng.below(40)) - 20);
    t.x[size_t(i)] = reference::float_to_bf16(rng.uniform(-1.0f, 1.0f) * magnitude);
  }
  if (t.m > 0) {
    for (int64_t h = 0; h < 128; ++h) t.x[size_t(h)] = reference::float_to_bf16(0.0f);
    for (int64_t h = 128; h < 256; ++h) t.x[size_t(h)] = reference::float_to_bf16(1e-6f);
  }
  if (t.m > 1) {
    const float edges[] = {448.0f, -448.0f, 1.0625f, 1.1875f, 0.0f, -0.0f, 460.0f, NAN, -NAN};
    for (size_t i = 0; i < std::size(edges); ++i) t.x[size_t(kCastHidden) + i] = reference::float_to_bf16(edges[i]);
  }
  const int64_t k = c.experts_per_token;
  t.indices.resize(size_t(t.m * k));
  for (int64_t token = 0; token < t.m; ++token) {
    uint32_t* row = &t.indices[size_t(token * k)];
    for (int64_t j = 0; j < k; ++j) row[j] = harness::draw_new_expert(rng, row, j, uint32_t(c.num_experts));
    if (rng.below(4) == 0) row[rng.below(uint32_t(k))] = kNoExpert;
  }
  return t;
}

// The bytes a token's row carries after the reference cast: its e4m3 values, then its scales as the cast's
// configuration holds them (float32 each, or four UE8M0 bytes a word).
std::string cast_row(const CastTokens& t, int64_t token, Fp8Cast cast) {
  const int64_t blocks = kCastHidden / reference::kFp8BlockElements;
  std::vector<uint8_t> values(static_cast<size_t>(kCastHidden));
  std::vector<float> scales(static_cast<size_t>(blocks));
  reference::cast_fp8_blocks(&t.x[size_t(token * kCastHidden)], 1, kCastHidden, cast != Fp8Cast::kBlockScales,
                             values.data(), scales.data());
  std::string row(values.begin(), values.end());
  for (const float scale : scales) {
    if (cast == Fp8Cast::kUe8m0Scales) {
      row.push_back(char(reference::ue8m0_of(scale)));
    } else {
      char bytes[4];
      std::memcpy(bytes, &scale, 4);
      row.append(bytes, 4);
    }
  }
  return row;
}

AllToAllConfig cast_config(int rank, int world, Fp8Cast cast) {
  AllToAllConfig c;
  c.rank = rank;
  c.world_size = world;
  c.num_experts = 4 * world;
  c.experts_per_token = 4;
  c.max_num_tokens = kCastTokens;
  c.hidden_dim = kCastHidden;
  c.hidden_dim_bytes = kCastHidden;
  c.hidden_dim_scale_bytes = kCastHidden / (cast == Fp8Cast::kUe8m0Scales ? 512 : 128) * 4;
  return c;
}

// One cast dispatch (and the combine that must follow it) on every rank; returns whether every rank received
// exactly the reference's rows. `split`: the send and receive halves launched apart.
bool checked_cast_call(AllToAll& a2a, const AllToAllConfig& c, Fp8Cast cast, bool split, uint64_t seed) {
  const int64_t local = c.num_local_experts(), recv = c.max_recv_tokens(), k = c.experts_per_token;
  const int64_t scale_bytes = c.hidden_dim_scale_bytes;
  const CastTokens own = cast_tokens(c, int(c.rank), seed);
  DeviceBuffer x(size_t(std::max<int64_t>(own.m, 1) * kCastHidden * 2)),
      indices(size_t(std::max<int64_t>(own.m, 1) * k * 4)), counts(size_t(local * 4)),
      out_x(size_t(local * recv * kCastHidden)), out_s(size_t(local * recv * scale_bytes)),
      expert_y(size_t(local * recv * kCastHidden * 2)), out_tokens(size_t(kCastTokens * kCastHidden * 2)),
      weights(size_t(kCastTokens * k * 4));
  if (own.m > 0) {
    EW_CUDA_CHECK(cudaMemcpy(x.get(), own.x.data(), own.x.size() * 2, cudaMemcpyHostToDevice));
    EW_CUDA_CHECK(cudaMemcpy(indices.get(), own.indices.data(), own.indices.size() * 4, cudaMemcpyHostToDevice));
  }
  DispatchParams p;
  p.out_expert_num_tokens = counts.get<int32_t>();
  p.out_expert_x = out_x.get<uint8_t>();
  p.out_expert_x_scale = contiguous_matrices(out_s.get<float>(), uint64_t(recv), uint64_t(scale_bytes));
  p.dp_x = contiguous_rows(x.get<const uint8_t>(), uint64_t(kCastHidden * 2));
  p.indices = indices.get<uint32_t>();
  p.m = uint32_t(own.m);
  p.cast = cast;
  Failures failures;
  try {
    for (const SplitMode mode : split ? std::vector<SplitMode>{SplitMode::kSend, SplitMode::kRecv}
                                      : std::vector<SplitMode>{SplitMode::kNone}) {
      p.split = mode;
      a2a.dispatch(p, nullptr);
    }
    CombineParams cp;
    cp.out_tokens = out_tokens.get();
    cp.indices = p.indices;
    cp.weights = weights.get<float>();
    cp.expert_y = expert_y.get();
    cp.m = p.m;
    a2a.combine(cp, nullptr);
    EW_CUDA_CHECK(cudaDeviceSynchronize());
    a2a.check_errors();
    std::vector<int32_t> got_counts(static_cast<size_t>(local));
    std::vector<uint8_t> got_x(out_x.bytes()), got_s(out_s.bytes());
    EW_CUDA_CHECK(cudaMemcpy(got_counts.data(), counts.get(), counts.bytes(), cudaMemcpyDeviceToHost));
    EW_CUDA_CHECK(cudaMemcpy(got_x.data(), out_x.get(), out_x.bytes(), cudaMemcpyDeviceToHost));
    EW_CUDA_CHECK(cudaMemcpy(got_s.data(), out_s.get(), out_s.bytes(), cudaMemcpyDeviceToHost));
    std::vector<std::map<std::string, int>> want(static_cast<size_t>(local));
    for (int source = 0; source < c.world_size; ++source) {
      const CastTokens t = cast_tokens(c, source, seed);
      for (int64_t token = 0; token < t.m; ++token) {
        for (int64_t j = 0; j < k; ++j) {
          const int64_t le = int64_t(t.indices[size_t(token * k + j)]) - c.rank * local;
          if (t.indices[size_t(token * k + j)] != kNoExpert && le >= 0 && le < local) {
            ++want[size_t(le)][cast_row(t, token, cast)];
          }
        }
      }
    }
    for (int64_t le = 0; le < local; ++le) {
      std::map<std::string, int> got;
      for (int32_t row = 0; row < got_counts[size_t(le)] && row < recv; ++row) {
        const size_t at = size_t(le * recv + row);
        std::string bytes(reinterpret_cast<const char*>(&got_x[at * size_t(kCastHidden)]), size_t(kCastHidden));
        bytes.append(reinterpret_cast<const char*>(&got_s[at * size_t(scale_bytes)]), size_t(scale_bytes));
        ++got[bytes];
      }
      if (got != want[size_t(le)]) {
        failures.add("rank ", c.rank, " local expert ", le, ": ", got_counts[size_t(le)],
                     " rows differ from the reference cast's");
      }
    }
  } catch (const std::exception& e) {
    failures.add("rank ", c.rank, ": ", e.what());
  }
  if (!failures.empty()) std::printf("%s", failures.summary().c_str());
  return harness::all_ranks(failures.empty());
}

void run_cast_checks(const harness::MpiSession& mpi, const Options& options, harness::TransportKind kind, uint64_t seed,
                     Tally& tally) {
  const bool root = mpi.rank() == 0;
  for (const Fp8Cast cast : {Fp8Cast::kBlockScales, Fp8Cast::kPowerOfTwoScales, Fp8Cast::kUe8m0Scales}) {
    const AllToAllConfig config = cast_config(mpi.rank(), mpi.world_size(), cast);
    std::unique_ptr<AllToAll> a2a = harness::make_all_to_all(kind, config, 0, options.fault_tolerant);
    for (int call = 0; call < 2; ++call) {
      bool ok = checked_cast_call(*a2a, config, cast, call == 1, harness::mix_seed(seed, uint64_t(cast), call));
      if (options.fault_tolerant) ok = every_rank_active(*a2a, config) && ok;
      tally.add(ok);
      if (root)
        std::printf("  [%s] fp8 cast %d, call %d%s\n", ok ? " ok " : "FAIL", int(cast), call, call ? " (split)" : "");
      std::fflush(stdout);
      if (!ok) break;
    }
  }
}

int run(int argc, char** argv) {
  harness::MpiSession mpi(&argc, &argv);
  const Options options = parse_options(argc, argv);
  if (!harness::select_gpu_or_skip(mpi, "test_all_to_all")) return harness::kSkippedExitCode;
  const std::vector<harness::TransportKind> kinds = harness::transports_from_flag(options.transport);
  std::optional<harness::NvshmemSession> nvshmem;
  if (harness::needs_nvshmem(kinds)) nvshmem.emplace(mpi);
  const uint64_t seed = harness::broadcast_from_root(options.seed);
  Tally tally;
  for (const harness::TransportKind kind : kinds) {
    if (mpi.rank() == 0) std::printf("%s (%d ranks)\n", harness::transport_title(kind), mpi.world_size());
    if (options.soak > 0) {
      run_soak(mpi, options, kind, seed, tally);
    } else {
      run_random_configs(mpi, options, kind, seed, tally);
      run_cast_checks(mpi, options, kind, seed, tally);
    }
  }
  if (mpi.rank() == 0) std::printf("%d passed, %d failed\n", tally.passed, tally.failed);
  return tally.failed == 0 ? 0 : 1;
}

}  // namespace
}  // namespace expertwire

int main(int argc, char** argv) {
  return expertwire::harness::run_reporting_errors("test_all_to_all", expertwire::run, argc, argv);
}
