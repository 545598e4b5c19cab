// The step every transport's constructor takes before it allocates anything: all ranks agree that they can go
// on, and on the buffer layout, so that either every rank constructs its all-to-all or every rank throws.
// A rank that threw alone would leave its peers in the next collective (NVSHMEM's have no timeout), and ranks
// whose layouts differ would write into the wrong bytes of each other's buffers.
#pragma once

#include <functional>

#include "core/layout.h"
#include "expertwire/all_to_all.h"

namespace expertwire {

// Collective over the ranks `all_gather` reaches, in rank order. Runs `own_checks` on this rank (an expertwire
// Error it throws is this rank's failure; other exceptions propagate at once), exchanges each rank's verdict and
// layout signature, and then throws ConfigError on every rank alike: this rank's own error on the rank that
// failed and "<transport>: rank R could not construct its all-to-all (its own error says why), so no rank does"
// on the others, else the first field in which a rank's layout differs from rank 0's. `transport` prefixes the
// messages about the exchange itself ("intranode", "internode").
void agree_before_allocating(const char* transport, const BufferLayout& layout, int rank, int world_size,
                             const AllGatherBytes& all_gather, const std::function<void()>& own_checks);

}  // namespace expertwire
