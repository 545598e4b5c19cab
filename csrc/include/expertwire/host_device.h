// EW_HOST_DEVICE marks what host code and kernels share (layouts, encodings, views): plain C++ without CUDA.
#pragma once

#if defined(__CUDACC__)
#define EW_HOST_DEVICE __host__ __device__
#else
#define EW_HOST_DEVICE
#endif
