// Settings read from the environment.
#pragma once

#include <cstdint>
#include <string>

namespace expertwire {

// Bytes in NVSHMEM's symmetric heap per PE, as NVSHMEM_SYMMETRIC_SIZE sets it (default 1 GiB).
// Accepts NVSHMEM's spelling: a number (decimals too, rounded up) with an optional k/m/g/t suffix (powers of
// 1024, either case), anything after the suffix ignored ("2GB" is 2 GiB).
uint64_t symmetric_heap_bytes_from_env();
uint64_t parse_size_bytes(const std::string& text);  // throws ConfigError on a malformed value

// Timeout of every device-side wait: EXPERTWIRE_TIMEOUT_MS, default 10 s.
uint64_t default_timeout_ns();

// The positive 32-bit integer an environment variable holds (digits only), or `fallback` when it is unset or
// empty; throws ConfigError naming the variable otherwise.
uint32_t positive_uint32_from_env(const char* name, uint32_t fallback);

// Whether NVSHMEM_DISABLE_P2P is set true, read as NVSHMEM reads its booleans (1, y, yes, t, true, on; any case):
// the job declares that its ranks do not reach each other's memory, as between nodes.
bool nvshmem_p2p_disabled();

// Why this process's ranks may not use peer memory (the intranode transport), or empty when they may.
std::string peer_memory_unavailable_reason();

// Throws ConfigError for `transport` (a peer-memory transport) when peer_memory_unavailable_reason() is not empty.
void require_peer_memory_allowed(const char* transport);

}  // namespace expertwire
