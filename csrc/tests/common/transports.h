// Which transports a multi-rank program exercises, chosen by a command-line flag.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "expertwire/all_to_all.h"
#include "expertwire/config.h"

namespace expertwire::harness {

enum class TransportKind : int {
  kIntranode = 0,      // CUDA IPC peer memory, loads and stores
  kInternode = 1,      // NVSHMEM; peers on this node by load/store
  kInternodePuts = 2,  // NVSHMEM puts and signals for every peer, as between nodes
};

inline constexpr const char* kTransportFlagHelp =
    "intranode, internode, internode-puts, a comma-separated list of them, or all (the internode ones where "
    "NVSHMEM_DISABLE_P2P is set)";
inline constexpr const char* kDefaultTransports = "intranode,internode";

// A comma-separated list of "intranode", "internode", "internode-puts"; "all" names all three.
std::vector<TransportKind> transports_from_flag(const std::string& flag);
// Whether any of `kinds` runs on NVSHMEM (the intranode transport does not: a program that tests only it skips
// NVSHMEM's initialization).
bool needs_nvshmem(const std::vector<TransportKind>& kinds);
const char* transport_title(TransportKind kind);
const char* transport_flag_name(TransportKind kind);  // as the flag spells it: "intranode", ...
// Collective over MPI_COMM_WORLD (the intranode transport exchanges its IPC handles through MPI).
// `timeout_ns` bounds every device-side wait; 0 takes EXPERTWIRE_TIMEOUT_MS (default 10 s). `fault_tolerant`:
// AllToAllOptions::fault_tolerant.
std::unique_ptr<AllToAll> make_all_to_all(TransportKind kind, const AllToAllConfig& config, uint64_t timeout_ns = 0,
                                          bool fault_tolerant = false);

}  // namespace expertwire::harness
