#include "tests/common/transports.h"

#include "core/error.h"
#include "transport/internode/all_to_all_internode.h"

namespace expertwire::harness {

std::vector<TransportKind> transports_from_flag(const std::string& flag) {
  if (flag == "internode") return {TransportKind::kInternode};
  if (flag == "internode-puts") return {TransportKind::kInternodePuts};
  if (flag == "all") return {TransportKind::kInternode, TransportKind::kInternodePuts};
  EW_THROW(ConfigError, "unknown transport '", flag, "' (known: internode, internode-puts, all)");
}

const char* transport_title(TransportKind kind) {
  switch (kind) {
    case TransportKind::kInternode: return "Inter-Node (NVSHMEM)";
    case TransportKind::kInternodePuts: return "Inter-Node (NVSHMEM, puts only)";
  }
  return "?";
}

std::unique_ptr<AllToAll> make_all_to_all(TransportKind kind, const AllToAllConfig& config) {
  InternodeOptions options;
  options.force_puts = kind == TransportKind::kInternodePuts;
  return std::make_unique<AllToAllInternode>(config, options);
}

}  // namespace expertwire::harness
