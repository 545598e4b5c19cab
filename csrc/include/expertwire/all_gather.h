// The byte all-gather the constructors agree and exchange buffers through.
#pragma once

#include <functional>
#include <string>
#include <vector>

namespace expertwire {

// All-gather of one byte string per rank: called once on every rank with this rank's bytes, returns every
// rank's bytes in rank order. MPI_Allgatherv, torch.distributed.all_gather_object, ... provide it.
using AllGatherBytes = std::function<std::vector<std::string>(const std::string& local)>;

}  // namespace expertwire
