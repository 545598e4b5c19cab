// Every check of dispatch's and combine's arguments that depends on the configuration alone, written once: the
// all-to-all runs them before each launch, and the Python package reaches the layout checks for tensors that
// have no storage yet (torch's fake tensors). Each throws ConfigError naming the call and the argument, e.g.
// "dispatch: dp_x's rows must lie a multiple of 16 bytes apart ...".
#pragma once

#include "expertwire/config.h"
#include "expertwire/params.h"

namespace expertwire {

// Counts and strides: m, dp_x's row and element strides, the scale tensors' strides (whole words, and no two
// output words at one address). Pointers are not looked at.
void check_dispatch_layout(const AllToAllConfig& config, const DispatchParams& params);
// Null and misaligned pointers (rows 16-byte aligned, everything else 4), for what the call's halves read or write.
void check_dispatch_pointers(const AllToAllConfig& config, const DispatchParams& params);

// The bytes of a dp_x row: hidden_dim_bytes, or with a cast the 2 * hidden_dim of its bf16 values.
uint64_t dispatch_input_row_bytes(const AllToAllConfig& config, Fp8Cast cast);

void check_combine_layout(const AllToAllConfig& config, const CombineParams& params);
void check_combine_pointers(const AllToAllConfig& config, const CombineParams& params);

}  // namespace expertwire
