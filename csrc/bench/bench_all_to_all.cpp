// bench_all_to_all: dispatch and combine latency on N ranks, `mpirun -np N ./bench_all_to_all [flags]`.
//
// Every rank moves exactly --tokens tokens (no random 1..N draw). Each timed operation starts after a
// barrier on the stream, so all ranks begin together, and is followed by one; CUDA events time it on every
// rank and the slowest rank's time is what counts. A second table times a back-to-back loop with no barriers.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "core/cuda_utils.h"
#include "expertwire/nvshmem.h"
#include "expertwire/params.h"
#include "tests/common/cuda_events.h"
#include "tests/common/flags.h"
#include "tests/common/mpi_harness.h"
#include "tests/common/transports.h"
#include "tests/common/workload.h"

namespace expertwire {
namespace {

using harness::Events;
using harness::parse_count;
using harness::parse_list;

struct Options {
  std::vector<int64_t> tokens = {1, 32, 128};
  std::vector<int64_t> experts = {64, 256};
  int64_t top_k = 8;
  int64_t hidden = 7168;
  int64_t dp_size = 1;  // consecutive ranks that hold the same tokens
  int warmup = 10;
  int iterations = 50;
  std::string transport = harness::kDefaultTransports;
  std::string json;
  bool fault_tolerant = false;  // objects in the fault-tolerant mode (AllToAllOptions::fault_tolerant)
};

Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      EW_REQUIRE(i + 1 < argc, arg, " needs a value");
      return argv[++i];
    };
    if (arg == "--tokens") o.tokens = parse_list(arg, value());
    else if (arg == "--experts") o.experts = parse_list(arg, value());
    else if (arg == "--top-k") o.top_k = parse_count(arg, value());
    else if (arg == "--hidden") o.hidden = parse_count(arg, value());
    else if (arg == "--dp-size") o.dp_size = parse_count(arg, value());
    else if (arg == "--warmup") o.warmup = int(parse_count(arg, value(), 0));
    else if (arg == "--iters") o.iterations = int(parse_count(arg, value()));
    else if (arg == "--transport") o.transport = value();
    else if (arg == "--json") o.json = value();
    else if (arg == "--fault-tolerant") o.fault_tolerant = true;
    else
      EW_THROW(ConfigError, "unknown argument '", arg,
               "' (known: --tokens 1,32,128 --experts 64,256 --top-k 8 --hidden 7168 --dp-size 1 --warmup 10 "
               "--iters 50 --transport T --json FILE --fault-tolerant; T: ",
               harness::kTransportFlagHelp, ", default ", harness::kDefaultTransports, ")");
  }
  return o;
}

struct Stats {
  double mean = 0, std = 0, median = 0;
};

Stats stats_of(std::vector<double> values) {
  Stats s;
  if (values.empty()) return s;
  for (double v : values) s.mean += v;
  s.mean /= double(values.size());
  for (double v : values) s.std += (v - s.mean) * (v - s.mean);
  s.std = std::sqrt(s.std / double(values.size()));
  std::sort(values.begin(), values.end());
  s.median = values[values.size() / 2];
  return s;
}

// Element-wise maximum over ranks: the slowest rank of each iteration.
std::vector<double> slowest_rank(std::vector<double> values) {
  MPI_Allreduce(MPI_IN_PLACE, values.data(), int(values.size()), MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return values;
}

struct CaseResult {
  int64_t tokens, experts;
  Stats dispatch, dispatch_send, dispatch_recv, combine, combine_send, combine_recv;
  Stats combine_in_buffer;   // expert_y is the object's expert_output_buffer(): no copy of the rows on send
  Stats dispatch_in_buffer;  // dp_x and dp_x_scale in the dispatch input buffers: the pull dispatch stages headers
  Stats loop_dispatch, loop_combine;
  double dispatch_bytes, combine_bytes;  // bytes this rank sends
  // Bandwidth floor: the bytes that must move for this rank, copied device-to-device by every rank at once.
  double dispatch_floor_bytes, combine_floor_bytes;
  Stats dispatch_floor, combine_floor;
  // Latency floor: one cross-rank barrier (nvshmem_barrier_on_stream), timed like the operations. Every
  // dispatch and combine waits on its peers at least once.
  Stats barrier;
};

// Bytes that must move for this rank's tokens. Dispatch: each token once to each distinct rank that owns
// one of its experts (payload + scales), plus one count per expert; with DP groups, this rank serves the owners
// of its dp_rank, the group's other ranks the rest. Combine: one expert-output row back per (token, valid k):
// rows cannot be summed before they reach the token's rank, which alone has the weights (every rank of a DP
// group outputs all of the group's tokens).
std::pair<double, double> floor_bytes(const AllToAllConfig& c, const harness::GroupData& data) {
  const int64_t top_k = c.experts_per_token, num_local = c.num_local_experts();
  double dispatch = double(c.num_experts) * sizeof(uint32_t), combine = 0;
  for (int64_t t = 0; t < data.m; ++t) {
    std::vector<bool> seen(size_t(c.world_size), false);
    for (int64_t k = 0; k < top_k; ++k) {
      const uint32_t expert = data.indices[size_t(t * top_k + k)];
      const int64_t owner = expert / num_local;
      if (!seen[size_t(owner)] && owner % c.dp_size == c.dp_rank()) {
        dispatch += double(c.hidden_dim_bytes + c.hidden_dim_scale_bytes);
      }
      seen[size_t(owner)] = true;
      combine += double(c.hidden_dim) * 2;
    }
  }
  return {dispatch, combine};
}

CaseResult run_case(harness::TransportKind kind, const Options& o, int64_t tokens, int64_t experts, int rank,
                    int world) {
  AllToAllConfig c;
  c.max_num_tokens = tokens;
  c.num_experts = experts;
  c.experts_per_token = o.top_k;
  c.rank = rank;
  c.world_size = world;
  c.dp_size = o.dp_size;
  c.hidden_dim = o.hidden;
  c.hidden_dim_bytes = o.hidden;                          // fp8 e4m3
  c.hidden_dim_scale_bytes = (o.hidden + 127) / 128 * 4;  // one fp32 scale per 128-wide block
  std::unique_ptr<AllToAll> a2a = harness::make_all_to_all(kind, c, 0, o.fault_tolerant);
  if (rank == 0 && tokens == o.tokens.front() && experts == o.experts.front()) {
    std::printf("%s: launch %u blocks x %u threads per rank\n", harness::transport_title(kind),
                a2a->launch_shape().blocks, a2a->launch_shape().threads);
  }

  // The ranks of a DP group hold the same tokens.
  const harness::GroupData data =
      harness::make_group_data(c, uint32_t(c.dp_group()), tokens, 1234 + uint64_t(c.dp_group()));
  const int64_t num_local = c.num_local_experts(), max_recv = c.max_recv_tokens();
  DeviceBuffer dp_x(data.x.size()), dp_x_scale(data.x_scale.size()), indices(data.indices.size() * 4),
      weights(data.weights.size() * 4);
  EW_CUDA_CHECK(cudaMemcpy(dp_x.get(), data.x.data(), data.x.size(), cudaMemcpyHostToDevice));
  EW_CUDA_CHECK(cudaMemcpy(dp_x_scale.get(), data.x_scale.data(), data.x_scale.size(), cudaMemcpyHostToDevice));
  EW_CUDA_CHECK(cudaMemcpy(indices.get(), data.indices.data(), data.indices.size() * 4, cudaMemcpyHostToDevice));
  EW_CUDA_CHECK(cudaMemcpy(weights.get(), data.weights.data(), data.weights.size() * 4, cudaMemcpyHostToDevice));
  DeviceBuffer num_tokens(num_local * 4), out_x(num_local * max_recv * c.hidden_dim_bytes),
      out_s(num_local * max_recv * c.hidden_dim_scale_bytes), expert_y(num_local * max_recv * c.hidden_dim * 2),
      out(tokens * c.hidden_dim * 2);

  cudaStream_t stream;
  EW_CUDA_CHECK(cudaStreamCreate(&stream));
  const uint32_t m = uint32_t(tokens);
  DispatchParams dispatch_params;
  dispatch_params.out_expert_num_tokens = num_tokens.get<int32_t>();
  dispatch_params.out_expert_x = out_x.get<uint8_t>();
  dispatch_params.out_expert_x_scale =
      contiguous_matrices(out_s.get<float>(), uint64_t(max_recv), c.hidden_dim_scale_bytes);
  dispatch_params.dp_x = contiguous_rows(dp_x.get<const uint8_t>(), c.hidden_dim_bytes);
  dispatch_params.dp_x_scale = contiguous_rows(dp_x_scale.get<const float>(), c.hidden_dim_scale_bytes);
  dispatch_params.indices = indices.get<uint32_t>();
  dispatch_params.m = m;
  auto dispatch = [&](SplitMode mode) {
    dispatch_params.split = mode;
    a2a->dispatch(dispatch_params, stream);
  };
  // The same tokens written into the object's dispatch input buffers, as a caller's quantization could. They stay
  // valid: the other dispatches of this case stage these very tokens at the same place.
  const Strided2D<uint8_t> input_rows = a2a->dispatch_input_buffer();
  const Strided2D<float> input_scales = a2a->dispatch_input_scale_buffer();
  EW_CUDA_CHECK(cudaMemcpy2D(input_rows.data, input_rows.row_stride, dp_x.get(), c.hidden_dim_bytes, c.hidden_dim_bytes,
                             m, cudaMemcpyDeviceToDevice));
  if (c.hidden_dim_scale_bytes != 0) {
    EW_CUDA_CHECK(cudaMemcpy2D(input_scales.data, input_scales.row_stride, dp_x_scale.get(), c.hidden_dim_scale_bytes,
                               c.hidden_dim_scale_bytes, m, cudaMemcpyDeviceToDevice));
  }
  DispatchParams in_buffer_params = dispatch_params;
  in_buffer_params.split = SplitMode::kNone;
  in_buffer_params.dp_x = read_only(input_rows);
  in_buffer_params.dp_x_scale = read_only(input_scales);
  auto dispatch_in_buffer = [&] { a2a->dispatch(in_buffer_params, stream); };
  CombineParams combine_params;
  combine_params.out_tokens = out.get();
  combine_params.out_type = ScalarType::kBFloat16;
  combine_params.indices = indices.get<uint32_t>();
  combine_params.weights = weights.get<float>();
  combine_params.expert_type = ScalarType::kBFloat16;
  combine_params.m = m;
  auto combine_from = [&](const void* y, SplitMode mode) {
    combine_params.expert_y = y;
    combine_params.split = mode;
    a2a->combine(combine_params, stream);
  };
  auto combine = [&](SplitMode mode) { combine_from(expert_y.get(), mode); };
  EW_CUDA_CHECK(cudaMemcpy(a2a->expert_output_buffer(), expert_y.get(), expert_y.bytes(), cudaMemcpyDeviceToDevice));

  // Barrier before each timed operation.
  const int n = o.iterations;
  std::vector<double> d(n), ds(n), dr(n), cb(n), cs(n), cr(n), cz(n);
  Events ev(12);
  for (int i = -o.warmup; i < n; ++i) {
    nvshmem_barrier_on_stream(stream);
    ev.record(0, stream);
    dispatch(SplitMode::kNone);
    ev.record(1, stream);
    nvshmem_barrier_on_stream(stream);
    ev.record(2, stream);
    combine(SplitMode::kNone);
    ev.record(3, stream);
    nvshmem_barrier_on_stream(stream);
    ev.record(4, stream);
    dispatch(SplitMode::kSend);
    ev.record(5, stream);
    dispatch(SplitMode::kRecv);
    ev.record(6, stream);
    nvshmem_barrier_on_stream(stream);
    ev.record(7, stream);
    combine(SplitMode::kSend);
    ev.record(8, stream);
    combine(SplitMode::kRecv);
    ev.record(9, stream);
    nvshmem_barrier_on_stream(stream);
    dispatch(SplitMode::kNone);
    nvshmem_barrier_on_stream(stream);
    ev.record(10, stream);
    combine_from(a2a->expert_output_buffer(), SplitMode::kNone);
    ev.record(11, stream);
    // Every timed operation is followed by a barrier, as the others are by the next one's: while the slowest
    // rank finishes, the others' barrier kernels already run on the GPU they share. Without it the in-buffer
    // combine read faster than under the conditions of the other columns (docs/performance.md).
    nvshmem_barrier_on_stream(stream);
    EW_CUDA_CHECK(cudaStreamSynchronize(stream));
    a2a->check_errors();
    if (i < 0) continue;
    d[i] = ev.micros(0, 1);
    cb[i] = ev.micros(2, 3);
    ds[i] = ev.micros(4, 5);
    dr[i] = ev.micros(5, 6);
    cs[i] = ev.micros(7, 8);
    cr[i] = ev.micros(8, 9);
    cz[i] = ev.micros(10, 11);
  }

  // The dispatch from the input buffers, in the dispatch column's place: an iteration's first operation after
  // the host has synchronized. The place moves the time (docs/performance.md), so both are timed first.
  std::vector<double> dz(n);
  for (int i = -o.warmup; i < n; ++i) {
    nvshmem_barrier_on_stream(stream);
    ev.record(0, stream);
    dispatch_in_buffer();
    ev.record(1, stream);
    nvshmem_barrier_on_stream(stream);
    combine(SplitMode::kNone);
    nvshmem_barrier_on_stream(stream);
    EW_CUDA_CHECK(cudaStreamSynchronize(stream));
    a2a->check_errors();
    if (i >= 0) dz[i] = ev.micros(0, 1);
  }

  // Back to back: no barriers, events between operations.
  std::vector<double> ld(n), lc(n);
  {
    Events loop(2 * size_t(n) + 1);
    nvshmem_barrier_on_stream(stream);
    loop.record(0, stream);
    for (int i = 0; i < n; ++i) {
      dispatch(SplitMode::kNone);
      loop.record(2 * i + 1, stream);
      combine(SplitMode::kNone);
      loop.record(2 * i + 2, stream);
    }
    EW_CUDA_CHECK(cudaStreamSynchronize(stream));
    a2a->check_errors();
    for (int i = 0; i < n; ++i) {
      ld[i] = loop.micros(2 * i, 2 * i + 1);
      lc[i] = loop.micros(2 * i + 1, 2 * i + 2);
    }
  }
  // The floor, timed like the operations: barrier, then every rank copies its bytes at the same time.
  const auto [dispatch_floor_bytes, combine_floor_bytes] = floor_bytes(c, data);
  std::vector<double> fd(n), fc(n), fb(n);
  {
    const size_t copy_bytes = size_t(std::max(dispatch_floor_bytes, combine_floor_bytes));
    DeviceBuffer copy_src(copy_bytes), copy_dst(copy_bytes);
    auto copy = [&](double bytes) {
      EW_CUDA_CHECK(cudaMemcpyAsync(copy_dst.get(), copy_src.get(), size_t(bytes), cudaMemcpyDeviceToDevice, stream));
    };
    Events floor_events(6);
    for (int i = -o.warmup; i < n; ++i) {
      nvshmem_barrier_on_stream(stream);
      floor_events.record(0, stream);
      copy(dispatch_floor_bytes);
      floor_events.record(1, stream);
      nvshmem_barrier_on_stream(stream);
      floor_events.record(2, stream);
      copy(combine_floor_bytes);
      floor_events.record(3, stream);
      nvshmem_barrier_on_stream(stream);
      floor_events.record(4, stream);
      nvshmem_barrier_on_stream(stream);
      floor_events.record(5, stream);
      EW_CUDA_CHECK(cudaStreamSynchronize(stream));
      if (i < 0) continue;
      fd[i] = floor_events.micros(0, 1);
      fc[i] = floor_events.micros(2, 3);
      fb[i] = floor_events.micros(4, 5);
    }
  }
  EW_CUDA_CHECK(cudaStreamDestroy(stream));

  CaseResult r;
  r.tokens = tokens;
  r.experts = experts;
  r.dispatch = stats_of(slowest_rank(d));
  r.dispatch_send = stats_of(slowest_rank(ds));
  r.dispatch_recv = stats_of(slowest_rank(dr));
  r.combine = stats_of(slowest_rank(cb));
  r.combine_send = stats_of(slowest_rank(cs));
  r.combine_recv = stats_of(slowest_rank(cr));
  r.combine_in_buffer = stats_of(slowest_rank(cz));
  r.dispatch_in_buffer = stats_of(slowest_rank(dz));
  r.loop_dispatch = stats_of(slowest_rank(ld));
  r.loop_combine = stats_of(slowest_rank(lc));
  r.dispatch_bytes = double(tokens * o.top_k) * double(c.hidden_dim_bytes + c.hidden_dim_scale_bytes);
  r.combine_bytes = double(tokens * o.top_k) * double(c.hidden_dim * 2);
  r.dispatch_floor_bytes = dispatch_floor_bytes;
  r.combine_floor_bytes = combine_floor_bytes;
  r.dispatch_floor = stats_of(slowest_rank(fd));
  r.combine_floor = stats_of(slowest_rank(fc));
  r.barrier = stats_of(slowest_rank(fb));
  return r;
}

std::string cell(const Stats& s) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%7.1f ± %5.1f (%6.1f)", s.mean, s.std, s.median);
  return buf;
}

void print_tables(const char* title, int world, const std::vector<CaseResult>& results, const Options& o) {
  std::printf("\n%s, %d ranks (DP size %lld), hidden %lld, top-k %lld, fp8 dispatch (+%lld B scales), bf16 combine%s\n",
              title, world, (long long)o.dp_size, (long long)o.hidden, (long long)o.top_k,
              (long long)((o.hidden + 127) / 128 * 4), o.fault_tolerant ? ", fault-tolerant mode" : "");
  std::printf("Barrier before each operation; slowest rank; µs mean ± std (median):\n");
  std::printf(
      "| tokens | experts | dispatch | send half | recv half | GB/s | combine | send half | recv half | GB/s "
      "| combine, expert_y in buffer | dispatch, dp_x in buffer |\n");
  std::printf("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const auto& r : results) {
    std::printf("| %lld | %lld | %s | %s | %s | %.1f | %s | %s | %s | %.1f | %s | %s |\n", (long long)r.tokens,
                (long long)r.experts, cell(r.dispatch).c_str(), cell(r.dispatch_send).c_str(),
                cell(r.dispatch_recv).c_str(), r.dispatch_bytes / r.dispatch.mean / 1e3, cell(r.combine).c_str(),
                cell(r.combine_send).c_str(), cell(r.combine_recv).c_str(), r.combine_bytes / r.combine.mean / 1e3,
                cell(r.combine_in_buffer).c_str(), cell(r.dispatch_in_buffer).c_str());
  }
  std::printf("Back-to-back loop, no barriers; slowest rank; µs mean ± std (median):\n");
  std::printf("| tokens | experts | dispatch | combine |\n|---:|---:|---:|---:|\n");
  for (const auto& r : results) {
    std::printf("| %lld | %lld | %s | %s |\n", (long long)r.tokens, (long long)r.experts, cell(r.loop_dispatch).c_str(),
                cell(r.loop_combine).c_str());
  }
  std::printf(
      "Bandwidth floor: this rank's bytes that must move, copied device-to-device by all ranks at once "
      "(slowest rank, mean µs); time / floor; latency floor: one cross-rank barrier, timed the same way:\n");
  std::printf(
      "| tokens | experts | dispatch MB | floor | dispatch / floor | combine MB | floor | combine / floor "
      "| barrier |\n");
  std::printf("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const auto& r : results) {
    std::printf("| %lld | %lld | %.2f | %.1f | %.2fx | %.2f | %.1f | %.2fx | %.1f |\n", (long long)r.tokens,
                (long long)r.experts, r.dispatch_floor_bytes / 1e6, r.dispatch_floor.mean,
                r.dispatch.mean / r.dispatch_floor.mean, r.combine_floor_bytes / 1e6, r.combine_floor.mean,
                r.combine.mean / r.combine_floor.mean, r.barrier.mean);
  }
  std::fflush(stdout);
}

void write_json(const std::string& path, int world, int64_t dp_size, bool fault_tolerant,
                const std::vector<std::pair<std::string, CaseResult>>& all) {
  std::ofstream out(path);
  EW_REQUIRE(out.good(), "cannot write --json file '", path, "'");
  auto stats = [](const Stats& s) {
    std::ostringstream o;
    o << "{\"mean_us\": " << s.mean << ", \"std_us\": " << s.std << ", \"median_us\": " << s.median << "}";
    return o.str();
  };
  out << "[\n";
  for (size_t i = 0; i < all.size(); ++i) {
    const auto& [transport, r] = all[i];
    out << "  {\"transport\": \"" << transport << "\", \"ranks\": " << world << ", \"dp_size\": " << dp_size
        << ", \"fault_tolerant\": " << (fault_tolerant ? "true" : "false") << ", \"tokens\": " << r.tokens
        << ", \"experts\": " << r.experts << ", \"dispatch\": " << stats(r.dispatch)
        << ", \"dispatch_send\": " << stats(r.dispatch_send) << ", \"dispatch_recv\": " << stats(r.dispatch_recv)
        << ", \"combine\": " << stats(r.combine) << ", \"combine_send\": " << stats(r.combine_send)
        << ", \"combine_recv\": " << stats(r.combine_recv) << ", \"combine_in_buffer\": " << stats(r.combine_in_buffer)
        << ", \"dispatch_in_buffer\": " << stats(r.dispatch_in_buffer)
        << ", \"loop_dispatch\": " << stats(r.loop_dispatch) << ", \"loop_combine\": " << stats(r.loop_combine)
        << ", \"dispatch_bytes_per_rank\": " << r.dispatch_bytes << ", \"combine_bytes_per_rank\": " << r.combine_bytes
        << ", \"dispatch_floor_bytes_per_rank\": " << r.dispatch_floor_bytes
        << ", \"combine_floor_bytes_per_rank\": " << r.combine_floor_bytes
        << ", \"dispatch_floor\": " << stats(r.dispatch_floor) << ", \"combine_floor\": " << stats(r.combine_floor)
        << ", \"barrier\": " << stats(r.barrier) << "}" << (i + 1 < all.size() ? "," : "") << "\n";
  }
  out << "]\n";
}

int run(int argc, char** argv) {
  harness::MpiSession mpi(&argc, &argv);
  const Options o = parse_options(argc, argv);
  if (!harness::select_gpu_or_skip(mpi, "bench_all_to_all")) return harness::kSkippedExitCode;
  harness::NvshmemSession nvshmem(mpi);
  std::vector<std::pair<std::string, CaseResult>> all;
  for (const harness::TransportKind kind : harness::transports_from_flag(o.transport)) {
    std::vector<CaseResult> results;
    for (int64_t experts : o.experts) {
      for (int64_t tokens : o.tokens) {
        results.push_back(run_case(kind, o, tokens, experts, mpi.rank(), mpi.world_size()));
        all.push_back({harness::transport_title(kind), results.back()});
      }
    }
    if (mpi.rank() == 0) print_tables(harness::transport_title(kind), mpi.world_size(), results, o);
  }
  if (mpi.rank() == 0 && !o.json.empty()) write_json(o.json, mpi.world_size(), o.dp_size, o.fault_tolerant, all);
  return 0;
}

}  // namespace
}  // namespace expertwire

int main(int argc, char** argv) {
  return expertwire::harness::run_reporting_errors("bench_all_to_all", expertwire::run, argc, argv);
}
