// The launch shape every all-to-all kind starts from.
#pragma once

#include <cstdint>

#include "expertwire/all_to_all.h"

namespace expertwire {

// One block per SM the process may use (EXPERTWIRE_NUM_BLOCKS overrides), at most `max_sm_count` blocks when it
// is non-zero, EXPERTWIRE_BLOCK_THREADS threads (default 512); every block resident at once. Throws ConfigError
// naming a bad override.
LaunchShape default_launch_shape(uint32_t max_sm_count);

}  // namespace expertwire
