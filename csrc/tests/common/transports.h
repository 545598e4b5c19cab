// Which transports a multi-rank program exercises, chosen by a command-line flag.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/config.h"
#include "transport/common/all_to_all.h"

namespace expertwire::harness {

enum class TransportKind : int {
  kInternode = 1,      // NVSHMEM; peers on this node by load/store
  kInternodePuts = 2,  // NVSHMEM puts and signals for every peer, as between nodes
};

// "internode", "internode-puts" or "all".
std::vector<TransportKind> transports_from_flag(const std::string& flag);
const char* transport_title(TransportKind kind);
std::unique_ptr<AllToAll> make_all_to_all(TransportKind kind, const AllToAllConfig& config);

}  // namespace expertwire::harness
