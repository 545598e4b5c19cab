// Views of device memory: an address and a stride per dimension, outermost first, in bytes. Bytes, not
// elements: payloads move as bytes whatever their dtype, and a tensor's element strides times its element size
// give them (torch: tensor.stride(d) * tensor.element_size()).
#pragma once

#include <cstdint>
#include <type_traits>

#include "expertwire/host_device.h"

namespace expertwire {

// [rows][elements] of T: element e of row r at data + r * row_stride + e * element_stride bytes.
template <class T>
struct Strided2D {
  T* data = nullptr;
  uint64_t row_stride = 0;
  uint64_t element_stride = sizeof(T);

  EW_HOST_DEVICE uint64_t offset(uint64_t row, uint64_t element) const {
    return row * row_stride + element * element_stride;
  }
  EW_HOST_DEVICE T* at(uint64_t row, uint64_t element) const {
    return reinterpret_cast<T*>(reinterpret_cast<Bytes>(data) + offset(row, element));
  }

 private:
  using Bytes = std::conditional_t<std::is_const_v<T>, const uint8_t*, uint8_t*>;
};

// [matrices][rows][elements] of T: element e of row r of matrix i at
// data + i * matrix_stride + r * row_stride + e * element_stride bytes.
template <class T>
struct Strided3D {
  T* data = nullptr;
  uint64_t matrix_stride = 0;
  uint64_t row_stride = 0;
  uint64_t element_stride = sizeof(T);

  EW_HOST_DEVICE uint64_t offset(uint64_t matrix, uint64_t row, uint64_t element) const {
    return matrix * matrix_stride + row * row_stride + element * element_stride;
  }
  EW_HOST_DEVICE T* at(uint64_t matrix, uint64_t row, uint64_t element) const {
    return reinterpret_cast<T*>(reinterpret_cast<Bytes>(data) + offset(matrix, row, element));
  }

 private:
  using Bytes = std::conditional_t<std::is_const_v<T>, const uint8_t*, uint8_t*>;
};

// The same view, read-only: AllToAll::dispatch_input_buffer() passed where DispatchParams takes an input.
template <class T>
Strided2D<const T> read_only(const Strided2D<T>& view) {
  return Strided2D<const T>{view.data, view.row_stride, view.element_stride};
}

// Row-major [rows][row_bytes / sizeof(T)], rows packed.
template <class T>
Strided2D<T> contiguous_rows(T* data, uint64_t row_bytes) {
  return Strided2D<T>{data, row_bytes, sizeof(T)};
}

// Row-major [matrices][rows][row_bytes / sizeof(T)], packed.
template <class T>
Strided3D<T> contiguous_matrices(T* data, uint64_t rows, uint64_t row_bytes) {
  return Strided3D<T>{data, rows * row_bytes, row_bytes, sizeof(T)};
}

}  // namespace expertwire
