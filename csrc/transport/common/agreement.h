// The step every transport's constructor takes before it allocates anything that peers share: all ranks agree
// that they can go on, and on the buffer layout, so that either every rank constructs its all-to-all or every
// rank throws. A rank that threw alone would leave its peers in the next collective (NVSHMEM's have no timeout),
// and ranks whose layouts differ would write into the wrong bytes of each other's buffers.
#pragma once

#include <functional>

#include "core/layout.h"
#include "expertwire/all_gather.h"

namespace expertwire {

// Collective over the ranks `all_gather` reaches, in rank order. Runs `own_checks` on this rank, which makes
// every check and local allocation of its own and returns its layout's signature (an expertwire Error it throws
// is this rank's failure; other exceptions propagate at once), exchanges each rank's verdict and signature, and
// then throws on every rank alike: this rank's own error on a rank that failed, "<transport>: rank R could not
// construct its all-to-all (its own error says why), so no rank does" (ConfigError) on the others, else
// ConfigError naming the first field in which a rank's layout differs from rank 0's. `transport` prefixes the
// messages about the exchange itself ("intranode", "internode").
void agree_before_allocating(const char* transport, int rank, int world_size, const AllGatherBytes& all_gather,
                             const std::function<LayoutSignature()>& own_checks);

}  // namespace expertwire
