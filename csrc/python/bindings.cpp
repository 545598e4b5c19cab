// The _expertwire extension module: a thin nanobind layer over the C++ library. It never sees a torch tensor:
// Python passes device addresses, sizes and the CUDA stream as integers, after checking every tensor itself,
// so one wheel serves every torch version. CPU arrays (the reference model's inputs) arrive through DLPack or
// the buffer protocol as nanobind ndarrays.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/arguments.h"
#include "core/env.h"
#include "core/error.h"
#include "core/ht_layout.h"
#include "expertwire/config.h"
#include "expertwire/dtype.h"
#include "expertwire/high_throughput.h"
#include "expertwire/internode.h"
#include "expertwire/intranode.h"
#include "expertwire/params.h"
#include "reference/fp8_blocks.h"
#include "reference/reference.h"
#include "symmem/nvshmem_runtime.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace expertwire {
namespace {

template <class T>
T* device_pointer(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

cudaStream_t stream_from(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

SplitMode split_mode(const char* op, bool do_send, bool do_recv) {
  EW_REQUIRE(do_send || do_recv, op, ": do_send or do_recv must be True, got both False");
  if (do_send && do_recv) return SplitMode::kNone;
  return do_send ? SplitMode::kSend : SplitMode::kRecv;
}

// Byte strides from Python: (expert, row, word) of out_expert_x_scale, (row, word) of dp_x_scale, (row, element)
// of dp_x.
using Strides3 = std::tuple<uint64_t, uint64_t, uint64_t>;
using Strides2 = std::tuple<uint64_t, uint64_t>;

DispatchParams dispatch_params(uintptr_t out_expert_num_tokens, uintptr_t out_expert_x, uintptr_t out_expert_x_scale,
                               uintptr_t dp_x, uintptr_t dp_x_scale, uintptr_t indices, uint32_t m, uintptr_t bound_m,
                               bool do_send, bool do_recv, const Strides3& out_expert_x_scale_strides,
                               const Strides2& dp_x_scale_strides, const Strides2& dp_x_strides, uint8_t cast,
                               bool indices_int64) {
  const auto [out_expert, out_row, out_word] = out_expert_x_scale_strides;
  const auto [scale_row, scale_word] = dp_x_scale_strides;
  const auto [x_row, x_element] = dp_x_strides;
  DispatchParams p;
  p.out_expert_num_tokens = device_pointer<int32_t>(out_expert_num_tokens);
  p.out_expert_x = device_pointer<uint8_t>(out_expert_x);
  p.out_expert_x_scale = Strided3D<float>{device_pointer<float>(out_expert_x_scale), out_expert, out_row, out_word};
  p.dp_x = Strided2D<const uint8_t>{device_pointer<const uint8_t>(dp_x), x_row, x_element};
  p.dp_x_scale = Strided2D<const float>{device_pointer<const float>(dp_x_scale), scale_row, scale_word};
  p.indices = device_pointer<const void>(indices);
  p.index_type = indices_int64 ? IndexType::kInt64 : IndexType::kUInt32;
  p.m = m;
  p.bound_m = device_pointer<const uint32_t>(bound_m);
  p.split = split_mode("dispatch", do_send, do_recv);
  p.cast = Fp8Cast(cast);  // an unknown value is refused by check_dispatch_layout
  return p;
}

CombineParams combine_params(uintptr_t out_tokens, ScalarType out_type, uintptr_t indices, uintptr_t weights,
                             uintptr_t expert_y, ScalarType expert_type, uint32_t m, uintptr_t bound_m, bool do_send,
                             bool do_recv, bool indices_int64) {
  CombineParams p;
  p.out_tokens = device_pointer<void>(out_tokens);
  p.out_type = out_type;
  p.indices = device_pointer<const void>(indices);
  p.index_type = indices_int64 ? IndexType::kInt64 : IndexType::kUInt32;
  p.weights = device_pointer<const float>(weights);
  p.expert_y = device_pointer<const void>(expert_y);
  p.expert_type = expert_type;
  p.m = m;
  p.bound_m = device_pointer<const uint32_t>(bound_m);
  p.split = split_mode("combine", do_send, do_recv);
  return p;
}

// Owns one all-to-all object until destroy(), which Python calls collectively on every rank; the object is
// never left to the garbage collector because its destructor frees memory that peers map.
class AllToAllHandle {
 public:
  explicit AllToAllHandle(std::unique_ptr<AllToAll> impl) : impl_(std::move(impl)) {}

  void dispatch(uintptr_t out_expert_num_tokens, uintptr_t out_expert_x, uintptr_t out_expert_x_scale, uintptr_t dp_x,
                uintptr_t dp_x_scale, uintptr_t indices, uint32_t m, uintptr_t bound_m, bool do_send, bool do_recv,
                uintptr_t stream, const Strides3& out_expert_x_scale_strides, const Strides2& dp_x_scale_strides,
                const Strides2& dp_x_strides, uint8_t cast, bool indices_int64) {
    live().dispatch(dispatch_params(out_expert_num_tokens, out_expert_x, out_expert_x_scale, dp_x, dp_x_scale, indices,
                                    m, bound_m, do_send, do_recv, out_expert_x_scale_strides, dp_x_scale_strides,
                                    dp_x_strides, cast, indices_int64),
                    stream_from(stream));
  }

  void combine(uintptr_t out_tokens, ScalarType out_type, uintptr_t indices, uintptr_t weights, uintptr_t expert_y,
               ScalarType expert_type, uint32_t m, uintptr_t bound_m, bool do_send, bool do_recv, uintptr_t stream,
               bool indices_int64) {
    live().combine(combine_params(out_tokens, out_type, indices, weights, expert_y, expert_type, m, bound_m, do_send,
                                  do_recv, indices_int64),
                   stream_from(stream));
  }

  void check_errors() const { live().check_errors(); }
  uintptr_t expert_output_buffer() const { return reinterpret_cast<uintptr_t>(live().expert_output_buffer()); }
  uintptr_t dispatch_input_buffer() const { return reinterpret_cast<uintptr_t>(live().dispatch_input_buffer().data); }
  uintptr_t dispatch_input_scale_buffer() const {
    return reinterpret_cast<uintptr_t>(live().dispatch_input_scale_buffer().data);
  }
  uint64_t dispatch_input_row_stride() const { return live().dispatch_input_buffer().row_stride; }
  uint32_t num_blocks() const { return live().launch_shape().blocks; }
  bool fault_tolerant() const { return live().fault_tolerant(); }
  int64_t rank() const { return live().config().rank; }
  uintptr_t active_ranks() const { return reinterpret_cast<uintptr_t>(live().active_ranks()); }
  int device() const { return live().device(); }
  bool alive() const { return impl_ != nullptr; }
  void destroy() { impl_.reset(); }

 private:
  AllToAll& live() const {
    if (!impl_) EW_THROW(RuntimeError, "this AllToAll was destroyed; create a new one");
    return *impl_;
  }

  std::unique_ptr<AllToAll> impl_;
};

// Adapts a Python callable (bytes -> list of bytes, one per rank) to the byte-string all-gather the intranode
// transport exchanges its IPC handles through. Called with the GIL held, from the constructor.
AllGatherBytes all_gather_from_python(nb::callable all_gather) {
  return [all_gather](const std::string& local) {
    nb::object gathered = all_gather(nb::bytes(local.data(), local.size()));
    std::vector<std::string> result;
    for (nb::handle entry : gathered) {
      if (!nb::isinstance<nb::bytes>(entry)) {
        EW_THROW(ConfigError, "all_gather must return a list of bytes, one per rank; got an entry of type ",
                 nb::type_name(entry.type()).c_str());
      }
      const nb::bytes bytes = nb::borrow<nb::bytes>(entry);
      result.emplace_back(bytes.c_str(), bytes.size());
    }
    return result;
  };
}

// One NVSHMEM symmetric allocation, released by close() (collective) or when NVSHMEM is finalized first.
class SymmetricMemory {
 public:
  explicit SymmetricMemory(size_t bytes)
      : bytes_(bytes), buffer_(std::make_unique<NvshmemSymmetricBuffer>(bytes, /*force_puts=*/false)) {}
  uintptr_t data_ptr() const {
    if (!buffer_) EW_THROW(RuntimeError, "this symmetric buffer was released");
    return reinterpret_cast<uintptr_t>(buffer_->local());
  }
  size_t nbytes() const { return bytes_; }
  void close() { buffer_.reset(); }

 private:
  size_t bytes_;
  std::unique_ptr<NvshmemSymmetricBuffer> buffer_;
};

// ---- reference model -----------------------------------------------------------------------------------

using CpuBytes2D = nb::ndarray<const uint8_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using CpuIndices2D = nb::ndarray<const uint32_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using CpuFloat2D = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using CpuFloat4D = nb::ndarray<const float, nb::ndim<4>, nb::c_contig, nb::device::cpu>;
using CpuOutFloat2D = nb::ndarray<float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

void require_rows(const char* name, size_t rows, size_t columns, int64_t want_rows, int64_t want_columns) {
  EW_REQUIRE(int64_t(rows) >= want_rows && int64_t(columns) == want_columns, name, " must have shape [>=", want_rows,
             ", ", want_columns, "], got [", rows, ", ", columns, "]");
}

// One group of the reference dispatch: (m, x [m][hidden_dim_bytes] uint8, x_scale or None, indices [m][k]).
using GroupArrays = std::tuple<int64_t, CpuBytes2D, std::optional<CpuBytes2D>, CpuIndices2D>;

std::vector<std::vector<std::pair<uint32_t, uint32_t>>> reference_dispatch(const AllToAllConfig& config,
                                                                           const std::vector<GroupArrays>& groups) {
  std::vector<reference::GroupInput> inputs;
  for (const auto& [m, x, x_scale, indices] : groups) {
    require_rows("x", x.shape(0), x.shape(1), m, config.hidden_dim_bytes);
    require_rows("indices", indices.shape(0), indices.shape(1), m, config.experts_per_token);
    reference::GroupInput input;
    input.m = m;
    input.x = x.data();
    input.indices = indices.data();
    if (x_scale) {
      require_rows("x_scale", x_scale->shape(0), x_scale->shape(1), m, config.hidden_dim_scale_bytes);
      input.x_scale = x_scale->data();
    }
    inputs.push_back(input);
  }
  std::vector<std::vector<std::pair<uint32_t, uint32_t>>> inboxes;
  for (const reference::ExpertInbox& inbox : reference::dispatch(config, inputs)) {
    auto& sources = inboxes.emplace_back();
    for (const reference::ReceivedToken& token : inbox.tokens) sources.emplace_back(token.source_group, token.token);
  }
  return inboxes;
}

void reference_combine(const AllToAllConfig& config, uint32_t group, int64_t m, CpuIndices2D indices,
                       CpuFloat2D weights, CpuFloat4D expert_outputs, CpuOutFloat2D out) {
  require_rows("indices", indices.shape(0), indices.shape(1), m, config.experts_per_token);
  require_rows("weights", weights.shape(0), weights.shape(1), m, config.experts_per_token);
  require_rows("out", out.shape(0), out.shape(1), m, config.hidden_dim);
  const int64_t want[4] = {config.num_experts, config.num_dp_groups(), config.max_num_tokens, config.hidden_dim};
  for (int axis = 0; axis < 4; ++axis) {
    EW_REQUIRE(int64_t(expert_outputs.shape(axis)) == want[axis],
               "expert_outputs must have shape [num_experts, num_dp_groups, max_num_tokens, hidden_dim] = [", want[0],
               ", ", want[1], ", ", want[2], ", ", want[3], "], axis ", axis, " is ", expert_outputs.shape(axis));
  }
  reference::GroupInput input;
  input.m = m;
  input.indices = indices.data();
  input.weights = weights.data();
  const float* table = expert_outputs.data();
  const reference::ExpertOutputFn expert_output = [&](uint32_t expert, uint32_t source_group, uint32_t token) {
    return table + ((int64_t(expert) * want[1] + source_group) * want[2] + token) * want[3];
  };
  reference::combine(config, group, input, expert_output, out.data());
}

AllToAllConfig make_validated_config(int64_t max_num_tokens, int64_t num_experts, int64_t experts_per_token,
                                     int64_t rank, int64_t world_size, int64_t dp_size, int64_t hidden_dim,
                                     int64_t hidden_dim_bytes, int64_t hidden_dim_scale_bytes) {
  AllToAllConfig config = make_config(max_num_tokens, num_experts, experts_per_token, rank, world_size, dp_size,
                                      hidden_dim, hidden_dim_bytes, hidden_dim_scale_bytes);
  config.validate();
  return config;
}

// ---- high-throughput all-to-all ---------------------------------------------------------------------------

// One dispatch's handle (HighThroughputHandle), owned by Python; valid while its object lives.
class HtHandle {
 public:
  explicit HtHandle(std::unique_ptr<HighThroughputHandle> handle) : handle_(std::move(handle)) {}
  HighThroughputHandle& get() const { return *handle_; }
  uint32_t m() const { return handle_->m(); }
  bool expert_contiguous() const { return handle_->layout() == HighThroughputLayout::kExpertContiguous; }
  uint64_t dispatch_index() const { return handle_->dispatch_index(); }

 private:
  std::unique_ptr<HighThroughputHandle> handle_;
};

HighThroughputDispatchInputs ht_inputs(uintptr_t x, uint64_t x_bytes, uint64_t x_row_stride, uintptr_t x_scale,
                                       const Strides2& x_scale_strides, uintptr_t topk_idx, bool topk_idx_int64,
                                       uintptr_t topk_weights, uint32_t m) {
  const auto [scale_row, scale_word] = x_scale_strides;
  HighThroughputDispatchInputs in;
  in.x = Strided2D<const uint8_t>{device_pointer<const uint8_t>(x), x_row_stride, 1};
  in.x_bytes = x_bytes;
  in.x_scale = Strided2D<const float>{device_pointer<const float>(x_scale), scale_row, scale_word};
  in.topk_idx = device_pointer<const void>(topk_idx);
  in.topk_idx_int64 = topk_idx_int64;
  in.topk_weights = device_pointer<const float>(topk_weights);
  in.m = m;
  return in;
}

// Owns one high-throughput object until destroy() (collective, as AllToAllHandle).
class HtObject {
 public:
  explicit HtObject(std::unique_ptr<HighThroughputAllToAll> impl) : impl_(std::move(impl)) {}

  std::unique_ptr<HtHandle> make_handle() const { return std::make_unique<HtHandle>(live().make_handle()); }

  void dispatch_layout(HtHandle& handle, bool expert_contiguous, uintptr_t x, uint64_t x_bytes, uint64_t x_row_stride,
                       uintptr_t x_scale, const Strides2& x_scale_strides, uintptr_t topk_idx, bool topk_idx_int64,
                       uintptr_t topk_weights, uint32_t m, uintptr_t stream) {
    live().dispatch_layout(
        ht_inputs(x, x_bytes, x_row_stride, x_scale, x_scale_strides, topk_idx, topk_idx_int64, topk_weights, m),
        layout_of(expert_contiguous), handle.get(), stream_from(stream));
  }

  std::tuple<int64_t, int64_t, std::vector<int64_t>> counts(const HtHandle& handle, uintptr_t stream) const {
    nb::gil_scoped_release released;
    const HighThroughputCounts c = live().counts(handle.get(), stream_from(stream));
    return {c.num_recv_tokens, c.num_expert_rows, c.tokens_per_expert};
  }

  void dispatch_data(HtHandle& handle, uintptr_t x, uint64_t x_bytes, uint64_t x_row_stride, uintptr_t x_scale,
                     const Strides2& x_scale_strides, uintptr_t topk_idx, bool topk_idx_int64, uintptr_t topk_weights,
                     uint32_t m, uint64_t capacity_rows, uintptr_t recv_x, uintptr_t recv_x_scale,
                     const Strides2& recv_x_scale_strides, uintptr_t recv_topk_idx, uintptr_t recv_topk_weights,
                     uintptr_t row_expert, uintptr_t row_weight, uintptr_t tokens_per_expert, uintptr_t expert_offsets,
                     uintptr_t num_recv_rows, uintptr_t stream) {
    const auto [scale_row, scale_word] = recv_x_scale_strides;
    HighThroughputDispatchOutputs out;
    out.layout = handle.get().layout();
    out.capacity_rows = capacity_rows;
    out.recv_x = device_pointer<uint8_t>(recv_x);
    out.recv_x_scale = Strided2D<float>{device_pointer<float>(recv_x_scale), scale_row, scale_word};
    out.recv_topk_idx = device_pointer<int64_t>(recv_topk_idx);
    out.recv_topk_weights = device_pointer<float>(recv_topk_weights);
    out.row_expert = device_pointer<int32_t>(row_expert);
    out.row_weight = device_pointer<float>(row_weight);
    out.tokens_per_expert = device_pointer<int32_t>(tokens_per_expert);
    out.expert_offsets = device_pointer<int32_t>(expert_offsets);
    out.num_recv_rows = device_pointer<int32_t>(num_recv_rows);
    live().dispatch_data(
        ht_inputs(x, x_bytes, x_row_stride, x_scale, x_scale_strides, topk_idx, topk_idx_int64, topk_weights, m),
        handle.get(), out, stream_from(stream));
  }

  void combine(const HtHandle& handle, uintptr_t expert_out, ScalarType type, uintptr_t out, uintptr_t stream,
               uintptr_t row_weight, bool with_topk_weights, uintptr_t topk_weights, uintptr_t out_topk_weights) {
    HighThroughputCombineParams p;
    p.expert_out = device_pointer<const void>(expert_out);
    p.type = type;
    p.out = device_pointer<void>(out);
    p.row_weight = device_pointer<const float>(row_weight);
    p.with_topk_weights = with_topk_weights;
    p.topk_weights = device_pointer<const float>(topk_weights);
    p.out_topk_weights = device_pointer<float>(out_topk_weights);
    live().combine(p, handle.get(), stream_from(stream));
  }

  void check_errors() const { live().check_errors(); }
  uintptr_t combine_input_buffer() const { return reinterpret_cast<uintptr_t>(live().combine_input_buffer()); }
  uintptr_t dispatch_input_buffer() const { return reinterpret_cast<uintptr_t>(live().dispatch_input_buffer().data); }
  uintptr_t dispatch_input_scale_buffer() const {
    return reinterpret_cast<uintptr_t>(live().dispatch_input_scale_buffer().data);
  }
  uint64_t dispatch_input_row_stride() const { return live().dispatch_input_buffer().row_stride; }
  int64_t recv_rows() const { return live().config().recv_rows(); }
  int64_t max_expert_rows() const { return live().config().max_expert_rows(); }
  uint64_t symmetric_bytes() const { return live().symmetric_bytes(); }
  int device() const { return live().device(); }
  int64_t rank() const { return live().config().rank; }
  bool fault_tolerant() const { return live().fault_tolerant(); }
  uintptr_t active_ranks() const { return reinterpret_cast<uintptr_t>(live().active_ranks()); }
  bool alive() const { return impl_ != nullptr; }
  void destroy() { impl_.reset(); }

 private:
  static HighThroughputLayout layout_of(bool expert_contiguous) {
    return expert_contiguous ? HighThroughputLayout::kExpertContiguous : HighThroughputLayout::kRankPacked;
  }
  HighThroughputAllToAll& live() const {
    if (!impl_) EW_THROW(RuntimeError, "this HighThroughputAllToAll was destroyed; create a new one");
    return *impl_;
  }
  std::unique_ptr<HighThroughputAllToAll> impl_;
};

HighThroughputConfig ht_config(int64_t max_num_tokens, int64_t num_experts, int64_t experts_per_token, int64_t rank,
                               int64_t world_size, int64_t hidden_dim, int64_t hidden_dim_bytes,
                               int64_t hidden_dim_scale_bytes, int64_t combine_element_bytes, int64_t expert_alignment,
                               int64_t recv_capacity) {
  HighThroughputConfig c;
  c.max_num_tokens = max_num_tokens;
  c.num_experts = num_experts;
  c.experts_per_token = experts_per_token;
  c.rank = rank;
  c.world_size = world_size;
  c.hidden_dim = hidden_dim;
  c.hidden_dim_bytes = hidden_dim_bytes;
  c.hidden_dim_scale_bytes = hidden_dim_scale_bytes;
  c.combine_element_bytes = combine_element_bytes;
  c.expert_alignment = expert_alignment;
  c.recv_capacity = recv_capacity;
  c.validate();
  return c;
}

}  // namespace
}  // namespace expertwire

NB_MODULE(_expertwire, m) {
  using namespace expertwire;
  m.doc() = "expertwire: MoE all-to-all dispatch/combine kernels (C++ core; use the expertwire package)";
  // A script that still holds an AllToAllConfig (or any other object of this module) when the interpreter exits
  // is not leaking: Python frees module objects in no particular order at shutdown, after nanobind's check.
  nb::set_leak_warnings(false);

  static nb::exception<DeviceError> device_error(m, "DeviceError", PyExc_RuntimeError);
  nb::register_exception_translator([](const std::exception_ptr& error, void*) {
    try {
      std::rethrow_exception(error);
    } catch (const ConfigError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const DeviceError& e) {
      PyErr_SetString(device_error.ptr(), e.what());
    } catch (const Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  nb::enum_<ScalarType>(m, "ScalarType")
      .value("float32", ScalarType::kFloat32)
      .value("bfloat16", ScalarType::kBFloat16)
      .value("float16", ScalarType::kFloat16);

  nb::class_<AllToAllConfig>(m, "AllToAllConfig")
      .def(nb::new_(&make_validated_config), "max_num_tokens"_a, "num_experts"_a, "experts_per_token"_a, "rank"_a,
           "world_size"_a, "dp_size"_a, "hidden_dim"_a, "hidden_dim_bytes"_a, "hidden_dim_scale_bytes"_a,
           "Validates the fields; raises ValueError naming the first invalid one.")
      .def_ro("max_num_tokens", &AllToAllConfig::max_num_tokens)
      .def_ro("num_experts", &AllToAllConfig::num_experts)
      .def_ro("experts_per_token", &AllToAllConfig::experts_per_token)
      .def_ro("rank", &AllToAllConfig::rank)
      .def_ro("world_size", &AllToAllConfig::world_size)
      .def_ro("dp_size", &AllToAllConfig::dp_size)
      .def_ro("hidden_dim", &AllToAllConfig::hidden_dim)
      .def_ro("hidden_dim_bytes", &AllToAllConfig::hidden_dim_bytes)
      .def_ro("hidden_dim_scale_bytes", &AllToAllConfig::hidden_dim_scale_bytes)
      .def_prop_ro("num_local_experts", &AllToAllConfig::num_local_experts)
      .def_prop_ro("num_dp_groups", &AllToAllConfig::num_dp_groups)
      .def_prop_ro("dp_group", &AllToAllConfig::dp_group)
      .def_prop_ro("max_recv_tokens", &AllToAllConfig::max_recv_tokens);

  nb::class_<AllToAllHandle>(m, "AllToAllHandle")
      .def_static(
          "internode",
          [](const AllToAllConfig& config, uint32_t max_sm_count, bool force_puts, bool fault_tolerant) {
            AllToAllOptions options;
            options.max_sm_count = max_sm_count;
            options.force_puts = force_puts;
            options.fault_tolerant = fault_tolerant;
            return std::make_unique<AllToAllHandle>(std::make_unique<AllToAllInternode>(config, options));
          },
          "config"_a, "max_sm_count"_a = 0, "force_puts"_a = false, "fault_tolerant"_a = false,
          "Collective over every NVSHMEM rank; NVSHMEM must be initialized.")
      .def_static(
          "internode_symmetric_bytes",
          [](const AllToAllConfig& config, uint32_t max_sm_count) {
            AllToAllOptions options;
            options.max_sm_count = max_sm_count;
            return AllToAllInternode::symmetric_bytes(config, options);
          },
          "config"_a, "max_sm_count"_a = 0,
          "The symmetric heap bytes an internode object of `config` takes on the current device. Local.")
      .def_static(
          "intranode",
          [](const AllToAllConfig& config, nb::callable all_gather, uint32_t max_sm_count, bool fault_tolerant) {
            AllToAllOptions options;
            options.max_sm_count = max_sm_count;
            options.fault_tolerant = fault_tolerant;
            return std::make_unique<AllToAllHandle>(
                std::make_unique<AllToAllIntranode>(config, all_gather_from_python(all_gather), options));
          },
          "config"_a, "all_gather"_a, "max_sm_count"_a = 0, "fault_tolerant"_a = false,
          "Collective: `all_gather(bytes) -> list[bytes]` returns every rank's bytes in rank order.")
      .def("dispatch", &AllToAllHandle::dispatch, "out_expert_num_tokens"_a, "out_expert_x"_a, "out_expert_x_scale"_a,
           "dp_x"_a, "dp_x_scale"_a, "indices"_a, "m"_a, "bound_m"_a, "do_send"_a, "do_recv"_a, "stream"_a,
           "out_expert_x_scale_strides"_a, "dp_x_scale_strides"_a, "dp_x_strides"_a, "cast"_a = 0,
           "indices_int64"_a = false)
      .def("combine", &AllToAllHandle::combine, "out_tokens"_a, "out_type"_a, "indices"_a, "weights"_a, "expert_y"_a,
           "expert_type"_a, "m"_a, "bound_m"_a, "do_send"_a, "do_recv"_a, "stream"_a, "indices_int64"_a = false)
      .def("check_errors", &AllToAllHandle::check_errors)
      .def_prop_ro("expert_output_buffer", &AllToAllHandle::expert_output_buffer,
                   "Device address of this rank's expert_outputs region (see AllToAll::expert_output_buffer).")
      .def_prop_ro("dispatch_input_buffer", &AllToAllHandle::dispatch_input_buffer,
                   "Device address of this rank's first staged payload (see AllToAll::dispatch_input_buffer).")
      .def_prop_ro("dispatch_input_scale_buffer", &AllToAllHandle::dispatch_input_scale_buffer,
                   "Device address of this rank's first staged scales, 0 without scales.")
      .def_prop_ro("dispatch_input_row_stride", &AllToAllHandle::dispatch_input_row_stride,
                   "Bytes between the staged rows of both dispatch input buffers.")
      .def_prop_ro("num_blocks", &AllToAllHandle::num_blocks)
      .def_prop_ro("fault_tolerant", &AllToAllHandle::fault_tolerant)
      .def_prop_ro("rank", &AllToAllHandle::rank)
      .def_prop_ro("active_ranks", &AllToAllHandle::active_ranks,
                   "Device address of the int32 [world_size] mask of active ranks; 0 in the default mode.")
      .def_prop_ro("device", &AllToAllHandle::device, "The CUDA device that owns its buffers.")
      .def_prop_ro("alive", &AllToAllHandle::alive)
      .def("destroy", &AllToAllHandle::destroy);

  nb::class_<HtHandle>(m, "HighThroughputHandle")
      .def_prop_ro("m", &HtHandle::m)
      .def_prop_ro("expert_contiguous", &HtHandle::expert_contiguous)
      .def_prop_ro("dispatch_index", &HtHandle::dispatch_index);

  nb::class_<HtObject>(m, "HighThroughputObject")
      .def_static(
          "internode",
          [](int64_t max_num_tokens, int64_t num_experts, int64_t experts_per_token, int64_t rank, int64_t world_size,
             int64_t hidden_dim, int64_t hidden_dim_bytes, int64_t hidden_dim_scale_bytes,
             int64_t combine_element_bytes, int64_t expert_alignment, int64_t recv_capacity, uint32_t max_sm_count,
             bool force_puts, bool fault_tolerant) {
            AllToAllOptions options;
            options.max_sm_count = max_sm_count;
            options.force_puts = force_puts;
            options.fault_tolerant = fault_tolerant;
            const HighThroughputConfig config = ht_config(
                max_num_tokens, num_experts, experts_per_token, rank, world_size, hidden_dim, hidden_dim_bytes,
                hidden_dim_scale_bytes, combine_element_bytes, expert_alignment, recv_capacity);
            return std::make_unique<HtObject>(std::make_unique<HighThroughputInternode>(config, options));
          },
          "max_num_tokens"_a, "num_experts"_a, "experts_per_token"_a, "rank"_a, "world_size"_a, "hidden_dim"_a,
          "hidden_dim_bytes"_a, "hidden_dim_scale_bytes"_a, "combine_element_bytes"_a, "expert_alignment"_a,
          "recv_capacity"_a, "max_sm_count"_a, "force_puts"_a, "fault_tolerant"_a = false)
      .def_static(
          "intranode",
          [](int64_t max_num_tokens, int64_t num_experts, int64_t experts_per_token, int64_t rank, int64_t world_size,
             int64_t hidden_dim, int64_t hidden_dim_bytes, int64_t hidden_dim_scale_bytes,
             int64_t combine_element_bytes, int64_t expert_alignment, int64_t recv_capacity, nb::callable all_gather,
             uint32_t max_sm_count, bool fault_tolerant) {
            AllToAllOptions options;
            options.max_sm_count = max_sm_count;
            options.fault_tolerant = fault_tolerant;
            const HighThroughputConfig config = ht_config(
                max_num_tokens, num_experts, experts_per_token, rank, world_size, hidden_dim, hidden_dim_bytes,
                hidden_dim_scale_bytes, combine_element_bytes, expert_alignment, recv_capacity);
            return std::make_unique<HtObject>(
                std::make_unique<HighThroughputIntranode>(config, all_gather_from_python(all_gather), options));
          },
          "max_num_tokens"_a, "num_experts"_a, "experts_per_token"_a, "rank"_a, "world_size"_a, "hidden_dim"_a,
          "hidden_dim_bytes"_a, "hidden_dim_scale_bytes"_a, "combine_element_bytes"_a, "expert_alignment"_a,
          "recv_capacity"_a, "all_gather"_a, "max_sm_count"_a, "fault_tolerant"_a = false)
      .def_static(
          "symmetric_bytes_for",
          [](int64_t max_num_tokens, int64_t num_experts, int64_t experts_per_token, int64_t world_size,
             int64_t hidden_dim, int64_t hidden_dim_bytes, int64_t hidden_dim_scale_bytes,
             int64_t combine_element_bytes, bool may_put) {
            const HighThroughputConfig config =
                ht_config(max_num_tokens, num_experts, experts_per_token, /*rank=*/0, world_size, hidden_dim,
                          hidden_dim_bytes, hidden_dim_scale_bytes, combine_element_bytes, 1, 0);
            return make_ht_layout(config, may_put).symmetric_bytes;
          },
          "max_num_tokens"_a, "num_experts"_a, "experts_per_token"_a, "world_size"_a, "hidden_dim"_a,
          "hidden_dim_bytes"_a, "hidden_dim_scale_bytes"_a, "combine_element_bytes"_a, "may_put"_a,
          "The buffer bytes each rank's object of this configuration takes (may_put: with the put path's rows, as "
          "an internode object whose peers are not all load/store reachable). Local: allocates nothing.")
      .def("make_handle", &HtObject::make_handle)
      .def("dispatch_layout", &HtObject::dispatch_layout, "handle"_a, "expert_contiguous"_a, "x"_a, "x_bytes"_a,
           "x_row_stride"_a, "x_scale"_a, "x_scale_strides"_a, "topk_idx"_a, "topk_idx_int64"_a, "topk_weights"_a,
           "m"_a, "stream"_a)
      .def("counts", &HtObject::counts, "handle"_a, "stream"_a)
      .def("dispatch_data", &HtObject::dispatch_data, "handle"_a, "x"_a, "x_bytes"_a, "x_row_stride"_a, "x_scale"_a,
           "x_scale_strides"_a, "topk_idx"_a, "topk_idx_int64"_a, "topk_weights"_a, "m"_a, "capacity_rows"_a,
           "recv_x"_a, "recv_x_scale"_a, "recv_x_scale_strides"_a, "recv_topk_idx"_a, "recv_topk_weights"_a,
           "row_expert"_a, "row_weight"_a, "tokens_per_expert"_a, "expert_offsets"_a, "num_recv_rows"_a, "stream"_a)
      .def("combine", &HtObject::combine, "handle"_a, "expert_out"_a, "type"_a, "out"_a, "stream"_a, "row_weight"_a = 0,
           "with_topk_weights"_a = false, "topk_weights"_a = 0, "out_topk_weights"_a = 0)
      .def("check_errors", &HtObject::check_errors)
      .def_prop_ro("combine_input_buffer", &HtObject::combine_input_buffer)
      .def_prop_ro("dispatch_input_buffer", &HtObject::dispatch_input_buffer)
      .def_prop_ro("dispatch_input_scale_buffer", &HtObject::dispatch_input_scale_buffer)
      .def_prop_ro("dispatch_input_row_stride", &HtObject::dispatch_input_row_stride)
      .def_prop_ro("recv_rows", &HtObject::recv_rows)
      .def_prop_ro("max_expert_rows", &HtObject::max_expert_rows)
      .def_prop_ro("symmetric_bytes", &HtObject::symmetric_bytes)
      .def_prop_ro("device", &HtObject::device)
      .def_prop_ro("rank", &HtObject::rank)
      .def_prop_ro("fault_tolerant", &HtObject::fault_tolerant)
      .def_prop_ro("active_ranks", &HtObject::active_ranks,
                   "Device address of the int32 [world_size] mask of active ranks; 0 in the default mode.")
      .def_prop_ro("alive", &HtObject::alive)
      .def("destroy", &HtObject::destroy);

  nb::class_<SymmetricMemory>(m, "SymmetricMemory", nb::is_weak_referenceable())
      .def(nb::init<size_t>(), "nbytes"_a, "Collective nvshmem_malloc of `nbytes`, zeroed.")
      .def_prop_ro("data_ptr", &SymmetricMemory::data_ptr)
      .def_prop_ro("nbytes", &SymmetricMemory::nbytes)
      .def("close", &SymmetricMemory::close,
           "Collective nvshmem_free; idempotent. Frees nothing once the interpreter exits (a peer may be gone).");

  m.def("nvshmem_unique_id", []() {
    const std::vector<uint8_t> id = nvshmem_unique_id();
    return nb::bytes(id.data(), id.size());
  });
  m.def("nvshmem_unique_id_bytes", &nvshmem_unique_id_bytes);
  m.def("peer_memory_unavailable_reason", []() -> std::optional<std::string> {
    std::string reason = peer_memory_unavailable_reason();
    if (reason.empty()) return std::nullopt;
    return reason;
  });
  m.def(
      "nvshmem_init",
      [](nb::bytes unique_id, int rank, int world_size) {
        const auto* begin = static_cast<const uint8_t*>(unique_id.data());
        const std::vector<uint8_t> id(begin, begin + unique_id.size());
        nb::gil_scoped_release released;  // blocks until every rank has joined
        nvshmem_init_with_unique_id(id, rank, world_size);
      },
      "unique_id"_a, "rank"_a, "world_size"_a);
  m.def("nvshmem_initialized", &nvshmem_initialized);
  m.def("nvshmem_attach_to_running", &nvshmem_attach_to_running, nb::call_guard<nb::gil_scoped_release>());
  m.def("nvshmem_finalize", &nvshmem_finalize_runtime, nb::call_guard<nb::gil_scoped_release>());
  m.def("nvshmem_release_without_collectives", &nvshmem_release_without_collectives,
        "From now on releasing a symmetric allocation frees nothing (for a process that is ending).");
  m.def("nvshmem_my_pe", &nvshmem_rank);
  m.def("nvshmem_n_pes", &nvshmem_world_size);
  m.def("nvshmem_barrier_all", &nvshmem_barrier_all_ranks, nb::call_guard<nb::gil_scoped_release>());
  m.def(
      "nvshmem_barrier_all_on_stream", [](uintptr_t stream) { nvshmem_barrier_on_stream(stream_from(stream)); },
      "stream"_a);
  m.def(
      "nvshmem_alltoall_on_stream",
      [](uintptr_t dest, uintptr_t source, size_t bytes_per_rank, uintptr_t stream) {
        nvshmem_alltoall_on_stream(device_pointer<void>(dest), device_pointer<const void>(source), bytes_per_rank,
                                   stream_from(stream));
      },
      "dest"_a, "source"_a, "bytes_per_rank"_a, "stream"_a);

  // The configuration-only argument checks (core/arguments.h) on strides and counts, for tensors without storage.
  m.def(
      "check_dispatch_layout",
      [](const AllToAllConfig& config, uint32_t m, bool do_send, bool do_recv, bool has_scales,
         const Strides3& out_expert_x_scale_strides, const Strides2& dp_x_scale_strides, const Strides2& dp_x_strides,
         uint8_t cast) {
        // Stand-in addresses: the layout checks look only at what is present.
        const uintptr_t present = has_scales ? 16 : 0;
        check_dispatch_layout(
            config, dispatch_params(16, 16, present, 16, cast != 0 ? 0 : present, 16, m, 0, do_send, do_recv,
                                    out_expert_x_scale_strides, dp_x_scale_strides, dp_x_strides, cast, false));
      },
      "config"_a, "m"_a, "do_send"_a, "do_recv"_a, "has_scales"_a, "out_expert_x_scale_strides"_a,
      "dp_x_scale_strides"_a, "dp_x_strides"_a, "cast"_a = 0);
  m.def(
      "check_combine_layout",
      [](const AllToAllConfig& config, uint32_t m, ScalarType out_type, ScalarType expert_type, bool do_send,
         bool do_recv) {
        check_combine_layout(config,
                             combine_params(16, out_type, 16, 16, 16, expert_type, m, 0, do_send, do_recv, false));
      },
      "config"_a, "m"_a, "out_type"_a, "expert_type"_a, "do_send"_a, "do_recv"_a);

  m.def("reference_dispatch", &reference_dispatch, "config"_a, "groups"_a,
        "Per local expert of config.rank, the (source group, token) pairs it receives, sorted. `groups` holds one "
        "(m, x, x_scale or None, indices) per DP group.");
  m.def("reference_combine", &reference_combine, "config"_a, "group"_a, "m"_a, "indices"_a, "weights"_a,
        "expert_outputs"_a, "out"_a,
        "Writes out[t] = sum_k weights[t][k] * expert_outputs[indices[t][k], group, t] (fp32, k order), t < m.");
  m.def(
      "reference_cast_fp8_blocks",
      [](nb::ndarray<const uint16_t, nb::ndim<2>, nb::c_contig, nb::device::cpu> x, bool round_scale,
         nb::ndarray<uint8_t, nb::ndim<2>, nb::c_contig, nb::device::cpu> out,
         nb::ndarray<float, nb::ndim<2>, nb::c_contig, nb::device::cpu> scale_inv,
         std::optional<nb::ndarray<uint8_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>> ue8m0) {
        const int64_t m = int64_t(x.shape(0)), hidden = int64_t(x.shape(1));
        const int64_t blocks = hidden / reference::kFp8BlockElements;
        require_rows("out", out.shape(0), out.shape(1), m, hidden);
        require_rows("scale_inv", scale_inv.shape(0), scale_inv.shape(1), m, blocks);
        reference::cast_fp8_blocks(x.data(), m, hidden, round_scale, out.data(), scale_inv.data());
        if (ue8m0) {
          require_rows("ue8m0", ue8m0->shape(0), ue8m0->shape(1), m, blocks);
          for (int64_t i = 0; i < m * blocks; ++i) ue8m0->data()[i] = reference::ue8m0_of(scale_inv.data()[i]);
        }
      },
      "x"_a, "round_scale"_a, "out"_a, "scale_inv"_a, "ue8m0"_a = nb::none(),
      "DeepEP's low-latency fp8 cast of bf16 bits x [m, hidden] into e4m3 codes out and per-128 scale_inv; with "
      "ue8m0, also each scale's UE8M0 byte (round_scale only).");
  m.def("float_to_bf16", &reference::float_to_bf16);
  m.def("bf16_to_float", &reference::bf16_to_float);
  m.def("float_to_half", &reference::float_to_half);
  m.def("half_to_float", &reference::half_to_float);
}
