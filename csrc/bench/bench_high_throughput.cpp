// bench_high_throughput: the high-throughput dispatch and combine on N ranks, `mpirun -np N ./bench_high_throughput
// [flags]`.
//
// Every rank moves exactly --tokens tokens, routed uniformly at random to top-k distinct experts. Outputs are sized
// once by the exact counts; the timed dispatch then runs both halves with no host synchronization (the CUDA-graph
// form). Each timed operation starts after a barrier on the stream and is followed by one; CUDA events time it on
// every rank and the slowest rank's time counts (mean and median over iterations). A back-to-back loop runs with no
// barriers. The floor is measured in the same run: every rank copies, device to device and all at once, the bytes it
// receives. GB/s = bytes a rank receives / time, as DeepEP counts them.
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
#include "core/error.h"
#include "expertwire/high_throughput.h"
#include "expertwire/nvshmem.h"
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
  std::vector<int64_t> tokens = {512, 1024, 2048, 4096, 8192};
  int64_t experts = 256;
  int64_t top_k = 8;
  int64_t hidden = 7168;
  int64_t alignment = 128;  // of the expert-contiguous layout
  int warmup = 3;
  int iterations = 20;
  std::string transport = harness::kDefaultTransports;
  std::string layouts = "rank-packed,expert-contiguous";
  std::string json;
  bool fault_tolerant = false;  // objects in the fault-tolerant mode (AllToAllOptions::fault_tolerant)
};

Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--fault-tolerant") {
      o.fault_tolerant = true;
      continue;
    }
    EW_REQUIRE(i + 1 < argc, "bench_high_throughput: ", arg, " needs a value");
    const std::string value = argv[++i];
    if (arg == "--tokens") o.tokens = parse_list(arg, value);
    else if (arg == "--experts") o.experts = parse_count(arg, value);
    else if (arg == "--top-k") o.top_k = parse_count(arg, value);
    else if (arg == "--hidden") o.hidden = parse_count(arg, value);
    else if (arg == "--alignment") o.alignment = parse_count(arg, value);
    else if (arg == "--warmup") o.warmup = int(parse_count(arg, value));
    else if (arg == "--iters") o.iterations = int(parse_count(arg, value));
    else if (arg == "--transport") o.transport = value;
    else if (arg == "--layouts") o.layouts = value;
    else if (arg == "--json") o.json = value;
    else {
      EW_THROW(ConfigError, "bench_high_throughput: unknown flag ", arg,
               "; flags: --tokens 512,1024 --experts 256 --top-k 8 --hidden 7168 --alignment 128 --warmup 3 "
               "--iters 20 --transport T --layouts rank-packed,expert-contiguous --json FILE --fault-tolerant");
    }
  }
  return o;
}

struct Stats {
  double mean = 0, median = 0;
};

// The slowest rank of each iteration, then mean and median over iterations.
Stats slowest(std::vector<double> values) {
  MPI_Allreduce(MPI_IN_PLACE, values.data(), int(values.size()), MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  Stats s;
  for (double v : values) s.mean += v;
  s.mean /= double(values.size());
  std::sort(values.begin(), values.end());
  s.median = values[values.size() / 2];
  return s;
}

double mean_over_ranks(double value) {
  MPI_Allreduce(MPI_IN_PLACE, &value, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  int world = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  return value / world;
}

struct Result {
  int64_t tokens = 0;
  std::string layout;
  double recv_rows = 0, recv_bytes = 0, combine_bytes = 0;  // mean over ranks
  Stats dispatch, dispatch_staged, exchange, data, combine, combine_in_buffer, dispatch_floor, combine_floor,
      loop_dispatch, loop_combine;
  double memory_mb = 0, padded_mb = 0;
};

Result run_case(const harness::MpiSession& mpi, harness::TransportKind kind, const Options& o, int64_t tokens,
                HighThroughputLayout layout) {
  const int rank = mpi.rank(), world = mpi.world_size();
  HighThroughputConfig config;
  config.max_num_tokens = tokens;
  config.num_experts = o.experts;
  config.experts_per_token = o.top_k;
  config.rank = rank;
  config.world_size = world;
  config.hidden_dim = o.hidden;
  config.hidden_dim_bytes = o.hidden;  // fp8
  config.hidden_dim_scale_bytes = o.hidden / 128 * 4;
  config.expert_alignment = layout == HighThroughputLayout::kExpertContiguous ? o.alignment : 1;
  AllToAllOptions options;
  options.fault_tolerant = o.fault_tolerant;
  std::unique_ptr<HighThroughputAllToAll> object;
  if (kind == harness::TransportKind::kIntranode) {
    object = std::make_unique<HighThroughputIntranode>(config, harness::all_gather_bytes, options);
  } else {
    options.force_puts = kind == harness::TransportKind::kInternodePuts;
    object = std::make_unique<HighThroughputInternode>(config, options);
  }
  const int64_t k = o.top_k, bytes = config.hidden_dim_bytes, sbytes = config.hidden_dim_scale_bytes;
  const int64_t local = config.num_local_experts();

  // Tokens: random payload and scales, top-k distinct experts uniformly at random.
  harness::Rng rng(harness::mix_seed(99, uint64_t(rank), uint64_t(tokens)));
  std::vector<uint8_t> x(tokens * bytes), scale(tokens * sbytes);
  std::vector<int64_t> topk(tokens * k);
  std::vector<float> weights(tokens * k);
  for (auto& b : x) b = uint8_t(rng.next());
  for (int64_t i = 0; i < tokens * sbytes / 4; ++i) reinterpret_cast<float*>(scale.data())[i] = 1.0f;
  int64_t send_rows = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    uint64_t ranks = 0;
    for (int64_t j = 0; j < k; ++j) {
      int64_t e;
      do {
        e = rng.below(uint32_t(o.experts));
      } while (std::find(&topk[t * k], &topk[t * k] + j, e) != &topk[t * k] + j);
      topk[t * k + j] = e;
      weights[t * k + j] = rng.uniform(0.0f, 1.0f);
      ranks |= 1ull << (e / local);
    }
    send_rows += __builtin_popcountll(ranks);
  }
  DeviceBuffer x_dev(x.size()), scale_dev(scale.size()), topk_dev(topk.size() * 8), weights_dev(weights.size() * 4);
  EW_CUDA_CHECK(cudaMemcpy(x_dev.get(), x.data(), x.size(), cudaMemcpyHostToDevice));
  EW_CUDA_CHECK(cudaMemcpy(scale_dev.get(), scale.data(), scale.size(), cudaMemcpyHostToDevice));
  EW_CUDA_CHECK(cudaMemcpy(topk_dev.get(), topk.data(), topk.size() * 8, cudaMemcpyHostToDevice));
  EW_CUDA_CHECK(cudaMemcpy(weights_dev.get(), weights.data(), weights.size() * 4, cudaMemcpyHostToDevice));
  HighThroughputDispatchInputs in;
  in.m = uint32_t(tokens);
  in.x = Strided2D<const uint8_t>{x_dev.get<uint8_t>(), uint64_t(bytes), 1};
  in.x_scale = Strided2D<const float>{scale_dev.get<float>(), uint64_t(sbytes), 4};
  in.topk_idx = topk_dev.get<void>();
  in.topk_weights = weights_dev.get<float>();
  HighThroughputDispatchInputs staged = in;
  const Strided2D<uint8_t> x_buffer = object->dispatch_input_buffer();
  const Strided2D<float> scale_buffer = object->dispatch_input_scale_buffer();
  EW_CUDA_CHECK(
      cudaMemcpy2D(x_buffer.data, x_buffer.row_stride, x_dev.get(), bytes, bytes, tokens, cudaMemcpyDeviceToDevice));
  EW_CUDA_CHECK(cudaMemcpy2D(scale_buffer.data, scale_buffer.row_stride, scale_dev.get(), sbytes, sbytes, tokens,
                             cudaMemcpyDeviceToDevice));
  staged.x = read_only(x_buffer);
  staged.x_scale = read_only(scale_buffer);

  cudaStream_t stream;
  EW_CUDA_CHECK(cudaStreamCreate(&stream));
  auto handle = object->make_handle();
  // Sized once by the exact counts.
  object->dispatch_layout(in, layout, *handle, stream);
  const HighThroughputCounts counts = object->counts(*handle, stream);
  const bool packed = layout == HighThroughputLayout::kRankPacked;
  const uint64_t rows = uint64_t(packed ? counts.num_recv_tokens : counts.num_expert_rows);
  const uint64_t combine_row_bytes = uint64_t(o.hidden) * 2;
  DeviceBuffer recv_x(std::max<uint64_t>(rows, 1) * bytes), recv_scale(std::max<uint64_t>(rows, 1) * sbytes),
      recv_idx(std::max<uint64_t>(rows, 1) * k * 8), recv_w(std::max<uint64_t>(rows, 1) * k * 4),
      row_expert(std::max<uint64_t>(rows, 1) * 4), row_weight(std::max<uint64_t>(rows, 1) * 4),
      expert_out(std::max<uint64_t>(rows, 1) * combine_row_bytes),
      out(std::max<int64_t>(tokens, 1) * combine_row_bytes);
  HighThroughputDispatchOutputs outputs;
  outputs.layout = layout;
  outputs.capacity_rows = rows;
  outputs.recv_x = recv_x.get<uint8_t>();
  outputs.recv_x_scale = Strided2D<float>{recv_scale.get<float>(), uint64_t(sbytes), 4};
  outputs.recv_topk_idx = recv_idx.get<int64_t>();
  outputs.recv_topk_weights = recv_w.get<float>();
  outputs.row_expert = row_expert.get<int32_t>();
  outputs.row_weight = row_weight.get<float>();
  object->dispatch_data(in, *handle, outputs, stream);
  HighThroughputCombineParams combine;
  combine.expert_out = expert_out.get<void>();
  combine.out = out.get<void>();
  HighThroughputCombineParams combine_in_buffer = combine;
  combine_in_buffer.expert_out = object->combine_input_buffer();
  object->combine(combine, *handle, stream);

  const int n = o.iterations;
  // Timed operations in one iteration, each after a barrier on the stream: its sample is times[op][iteration].
  enum TimedOp { kDispatch, kCombine, kDispatchStaged, kCombineInBuffer, kExchange, kRows, kTimedOps };
  std::vector<std::vector<double>> times(kTimedOps, std::vector<double>(n));
  Events ev(2 * kTimedOps);
  auto timed = [&](TimedOp op, auto&& call) {
    nvshmem_barrier_on_stream(stream);
    ev.record(2 * op, stream);
    call();
    ev.record(2 * op + 1, stream);
  };
  for (int i = -o.warmup; i < n; ++i) {
    timed(kDispatch, [&] { object->dispatch(in, *handle, outputs, stream); });
    timed(kCombine, [&] { object->combine(combine, *handle, stream); });
    timed(kDispatchStaged, [&] { object->dispatch(staged, *handle, outputs, stream); });
    timed(kCombineInBuffer, [&] { object->combine(packed ? combine_in_buffer : combine, *handle, stream); });
    // The dispatch's halves apart: the count exchange, then the rows.
    timed(kExchange, [&] { object->dispatch_layout(in, layout, *handle, stream); });
    timed(kRows, [&] { object->dispatch_data(in, *handle, outputs, stream); });
    nvshmem_barrier_on_stream(stream);
    object->combine(combine, *handle, stream);  // calls alternate
    nvshmem_barrier_on_stream(stream);
    EW_CUDA_CHECK(cudaStreamSynchronize(stream));
    object->check_errors();
    if (i < 0) continue;
    for (int op = 0; op < kTimedOps; ++op) times[op][i] = ev.micros(2 * op, 2 * op + 1);
  }
  std::vector<double> ld(n), lc(n);
  {
    Events loop(2 * size_t(n) + 1);
    nvshmem_barrier_on_stream(stream);
    loop.record(0, stream);
    for (int i = 0; i < n; ++i) {
      object->dispatch(in, *handle, outputs, stream);
      loop.record(2 * i + 1, stream);
      object->combine(combine, *handle, stream);
      loop.record(2 * i + 2, stream);
    }
    EW_CUDA_CHECK(cudaStreamSynchronize(stream));
    object->check_errors();
    for (int i = 0; i < n; ++i) {
      ld[i] = loop.micros(2 * i, 2 * i + 1);
      lc[i] = loop.micros(2 * i + 1, 2 * i + 2);
    }
  }
  // The floor: the bytes this rank receives, copied device to device by every rank at once.
  const double recv_bytes = double(counts.num_recv_tokens) * double(bytes + sbytes);
  const double combine_bytes = double(send_rows) * double(combine_row_bytes);
  std::vector<double> fd(n), fc(n);
  {
    const size_t copy = size_t(std::max(recv_bytes, combine_bytes));
    DeviceBuffer from(std::max<size_t>(copy, 16)), to(std::max<size_t>(copy, 16));
    for (int i = -o.warmup; i < n; ++i) {
      nvshmem_barrier_on_stream(stream);
      ev.record(0, stream);
      EW_CUDA_CHECK(cudaMemcpyAsync(to.get(), from.get(), size_t(recv_bytes), cudaMemcpyDeviceToDevice, stream));
      ev.record(1, stream);
      nvshmem_barrier_on_stream(stream);
      ev.record(2, stream);
      EW_CUDA_CHECK(cudaMemcpyAsync(to.get(), from.get(), size_t(combine_bytes), cudaMemcpyDeviceToDevice, stream));
      ev.record(3, stream);
      nvshmem_barrier_on_stream(stream);
      EW_CUDA_CHECK(cudaStreamSynchronize(stream));
      if (i < 0) continue;
      fd[i] = ev.micros(0, 1);
      fc[i] = ev.micros(2, 3);
    }
  }
  EW_CUDA_CHECK(cudaStreamDestroy(stream));

  Result r;
  r.tokens = tokens;
  r.layout = packed ? "rank-packed" : "expert-contiguous";
  r.recv_rows = mean_over_ranks(double(rows));
  r.recv_bytes = mean_over_ranks(recv_bytes);
  r.combine_bytes = mean_over_ranks(combine_bytes);
  r.dispatch = slowest(times[kDispatch]);
  r.dispatch_staged = slowest(times[kDispatchStaged]);
  r.exchange = slowest(times[kExchange]);
  r.data = slowest(times[kRows]);
  r.combine = slowest(times[kCombine]);
  // Expert-contiguous rows are the caller's own (the combine input buffer holds rank-packed rows): no such case.
  if (packed) r.combine_in_buffer = slowest(times[kCombineInBuffer]);
  r.loop_dispatch = slowest(ld);
  r.loop_combine = slowest(lc);
  r.dispatch_floor = slowest(fd);
  r.combine_floor = slowest(fc);
  const double outputs_bytes = double(rows) * double(bytes + sbytes + (packed ? k * 12 : 8) + combine_row_bytes);
  r.memory_mb = mean_over_ranks(double(object->symmetric_bytes()) + outputs_bytes) / 1e6;
  // The low-latency layout: every local expert gets tokens * world padded rows, fp8 in and bf16 out.
  r.padded_mb = double(local) * double(tokens * world) * double(bytes + sbytes + combine_row_bytes) / 1e6;
  return r;
}

int run(int argc, char** argv) {
  harness::MpiSession mpi(&argc, &argv);
  const Options o = parse_options(argc, argv);
  if (!harness::select_gpu_or_skip(mpi, "bench_high_throughput")) return harness::kSkippedExitCode;
  const std::vector<harness::TransportKind> kinds = harness::transports_from_flag(o.transport);
  harness::NvshmemSession nvshmem(mpi);  // nvshmem_barrier_on_stream times every transport alike
  std::vector<HighThroughputLayout> layouts;
  std::stringstream names(o.layouts);
  for (std::string name; std::getline(names, name, ',');) {
    if (name == "rank-packed") layouts.push_back(HighThroughputLayout::kRankPacked);
    else if (name == "expert-contiguous") layouts.push_back(HighThroughputLayout::kExpertContiguous);
    else EW_THROW(ConfigError, "--layouts: unknown layout '", name, "' (rank-packed, expert-contiguous)");
  }
  std::ostringstream json;
  json << "[";
  bool first = true;
  for (const auto kind : kinds) {
    if (mpi.rank() == 0) {
      std::printf("\n%s, %d ranks, hidden %lld, top-%lld of %lld experts, fp8 + scales dispatch, bf16 combine%s\n",
                  harness::transport_title(kind), mpi.world_size(), (long long)o.hidden, (long long)o.top_k,
                  (long long)o.experts, o.fault_tolerant ? ", fault-tolerant mode" : "");
      std::printf(
          "| tokens | layout | rows | dispatch µs mean / median | staged x | exchange / rows | GB/s | floor µs | / "
          "floor "
          "| combine µs mean / median | in buffer | GB/s | floor µs | / floor | loop d / c µs | MB per rank | padded "
          "MB "
          "|\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    }
    for (const int64_t tokens : o.tokens) {
      for (const auto layout : layouts) {
        const Result r = run_case(mpi, kind, o, tokens, layout);
        if (mpi.rank() != 0) continue;
        char in_buffer[32] = "—";
        if (r.combine_in_buffer.mean > 0) std::snprintf(in_buffer, sizeof(in_buffer), "%.1f", r.combine_in_buffer.mean);
        std::printf(
            "| %lld | %s | %.0f | %.1f / %.1f | %.1f | %.1f / %.1f | %.0f | %.1f | %.2f | %.1f / %.1f | %s | %.0f | "
            "%.1f | %.2f | %.1f / %.1f | %.0f | %.0f |\n",
            (long long)r.tokens, r.layout.c_str(), r.recv_rows, r.dispatch.mean, r.dispatch.median,
            r.dispatch_staged.mean, r.exchange.mean, r.data.mean, r.recv_bytes / r.dispatch.mean / 1e3,
            r.dispatch_floor.mean, r.dispatch.mean / r.dispatch_floor.mean, r.combine.mean, r.combine.median, in_buffer,
            r.combine_bytes / r.combine.mean / 1e3, r.combine_floor.mean, r.combine.mean / r.combine_floor.mean,
            r.loop_dispatch.mean, r.loop_combine.mean, r.memory_mb, r.padded_mb);
        std::fflush(stdout);
        json << (first ? "" : ",") << "\n  {\"transport\": \"" << harness::transport_flag_name(kind)
             << "\", \"ranks\": " << mpi.world_size()
             << ", \"fault_tolerant\": " << (o.fault_tolerant ? "true" : "false") << ", \"tokens\": " << r.tokens
             << ", \"layout\": \"" << r.layout << "\", \"rows\": " << r.recv_rows
             << ", \"dispatch_us\": " << r.dispatch.mean << ", \"dispatch_median_us\": " << r.dispatch.median
             << ", \"dispatch_staged_us\": " << r.dispatch_staged.mean << ", \"exchange_us\": " << r.exchange.mean
             << ", \"data_us\": " << r.data.mean << ", \"dispatch_floor_us\": " << r.dispatch_floor.mean
             << ", \"dispatch_bytes\": " << r.recv_bytes << ", \"combine_us\": " << r.combine.mean
             << ", \"combine_median_us\": " << r.combine.median
             << ", \"combine_in_buffer_us\": " << r.combine_in_buffer.mean
             << ", \"combine_floor_us\": " << r.combine_floor.mean << ", \"combine_bytes\": " << r.combine_bytes
             << ", \"loop_dispatch_us\": " << r.loop_dispatch.mean << ", \"loop_combine_us\": " << r.loop_combine.mean
             << ", \"memory_mb\": " << r.memory_mb << ", \"padded_mb\": " << r.padded_mb << "}";
        first = false;
      }
    }
  }
  json << "\n]\n";
  if (!o.json.empty() && mpi.rank() == 0) std::ofstream(o.json) << json.str();
  return 0;
}

}  // namespace
}  // namespace expertwire

int main(int argc, char** argv) {
  return expertwire::harness::run_reporting_errors("bench_high_throughput", expertwire::run, argc, argv);
}
