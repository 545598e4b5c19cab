// test_failures: how expertwire fails, on N >= 2 ranks (4 in ctest). Every case provokes one failure, asserts
// the exception's type and a fragment of its message on every rank it concerns, and shows the object (or a
// fresh one) working afterwards. Run as `mpirun -np N ./test_failures [--transport T] [--timeout-ms MS]
// [--seed S]`; prints "PASS <case>" or "FAIL <case>: <why>" per case, ends with "N passed, N failed" and
// exits non-zero on any failure.
//
// Before NVSHMEM is initialized: the internode constructor raises RuntimeError. Then, per transport:
//   host     arguments dispatch/combine refuse before launching anything (m > max_num_tokens, null and
//            misaligned pointers, an expert type that is not 16-bit, a call out of order); the same object
//            then completes a call.
//   config   configurations the constructors refuse, on every rank alike; internode: world size or rank unlike
//            NVSHMEM's, symmetric heap too small (on every rank, and on rank 0 only); intranode: force_puts, more
//            than 8 ranks, all_gather results that are not one record per rank in rank order.
//   device   input only the kernels see: an expert index >= num_experts, *bound_m > m in dispatch and in
//            combine. The rank that passed it gets DeviceError naming the value, no rank's outputs are written
//            outside their legal rows, the error is sticky, and a fresh object works.
//   timeout  the last rank skips a dispatch, then (on a new object) a combine: the others get DeviceError
//            naming the phase and that rank within the timeout + 2 s, no rank hangs, and a fresh object works.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "core/env.h"
#include "core/layout.h"
#include "expertwire/internode.h"
#include "expertwire/intranode.h"
#include "tests/common/mpi_harness.h"
#include "tests/common/round_trip.h"
#include "tests/common/transports.h"

namespace expertwire {
namespace {

using harness::CallShape;
using harness::Failures;
using harness::GroupData;
using harness::RoundTrip;
using harness::TransportKind;

struct Options {
  std::string transport = harness::kDefaultTransports;
  uint64_t timeout_ms = 1500;
  uint64_t seed = 7;
};

Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      EW_REQUIRE(i + 1 < argc, "test_failures: ", arg, " needs a value");
      return argv[++i];
    };
    if (arg == "--transport") o.transport = value();
    else if (arg == "--timeout-ms") o.timeout_ms = std::stoull(value());
    else if (arg == "--seed") o.seed = std::stoull(value());
    else
      EW_THROW(ConfigError, "test_failures: unknown argument '", arg, "' (known: --transport T (",
               harness::kTransportFlagHelp, "; default ", harness::kDefaultTransports, "), --timeout-ms MS, --seed S)");
  }
  EW_REQUIRE(o.timeout_ms > 0, "test_failures: --timeout-ms must be > 0");
  return o;
}

// What one case saw on this rank: empty when it saw what it should, else why not.
using Verdict = std::string;

Verdict joined(const Verdict& a, const Verdict& b) { return a.empty() ? b : b.empty() ? a : a + "; " + b; }
Verdict verdict_of(const Failures& failures) { return failures.empty() ? "" : "\n" + failures.summary(); }

const char* error_type_name(const std::exception& e) {
  if (dynamic_cast<const DeviceError*>(&e)) return "DeviceError";
  if (dynamic_cast<const ConfigError*>(&e)) return "ConfigError";
  if (dynamic_cast<const RuntimeError*>(&e)) return "RuntimeError";
  if (dynamic_cast<const Error*>(&e)) return "expertwire::Error";
  return "std::exception";
}

template <class T>
struct ErrorName;
template <>
struct ErrorName<ConfigError> {
  static constexpr const char* kValue = "ConfigError";
};
template <>
struct ErrorName<RuntimeError> {
  static constexpr const char* kValue = "RuntimeError";
};
template <>
struct ErrorName<DeviceError> {
  static constexpr const char* kValue = "DeviceError";
};

// Runs `action`, which must throw exactly `Expected` (the error types are siblings, so no other one passes)
// with every one of `fragments` in its message; the message goes to *message when given.
template <class Expected>
Verdict expect_error(const std::function<void()>& action, const std::vector<std::string>& fragments,
                     std::string* message = nullptr) {
  try {
    action();
  } catch (const Expected& e) {
    const std::string what = e.what();
    if (message != nullptr) *message = what;
    for (const std::string& fragment : fragments) {
      if (what.find(fragment) == std::string::npos) {
        return detail::concat(ErrorName<Expected>::kValue, " '", what, "' lacks '", fragment, "'");
      }
    }
    return {};
  } catch (const std::exception& e) {
    return detail::concat("expected ", ErrorName<Expected>::kValue, ", got ", error_type_name(e), ": ", e.what());
  }
  return detail::concat("expected ", ErrorName<Expected>::kValue, ", nothing was thrown");
}

// Runs named cases on every rank and reports each once, from rank 0.
class CaseRunner {
 public:
  explicit CaseRunner(const harness::MpiSession& mpi) : root_(mpi.rank() == 0) {}

  // `check` runs on every rank, all starting together; the case passes when every rank's verdict is empty. An
  // exception out of `check` is this rank's verdict. Collective: every rank runs the same cases in the same
  // order, and `check` itself makes no collective call, so a rank that throws leaves no peer waiting.
  void run(const std::string& name, const std::function<Verdict()>& check) {
    harness::barrier();
    Verdict verdict;
    try {
      verdict = check();
    } catch (const std::exception& e) {
      verdict = detail::concat("unexpected ", error_type_name(e), ": ", e.what());
    }
    const std::vector<std::string> verdicts = harness::all_gather_bytes(verdict);
    Verdict why;
    for (size_t rank = 0; rank < verdicts.size(); ++rank) {
      if (!verdicts[rank].empty()) why = joined(why, detail::concat("rank ", rank, ": ", verdicts[rank]));
    }
    (why.empty() ? passed_ : failed_) += 1;
    if (root_) {
      if (why.empty()) std::printf("PASS %s\n", name.c_str());
      else std::printf("FAIL %s: %s\n", name.c_str(), why.c_str());
      std::fflush(stdout);
    }
  }

  int failed() const { return failed_; }
  void print_summary() const {
    if (root_) std::printf("%d passed, %d failed\n", passed_, failed_);
  }

 private:
  bool root_;
  int passed_ = 0;
  int failed_ = 0;
};

// A small valid configuration: fp8 tokens with scales (so the scale pointers are checked too), two experts
// per rank, top-4, and always an expert that a token's row leaves out (the out-of-range-index case models its
// reference with one: with 2 ranks, top-4 of 4 experts left none).
AllToAllConfig base_config(int rank, int world) {
  AllToAllConfig c;
  c.max_num_tokens = 32;
  c.num_experts = 2 * world;
  c.experts_per_token = std::min<int64_t>(4, c.num_experts - 1);
  c.rank = rank;
  c.world_size = world;
  c.dp_size = 1;
  c.hidden_dim = 512;
  c.hidden_dim_bytes = 512;
  c.hidden_dim_scale_bytes = 512 / 128 * 4;
  return c;
}

// Every group sends m tokens; one launch per call, bfloat16 in and out.
CallShape plain_shape(const AllToAllConfig& config, int64_t m, bool use_bound_m) {
  CallShape shape;
  shape.m_per_group.assign(config.num_dp_groups(), m);
  shape.out_type = ScalarType::kBFloat16;
  shape.expert_type = ScalarType::kBFloat16;
  shape.use_bound_m = use_bound_m;
  return shape;
}

// What one transport's cases share.
struct Context {
  int rank;
  int world;
  TransportKind kind;
  AllToAllConfig config;
  uint64_t seed;
  uint64_t timeout_ns;
  std::string prefix;  // "<transport>: " before every case name
  CaseRunner& cases;

  std::unique_ptr<AllToAll> make(uint64_t timeout = 0) const { return harness::make_all_to_all(kind, config, timeout); }
  void run(const std::string& name, const std::function<Verdict()>& check) const { cases.run(prefix + name, check); }
};

// Every rank is done with the object before any rank frees it: peers must not write into freed memory.
void discard_together(std::unique_ptr<AllToAll>& a2a) {
  harness::barrier();
  a2a.reset();
}

// A random call on `a2a`, a fresh object of the configuration, checked against the reference. Making and freeing
// the object are collective steps, so they happen outside the case.
void checked_call_case(const Context& ctx, const std::string& name, uint64_t salt, std::unique_ptr<AllToAll> a2a) {
  RoundTrip trip(ctx.config);
  ctx.run(name, [&] {
    harness::Rng rng(harness::mix_seed(ctx.seed, salt));
    Failures failures;
    harness::run_checked_round_trip(*a2a, trip, ctx.config, harness::random_call_shape(rng, ctx.config, 0),
                                    harness::mix_seed(ctx.seed, salt, 1), failures);
    return verdict_of(failures);
  });
  discard_together(a2a);
}

void fresh_object_case(const Context& ctx, const std::string& name, uint64_t salt) {
  checked_call_case(ctx, name, salt, ctx.make());
}

// Ranks that would choose different protocols (rank 0 puts, its peers could pull) agree on one at construction:
// a rank pulling while another pushed would wait out its timeout.
void protocol_agreement_case(const Context& ctx) {
  AllToAllOptions options;
  options.timeout_ns = ctx.timeout_ns;
  options.force_puts = ctx.rank == 0;
  checked_call_case(ctx, "only rank 0 forces puts: every rank runs the puts protocol", 3,
                    std::make_unique<AllToAllInternode>(ctx.config, options));
}

void host_argument_cases(const Context& ctx) {
  const AllToAllConfig& config = ctx.config;
  std::unique_ptr<AllToAll> a2a = ctx.make();
  RoundTrip trip(config);
  const CallShape shape = plain_shape(config, config.max_num_tokens, false);
  const std::vector<GroupData> groups = harness::make_all_groups(config, shape, ctx.seed);
  trip.upload(groups[config.dp_group()], shape);

  const uint32_t too_many = uint32_t(config.max_num_tokens + 1);
  const std::string too_many_tail =
      detail::concat(" must be <= max_num_tokens=", config.max_num_tokens, ", got ", too_many);
  // The address `bytes` past `pointer`, as a pointer of the same type.
  auto misaligned_by = [](auto* pointer, int bytes) {
    using Pointer = decltype(pointer);
    using Byte = std::conditional_t<std::is_const_v<std::remove_pointer_t<Pointer>>, const uint8_t, uint8_t>;
    return reinterpret_cast<Pointer>(reinterpret_cast<Byte*>(pointer) + bytes);
  };
  auto misaligned = [&](auto* pointer) { return misaligned_by(pointer, 8); };

  struct DispatchCase {
    const char* name;
    std::function<void(DispatchParams&)> spoil;
    std::string message;
  };
  const DispatchCase dispatch_cases[] = {
      {"dispatch with m > max_num_tokens", [&](DispatchParams& a) { a.m = too_many; }, "dispatch: m" + too_many_tail},
      {"dispatch with null dp_x", [](DispatchParams& a) { a.dp_x.data = nullptr; }, "dispatch: dp_x must not be null"},
      {"dispatch with null dp_x_scale (scales configured)", [](DispatchParams& a) { a.dp_x_scale.data = nullptr; },
       "dispatch: dp_x_scale must not be null"},
      {"dispatch with null indices", [](DispatchParams& a) { a.indices = nullptr; },
       "dispatch: indices must not be null"},
      {"dispatch with null out_expert_num_tokens", [](DispatchParams& a) { a.out_expert_num_tokens = nullptr; },
       "dispatch: out_expert_num_tokens must not be null"},
      {"dispatch with null out_expert_x", [](DispatchParams& a) { a.out_expert_x = nullptr; },
       "dispatch: out_expert_x must not be null"},
      {"dispatch with misaligned dp_x", [&](DispatchParams& a) { a.dp_x.data = misaligned(a.dp_x.data); },
       "dispatch: dp_x must be 16-byte aligned"},
      {"dispatch with misaligned out_expert_x", [&](DispatchParams& a) { a.out_expert_x = misaligned(a.out_expert_x); },
       "dispatch: out_expert_x must be 16-byte aligned"},
      {"dispatch with misaligned dp_x_scale",
       [&](DispatchParams& a) { a.dp_x_scale.data = misaligned_by(a.dp_x_scale.data, 2); },
       "dispatch: dp_x_scale must be 4-byte aligned"},
      {"dispatch with misaligned out_expert_x_scale",
       [&](DispatchParams& a) { a.out_expert_x_scale.data = misaligned_by(a.out_expert_x_scale.data, 2); },
       "dispatch: out_expert_x_scale must be 4-byte aligned"},
      {"dispatch with a dp_x_scale word stride of 2 bytes", [](DispatchParams& a) { a.dp_x_scale.element_stride = 2; },
       "dispatch: dp_x_scale: word stride must be a multiple of 4 bytes, got 2"},
      {"dispatch with an out_expert_x_scale row stride of 6 bytes",
       [](DispatchParams& a) { a.out_expert_x_scale.row_stride = 6; },
       "dispatch: out_expert_x_scale: row stride must be a multiple of 4 bytes, got 6"},
      {"dispatch with dp_x rows 8 bytes apart", [](DispatchParams& a) { a.dp_x.row_stride = 8; },
       detail::concat("dispatch: dp_x's rows must lie a multiple of 16 bytes apart, at least hidden_dim_bytes=",
                      config.hidden_dim_bytes, ", got a row stride of 8 bytes")},
      // Staging such an input would overwrite rows it has yet to read.
      {"dispatch with dp_x one row into dispatch_input_buffer()",
       [&](DispatchParams& a) {
         const Strided2D<uint8_t> rows = a2a->dispatch_input_buffer();
         a.dp_x = Strided2D<const uint8_t>{rows.data + rows.row_stride, rows.row_stride, 1};
       },
       "dispatch: dp_x overlaps the rows the dispatch stages tokens in without being dispatch_input_buffer() in its "
       "layout"},
      {"dispatch with dp_x_scale column-major in dispatch_input_scale_buffer()",
       [&](DispatchParams& a) {
         const Strided2D<float> scales = a2a->dispatch_input_scale_buffer();
         a.dp_x_scale = Strided2D<const float>{scales.data, 4, scales.row_stride};
       },
       "dispatch: dp_x_scale overlaps the rows the dispatch stages tokens in without being "
       "dispatch_input_scale_buffer() in its layout"},
  };
  for (const DispatchCase& c : dispatch_cases) {
    ctx.run(detail::concat("host: ", c.name), [&] {
      DispatchParams args = trip.dispatch_arguments(shape);
      c.spoil(args);
      return expect_error<ConfigError>([&] { harness::call_dispatch(*a2a, args, SplitMode::kNone, trip.stream()); },
                                       {c.message});
    });
  }

  struct CombineCase {
    const char* name;
    std::function<void(CombineParams&)> spoil;
    std::string message;
  };
  const CombineCase combine_cases[] = {
      {"combine with m > max_num_tokens", [&](CombineParams& a) { a.m = too_many; }, "combine: m" + too_many_tail},
      {"combine with float32 expert_y and float32 out_tokens",
       [](CombineParams& a) {
         a.expert_type = ScalarType::kFloat32;
         a.out_type = ScalarType::kFloat32;
       },
       "combine: a float32 expert_y needs bfloat16 or float16 out_tokens (its rows travel as that type), got float32 "
       "out_tokens"},
      {"combine with float32 expert_y in expert_output_buffer()",
       [&](CombineParams& a) {
         a.expert_type = ScalarType::kFloat32;
         a.expert_y = a2a->expert_output_buffer();
       },
       "combine: expert_output_buffer() holds 16-bit rows; a float32 expert_y must be the caller's own"},
      {"combine with null expert_y", [](CombineParams& a) { a.expert_y = nullptr; },
       "combine: expert_y must not be null"},
      {"combine with null out_tokens", [](CombineParams& a) { a.out_tokens = nullptr; },
       "combine: out_tokens must not be null"},
      {"combine with misaligned out_tokens", [&](CombineParams& a) { a.out_tokens = misaligned(a.out_tokens); },
       "combine: out_tokens must be 16-byte aligned"},
      {"combine with null indices", [](CombineParams& a) { a.indices = nullptr; }, "combine: indices must not be null"},
      {"combine with null weights", [](CombineParams& a) { a.weights = nullptr; }, "combine: weights must not be null"},
      {"combine with misaligned weights",
       [&](CombineParams& a) { a.weights = reinterpret_cast<const float*>(misaligned_by(a.weights, 2)); },
       "combine: weights must be 4-byte aligned"},
  };
  for (const CombineCase& c : combine_cases) {
    ctx.run(detail::concat("host: ", c.name), [&] {
      CombineParams args = trip.combine_arguments(shape);
      c.spoil(args);
      return expect_error<ConfigError>([&] { harness::call_combine(*a2a, args, SplitMode::kNone, trip.stream()); },
                                       {c.message});
    });
  }

  ctx.run("host: combine before any dispatch", [&] {
    return expect_error<ConfigError>(
        [&] { harness::call_combine(*a2a, trip.combine_arguments(shape), SplitMode::kNone, trip.stream()); },
        {"combine out of order: a dispatch (do_send) comes next"});
  });
  ctx.run("host: a second dispatch before the first one's combine", [&] {
    trip.dispatch(*a2a, shape);
    const Verdict verdict = expect_error<ConfigError>(
        [&] { harness::call_dispatch(*a2a, trip.dispatch_arguments(shape), SplitMode::kNone, trip.stream()); },
        {"dispatch out of order: the combine of the last dispatch comes next"});
    trip.combine(*a2a, shape);
    return verdict;
  });

  // Host errors are raised before anything is launched: they leave the object as it was.
  ctx.run("host: the object still works after host errors", [&] {
    Failures failures;
    harness::run_checked_round_trip(*a2a, trip, config, shape, ctx.seed, failures);
    return verdict_of(failures);
  });
  discard_together(a2a);
}

// Each configuration below is refused in the constructors' rank agreement, before anything peers share is
// allocated: every rank throws, its own error where its own check failed, and nothing is left half-built.
void config_cases(const Context& ctx) {
  const AllToAllConfig& good = ctx.config;
  const int64_t world = good.world_size;
  struct ConfigCase {
    const char* name;
    std::function<void(AllToAllConfig&)> spoil;
    std::string message;
  };
  const ConfigCase cases[] = {
      {"num_experts not divisible by world_size", [&](AllToAllConfig& c) { c.num_experts = 2 * world + 1; },
       detail::concat("AllToAllConfig.num_experts must be divisible by world_size=", world, ", got ", 2 * world + 1)},
      {"experts_per_token > num_experts", [](AllToAllConfig& c) { c.experts_per_token = c.num_experts + 1; },
       detail::concat("AllToAllConfig.experts_per_token must be <= num_experts=", good.num_experts)},
      {"dp_size does not divide world_size", [&](AllToAllConfig& c) { c.dp_size = world + 1; },
       detail::concat("AllToAllConfig.world_size must be divisible by dp_size=", world + 1)},
      {"hidden_dim_bytes not a multiple of 16", [](AllToAllConfig& c) { c.hidden_dim_bytes = 520; },
       "AllToAllConfig.hidden_dim_bytes must be a multiple of 16"},
      {"rank out of range", [&](AllToAllConfig& c) { c.rank = world; },
       detail::concat("AllToAllConfig.rank must be in [0, world_size=", world, "), got ", world)},
      {"max_num_tokens = 0", [](AllToAllConfig& c) { c.max_num_tokens = 0; },
       "AllToAllConfig.max_num_tokens must be > 0, got 0"},
  };
  for (const ConfigCase& c : cases) {
    ctx.run(detail::concat("config: ", c.name), [&] {
      AllToAllConfig bad = good;
      c.spoil(bad);
      return expect_error<ConfigError>([&] { harness::make_all_to_all(ctx.kind, bad); }, {c.message});
    });
  }

  // An invalid configuration on one rank only stops every rank: the others must not wait in the next collective.
  ctx.run("config: max_num_tokens = 0 on rank 0 only", [&] {
    AllToAllConfig mine = good;
    if (ctx.rank == 0) mine.max_num_tokens = 0;
    return expect_error<ConfigError>(
        [&] { harness::make_all_to_all(ctx.kind, mine); },
        {ctx.rank == 0 ? "AllToAllConfig.max_num_tokens must be > 0, got 0"
                       : "rank 0 could not construct its all-to-all (its own error says why)"});
  });

  // Ranks whose layouts differ at the same buffer size: 12 bytes of scales pad to the 16 of the others.
  ctx.run("config: hidden_dim_scale_bytes on rank 0 unlike the others'", [&] {
    AllToAllConfig mine = good;
    if (ctx.rank == 0) mine.hidden_dim_scale_bytes = 12;
    return expect_error<ConfigError>(
        [&] { harness::make_all_to_all(ctx.kind, mine); },
        {detail::concat("ranks disagree on hidden_dim_scale_bytes: rank 0 has 12, rank 1 has ",
                        good.hidden_dim_scale_bytes, "; every rank must construct its all-to-all alike")});
  });

  if (ctx.kind != TransportKind::kIntranode) {
    // A check that fails on one rank only stops every rank: the others must not wait in NVSHMEM's next collective.
    ctx.run("config: symmetric heap too small on rank 0 only", [&] {
      const char* heap = std::getenv("NVSHMEM_SYMMETRIC_SIZE");
      const std::string saved = heap != nullptr ? heap : "";
      if (ctx.rank == 0) setenv("NVSHMEM_SYMMETRIC_SIZE", "1M", 1);
      const Verdict verdict = expect_error<ConfigError>(
          [&] { harness::make_all_to_all(ctx.kind, good); },
          {ctx.rank == 0 ? "symmetric heap too small"
                         : "internode: rank 0 could not construct its all-to-all (its own error says why)"});
      if (heap != nullptr) setenv("NVSHMEM_SYMMETRIC_SIZE", saved.c_str(), 1);
      else unsetenv("NVSHMEM_SYMMETRIC_SIZE");
      return verdict;
    });
    ctx.run("config: world_size unlike NVSHMEM's", [&] {
      AllToAllConfig bad = good;
      bad.world_size = 2 * world;
      bad.num_experts = 2 * bad.world_size;
      return expect_error<ConfigError>(
          [&] { harness::make_all_to_all(ctx.kind, bad); },
          {detail::concat("world_size must equal NVSHMEM's ", world, " ranks, got ", 2 * world)});
    });
    ctx.run("config: rank unlike NVSHMEM's", [&] {
      AllToAllConfig bad = good;
      bad.rank = (good.rank + 1) % world;
      return expect_error<ConfigError>(
          [&] { harness::make_all_to_all(ctx.kind, bad); },
          {detail::concat("rank must equal this process's NVSHMEM rank ", good.rank, ", got ", bad.rank)});
    });
    ctx.run("config: symmetric heap too small", [&] {
      // Bf16 tokens of 8192 elements, and tokens doubled until the buffers outgrow NVSHMEM_SYMMETRIC_SIZE.
      AllToAllConfig big = good;
      big.hidden_dim = 8192;
      big.hidden_dim_bytes = 2 * 8192;
      big.hidden_dim_scale_bytes = 0;
      const uint64_t heap = symmetric_heap_bytes_from_env();
      while (make_buffer_layout(big, 0).symmetric_bytes <= heap) big.max_num_tokens *= 2;
      return expect_error<ConfigError>([&] { harness::make_all_to_all(ctx.kind, big); },
                                       {"symmetric heap too small", "set NVSHMEM_SYMMETRIC_SIZE>="});
    });
    return;
  }

  ctx.run("config: force_puts on an intranode all-to-all", [&] {
    AllToAllOptions options;
    options.force_puts = true;
    return expect_error<ConfigError>([&] { AllToAllIntranode a2a(good, harness::all_gather_bytes, options); },
                                     {"intranode: AllToAllOptions.force_puts must be false"});
  });
  ctx.run("config: more than 8 intranode ranks", [&] {
    AllToAllConfig bad = good;
    bad.world_size = 16;
    bad.num_experts = 32;
    return expect_error<ConfigError>([&] { harness::make_all_to_all(ctx.kind, bad); },
                                     {"intranode: world_size must be 1..8", "got 16"});
  });
  // Fake all_gather functions: each returns without talking to the other ranks, so a rank that throws
  // leaves no peer waiting.
  struct GatherCase {
    const char* name;
    AllGatherBytes all_gather;
    std::string message;
  };
  const GatherCase gather_cases[] = {
      {"no all_gather function", AllGatherBytes{}, "intranode: an all_gather function is required"},
      {"all_gather returns one entry", [](const std::string& local) { return std::vector<std::string>{local}; },
       detail::concat("intranode: all_gather returned 1 entries, expected world_size=", world)},
      {"all_gather returns bytes that are no buffer description",
       [&](const std::string&) { return std::vector<std::string>(world, "not a buffer description"); },
       "bytes of agreement record, expected"},
      {"all_gather out of rank order", [&](const std::string& local) { return std::vector<std::string>(world, local); },
       "of all_gather is not rank"},
  };
  for (const GatherCase& c : gather_cases) {
    ctx.run(detail::concat("config: ", c.name),
            [&] { return expect_error<ConfigError>([&] { AllToAllIntranode a2a(good, c.all_gather); }, {c.message}); });
  }
}

// The inboxes the kernels produce when indices[token][k] of `group` is out of range: that entry sends nothing,
// the token's other experts still get it. The reference refuses out-of-range indices, so `stand_in` (a copy
// of the groups that must outlive the result) gets a valid unused expert there instead, whose copy of the
// token is then taken out.
std::vector<reference::ExpertInbox> inboxes_without_entry(const AllToAllConfig& config,
                                                          std::vector<GroupData>& stand_in, uint32_t group,
                                                          uint32_t token, uint32_t k) {
  uint32_t* row = &stand_in[group].indices[token * config.experts_per_token];
  uint32_t expert = 0;
  while (std::find(row, row + config.experts_per_token, expert) != row + config.experts_per_token) ++expert;
  row[k] = expert;
  std::vector<reference::ExpertInbox> inboxes = harness::reference_inboxes(config, stand_in);
  if (int64_t(expert) / config.num_local_experts() == config.rank) {
    auto& tokens = inboxes[expert % config.num_local_experts()].tokens;
    tokens.erase(
        std::remove_if(tokens.begin(), tokens.end(),
                       [&](const reference::ReceivedToken& t) { return t.source_group == group && t.token == token; }),
        tokens.end());
  }
  return inboxes;
}

// A case on a fresh object whose dispatch is good: every rank uploads its tokens of `shape` (drawn from `seed`),
// dispatches and checks what arrived; then `combine_check(a2a, shape, own tokens, failures)` makes this rank's
// combine and returns its verdict, joined with the failures.
using CombineCheck = std::function<Verdict(AllToAll&, const CallShape&, const GroupData&, Failures&)>;
void combine_case(const Context& ctx, RoundTrip& trip, const CallShape& shape, uint64_t seed, const std::string& name,
                  const CombineCheck& combine_check) {
  const std::vector<GroupData> groups = harness::make_all_groups(ctx.config, shape, seed);
  const GroupData& own = groups[ctx.config.dp_group()];
  trip.upload(own, shape);
  std::unique_ptr<AllToAll> a2a = ctx.make();
  ctx.run(name, [&] {
    Failures failures;
    trip.dispatch(*a2a, shape);
    trip.check_dispatch(shape, harness::reference_inboxes(ctx.config, groups), failures);
    const Verdict verdict = combine_check(*a2a, shape, own, failures);
    return joined(verdict, verdict_of(failures));
  });
  discard_together(a2a);
}

void device_input_cases(const Context& ctx) {
  const AllToAllConfig& config = ctx.config;
  const int bad_rank = 1;  // dp_size 1: rank r sends group r's tokens
  const uint32_t top_k = uint32_t(config.experts_per_token);
  const uint32_t bad_bound_m = uint32_t(config.max_num_tokens + 1);
  RoundTrip trip(config);

  // An expert index >= num_experts in token 0 of the bad rank.
  {
    const CallShape shape = plain_shape(config, config.max_num_tokens / 2, false);
    std::vector<GroupData> sent = harness::make_all_groups(config, shape, ctx.seed + 1);
    std::vector<GroupData> stand_in = sent;
    const std::vector<reference::ExpertInbox> expected =
        inboxes_without_entry(config, stand_in, bad_rank, 0, top_k - 1);
    const uint32_t bad_expert = uint32_t(config.num_experts + 3);
    sent[bad_rank].indices[top_k - 1] = bad_expert;
    trip.upload(sent[config.dp_group()], shape);
    std::unique_ptr<AllToAll> a2a = ctx.make();
    std::string original;
    ctx.run("device: expert index >= num_experts", [&] {
      Verdict verdict;
      if (ctx.rank == bad_rank) {
        verdict = expect_error<DeviceError>([&] { trip.dispatch(*a2a, shape); },
                                            {detail::concat("expert index ", bad_expert, " out of range"),
                                             detail::concat("in dispatch send on rank ", bad_rank)},
                                            &original);
      } else {
        trip.dispatch(*a2a, shape);
      }
      Failures failures;
      trip.check_dispatch(shape, expected, failures);
      return joined(verdict, verdict_of(failures));
    });
    ctx.run("device: the error is sticky (later calls raise the original error)", [&] {
      if (ctx.rank != bad_rank) return Verdict{};
      if (original.empty()) return Verdict{"no original error to compare with"};
      return joined(expect_error<DeviceError>([&] { trip.combine(*a2a, shape); }, {original}),
                    expect_error<DeviceError>([&] { trip.dispatch(*a2a, shape); }, {original}));
    });
    discard_together(a2a);
  }
  fresh_object_case(ctx, "device: a fresh object works after a device error", 1);

  // int64 indices that no expert stands for: a negative value other than -1, 2^32 - 1 (kNoExpert if truncated to
  // 32 bits), and one whose low word alone would name a valid expert.
  for (const int64_t bad : {int64_t(-2), (int64_t(1) << 32) - 1, (int64_t(1) << 32) + 1}) {
    CallShape shape = plain_shape(config, config.max_num_tokens / 2, false);
    shape.int64_indices = true;
    const std::vector<GroupData> sent = harness::make_all_groups(config, shape, ctx.seed + 6);
    std::vector<GroupData> stand_in = sent;
    const std::vector<reference::ExpertInbox> expected =
        inboxes_without_entry(config, stand_in, bad_rank, 0, top_k - 1);
    trip.upload(sent[config.dp_group()], shape);
    if (ctx.rank == bad_rank) trip.set_int64_index(0, top_k - 1, bad);
    std::unique_ptr<AllToAll> a2a = ctx.make();
    ctx.run(detail::concat("device: int64 expert index ", bad), [&] {
      Verdict verdict;
      if (ctx.rank == bad_rank) {
        verdict = expect_error<DeviceError>([&] { trip.dispatch(*a2a, shape); },
                                            {detail::concat("expert index ", bad, " out of range"),
                                             detail::concat("in dispatch send on rank ", bad_rank)});
      } else {
        trip.dispatch(*a2a, shape);
      }
      Failures failures;
      trip.check_dispatch(shape, expected, failures);
      return joined(verdict, verdict_of(failures));
    });
    discard_together(a2a);
  }

  // *bound_m > m in dispatch: the bad rank sends nothing, the others see an empty group from it.
  {
    const CallShape shape = plain_shape(config, config.max_num_tokens, true);
    const std::vector<GroupData> sent = harness::make_all_groups(config, shape, ctx.seed + 2);
    std::vector<GroupData> received = sent;
    received[bad_rank].m = 0;
    trip.upload(sent[config.dp_group()], shape);
    if (ctx.rank == bad_rank) trip.set_device_bound_m(bad_bound_m);
    std::unique_ptr<AllToAll> a2a = ctx.make();
    ctx.run("device: bound_m > m in dispatch", [&] {
      Verdict verdict;
      if (ctx.rank == bad_rank) {
        verdict =
            expect_error<DeviceError>([&] { trip.dispatch(*a2a, shape); },
                                      {detail::concat("bound_m = ", bad_bound_m, " exceeds m"), "in dispatch send"});
      } else {
        trip.dispatch(*a2a, shape);
      }
      Failures failures;
      trip.check_dispatch(shape, harness::reference_inboxes(config, received), failures);
      return joined(verdict, verdict_of(failures));
    });
    discard_together(a2a);
  }

  // *bound_m > m in combine: the bad rank writes no output row, the others combine as usual.
  combine_case(
      ctx, trip, plain_shape(config, config.max_num_tokens, true), ctx.seed + 3, "device: bound_m > m in combine",
      [&](AllToAll& a2a, const CallShape& shape, const GroupData& own, Failures& failures) {
        if (ctx.rank != bad_rank) {
          trip.combine(a2a, shape);
          trip.check_combine(own, shape, failures);
          return Verdict{};
        }
        trip.set_device_bound_m(bad_bound_m);
        const Verdict verdict =
            expect_error<DeviceError>([&] { trip.combine(a2a, shape); },
                                      {detail::concat("bound_m = ", bad_bound_m, " exceeds m"), "in combine receive"});
        trip.check_combine_wrote_nothing(failures);
        return verdict;
      });

  // A float16 expert_y on the bad rank, bfloat16 on the others: no rank sums rows of a type it does not sum,
  // every rank raises, and none writes an output row.
  combine_case(ctx, trip, plain_shape(config, config.max_num_tokens, false), ctx.seed + 5,
               "device: float16 expert_y on one rank, bfloat16 on the others",
               [&](AllToAll& a2a, const CallShape& shape, const GroupData&, Failures& failures) {
                 CallShape mine = shape;
                 if (ctx.rank == bad_rank) mine.expert_type = ScalarType::kFloat16;
                 const std::string mismatch =
                     ctx.rank == bad_rank ? std::string("'s expert rows travel as bfloat16, this rank's as float16")
                                          : detail::concat("rank ", bad_rank,
                                                           "'s expert rows travel as float16, this rank's as bfloat16");
                 const Verdict verdict = expect_error<DeviceError>(
                     [&] { trip.combine(a2a, mine); }, {mismatch, "no output written", "in combine receive"});
                 trip.check_combine_wrote_nothing(failures);
                 return verdict;
               });
}

// The last rank skips one operation; the others must time out on it, quickly and with a useful message.
// The skipping rank launches nothing, so it cannot hang; signals the others left in its buffer die with the
// object, and the next object's buffers start zeroed.
void timeout_cases(const Context& ctx) {
  const AllToAllConfig& config = ctx.config;
  const int skipper = ctx.world - 1;
  const double limit_s = double(ctx.timeout_ns) / 1e9 + 2.0;
  const std::string waiting = detail::concat("waiting for rank ", skipper);
  const CallShape shape = plain_shape(config, config.max_num_tokens / 2, false);
  const std::vector<GroupData> groups = harness::make_all_groups(config, shape, ctx.seed + 4);
  RoundTrip trip(config);
  trip.upload(groups[config.dp_group()], shape);

  // Runs `call` on this rank, expecting the timeout on `phase` within the limit. Returns the message.
  auto expect_timeout = [&](const std::function<void()>& call, const char* phase, std::string* message) {
    const auto start = std::chrono::steady_clock::now();
    Verdict verdict = expect_error<DeviceError>(call, {"timed out", waiting, phase}, message);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (seconds > limit_s) {
      verdict = joined(verdict, detail::concat("the error came after ", seconds,
                                               " s, more than the timeout + 2 s = ", limit_s, " s"));
    }
    return verdict;
  };

  {
    std::unique_ptr<AllToAll> a2a = ctx.make(ctx.timeout_ns);
    ctx.run(detail::concat("timeout: rank ", skipper, " skips a dispatch"), [&] {
      if (ctx.rank == skipper) return Verdict{};
      std::string message;
      const Verdict verdict = expect_timeout([&] { trip.dispatch(*a2a, shape); }, "in dispatch receive", &message);
      // The timed-out object refuses every later call with the original error.
      return joined(verdict, expect_error<DeviceError>([&] { trip.combine(*a2a, shape); }, {message}));
    });
    discard_together(a2a);
  }
  {
    std::unique_ptr<AllToAll> a2a = ctx.make(ctx.timeout_ns);
    ctx.run("timeout: every rank dispatches before the skipped combine", [&] {
      Failures failures;
      trip.dispatch(*a2a, shape);
      trip.check_dispatch(shape, harness::reference_inboxes(config, groups), failures);
      return verdict_of(failures);
    });
    ctx.run(detail::concat("timeout: rank ", skipper, " skips a combine"), [&] {
      if (ctx.rank == skipper) return Verdict{};
      return expect_timeout([&] { trip.combine(*a2a, shape); }, "in combine receive", nullptr);
    });
    discard_together(a2a);
  }
  fresh_object_case(ctx, "timeout: a fresh object works after the timeouts", 2);
}

int run(int argc, char** argv) {
  harness::MpiSession mpi(&argc, &argv);
  const Options options = parse_options(argc, argv);
  if (!harness::select_gpu_or_skip(mpi, "test_failures")) return harness::kSkippedExitCode;
  EW_REQUIRE(mpi.world_size() >= 2, "test_failures needs at least 2 ranks (a peer to time out on), got ",
             mpi.world_size());
  const std::vector<TransportKind> kinds = harness::transports_from_flag(options.transport);
  const AllToAllConfig config = base_config(mpi.rank(), mpi.world_size());
  CaseRunner cases(mpi);

  std::optional<harness::NvshmemSession> nvshmem;
  if (harness::needs_nvshmem(kinds)) {
    cases.run("internode: constructor before NVSHMEM is initialized", [&] {
      return expect_error<RuntimeError>([&] { AllToAllInternode a2a(config); }, {"NVSHMEM is not initialized"});
    });
    nvshmem.emplace(mpi);
  }
  const uint64_t seed = harness::broadcast_from_root(options.seed);

  for (const TransportKind kind : kinds) {
    if (mpi.rank() == 0) std::printf("%s (%d ranks)\n", harness::transport_title(kind), mpi.world_size());
    const Context ctx{mpi.rank(),
                      mpi.world_size(),
                      kind,
                      config,
                      harness::mix_seed(seed, uint64_t(kind)),
                      options.timeout_ms * 1'000'000ull,
                      detail::concat(harness::transport_flag_name(kind), ": "),
                      cases};
    host_argument_cases(ctx);
    if (kind == TransportKind::kInternode) protocol_agreement_case(ctx);
    config_cases(ctx);
    device_input_cases(ctx);
    timeout_cases(ctx);
  }
  cases.print_summary();
  return cases.failed() == 0 ? 0 : 1;
}

}  // namespace
}  // namespace expertwire

int main(int argc, char** argv) {
  return expertwire::harness::run_reporting_errors("test_failures", expertwire::run, argc, argv);
}
