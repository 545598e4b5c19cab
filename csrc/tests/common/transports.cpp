#include "tests/common/transports.h"

#include <algorithm>
#include <sstream>

#include "core/env.h"
#include "core/error.h"
#include "expertwire/internode.h"
#include "expertwire/intranode.h"
#include "tests/common/mpi_harness.h"

namespace expertwire::harness {

std::vector<TransportKind> transports_from_flag(const std::string& flag) {
  if (flag == "all") {
    // With NVSHMEM_DISABLE_P2P (ranks as if on different nodes) the intranode transport refuses to start.
    if (nvshmem_p2p_disabled()) return {TransportKind::kInternode, TransportKind::kInternodePuts};
    return {TransportKind::kIntranode, TransportKind::kInternode, TransportKind::kInternodePuts};
  }
  std::vector<TransportKind> kinds;
  std::stringstream in(flag);
  for (std::string name; std::getline(in, name, ',');) {
    if (name == "intranode") kinds.push_back(TransportKind::kIntranode);
    else if (name == "internode") kinds.push_back(TransportKind::kInternode);
    else if (name == "internode-puts") kinds.push_back(TransportKind::kInternodePuts);
    else EW_THROW(ConfigError, "unknown transport '", name, "' in '", flag, "' (known: ", kTransportFlagHelp, ")");
  }
  EW_REQUIRE(!kinds.empty(), "no transport named (known: ", kTransportFlagHelp, ")");
  return kinds;
}

bool needs_nvshmem(const std::vector<TransportKind>& kinds) {
  return std::any_of(kinds.begin(), kinds.end(), [](TransportKind kind) { return kind != TransportKind::kIntranode; });
}

const char* transport_title(TransportKind kind) {
  switch (kind) {
    case TransportKind::kIntranode: return "Intra-Node (CUDA IPC)";
    case TransportKind::kInternode: return "Inter-Node (NVSHMEM)";
    case TransportKind::kInternodePuts: return "Inter-Node (NVSHMEM, puts only)";
  }
  return "?";
}

const char* transport_flag_name(TransportKind kind) {
  switch (kind) {
    case TransportKind::kIntranode: return "intranode";
    case TransportKind::kInternode: return "internode";
    case TransportKind::kInternodePuts: return "internode-puts";
  }
  return "?";
}

std::unique_ptr<AllToAll> make_all_to_all(TransportKind kind, const AllToAllConfig& config, uint64_t timeout_ns,
                                          bool fault_tolerant) {
  AllToAllOptions options;
  options.timeout_ns = timeout_ns;
  options.fault_tolerant = fault_tolerant;
  if (kind == TransportKind::kIntranode) return std::make_unique<AllToAllIntranode>(config, all_gather_bytes, options);
  options.force_puts = kind == TransportKind::kInternodePuts;
  return std::make_unique<AllToAllInternode>(config, options);
}

}  // namespace expertwire::harness
