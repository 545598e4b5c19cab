#include "symmem/ipc_buffer.h"

#include <unistd.h>

#include <cstring>

#include "core/error.h"

namespace expertwire {
namespace {

// What each rank tells the others about its buffer. Fixed size and trivially copyable: sent as raw bytes.
struct PeerRecord {
  uint32_t magic;
  int32_t rank;
  uint64_t bytes;
  char host[64];
  char pci_bus_id[32];
  int32_t device;
  cudaIpcMemHandle_t handle;
};
constexpr uint32_t kRecordMagic = 0x65777031;  // "ewp1"

PeerRecord make_record(int rank, size_t bytes, void* base) {
  PeerRecord r{};
  r.magic = kRecordMagic;
  r.rank = rank;
  r.bytes = bytes;
  EW_REQUIRE(gethostname(r.host, sizeof(r.host) - 1) == 0, "gethostname failed");
  EW_CUDA_CHECK(cudaGetDevice(&r.device));
  EW_CUDA_CHECK(cudaDeviceGetPCIBusId(r.pci_bus_id, sizeof(r.pci_bus_id), r.device));
  EW_CUDA_CHECK(cudaIpcGetMemHandle(&r.handle, base));
  return r;
}

PeerRecord parse_record(const std::string& bytes, int expected_rank) {
  EW_REQUIRE(bytes.size() == sizeof(PeerRecord), "intranode: rank ", expected_rank, " sent ", bytes.size(),
             " bytes of buffer description, expected ", sizeof(PeerRecord), " (all_gather must return each rank's "
             "bytes unchanged, in rank order)");
  PeerRecord r;
  std::memcpy(&r, bytes.data(), sizeof(r));
  EW_REQUIRE(r.magic == kRecordMagic && r.rank == expected_rank, "intranode: entry ", expected_rank,
             " of all_gather is not rank ", expected_rank, "'s buffer description (got rank ", r.rank, ")");
  return r;
}

}  // namespace

IpcSymmetricBuffer::IpcSymmetricBuffer(size_t bytes, int rank, int world_size, const AllGatherBytes& all_gather)
    : local_(bytes) {
  EW_REQUIRE(world_size >= 1 && world_size <= kMaxIntranodeRanks, "intranode: world_size must be 1..",
             kMaxIntranodeRanks, " (one node), got ", world_size, "; use the internode transport across nodes");
  EW_REQUIRE(rank >= 0 && rank < world_size, "intranode: rank must be in [0, ", world_size, "), got ", rank);
  EW_REQUIRE(bool(all_gather), "intranode: an all_gather function is required to exchange buffer handles");
  // Peers may signal into the buffer as soon as they have opened it: it must be zero before we publish it.
  EW_CUDA_CHECK(cudaDeviceSynchronize());

  const PeerRecord own = make_record(rank, bytes, local_.get());
  const std::vector<std::string> gathered =
      all_gather(std::string(reinterpret_cast<const char*>(&own), sizeof(own)));
  EW_REQUIRE(int(gathered.size()) == world_size, "intranode: all_gather returned ", gathered.size(),
             " entries, expected world_size=", world_size);

  std::vector<uint8_t*> bases(world_size, nullptr);
  try {
    for (int peer = 0; peer < world_size; ++peer) {
      const PeerRecord r = parse_record(gathered[peer], peer);
      EW_REQUIRE(std::strncmp(r.host, own.host, sizeof(r.host)) == 0, "intranode: rank ", peer, " runs on host '",
                 r.host, "', rank ", rank, " on '", own.host,
                 "'; every rank must share one node (use the internode transport across nodes)");
      EW_REQUIRE(r.bytes == bytes, "intranode: rank ", peer, " allocated ", r.bytes, " bytes, rank ", rank,
                 " allocated ", bytes, "; every rank must use the same configuration");
      if (peer == rank) {
        bases[peer] = local();
        continue;
      }
      if (std::strncmp(r.pci_bus_id, own.pci_bus_id, sizeof(r.pci_bus_id)) != 0) {
        int peer_device = -1, can_access = 0;
        EW_CUDA_CHECK(cudaDeviceGetByPCIBusId(&peer_device, r.pci_bus_id));
        EW_CUDA_CHECK(cudaDeviceCanAccessPeer(&can_access, own.device, peer_device));
        EW_REQUIRE(can_access, "intranode: GPU ", own.pci_bus_id, " of rank ", rank, " cannot access GPU ",
                   r.pci_bus_id, " of rank ", peer, " (no NVLink/PCIe peer path)");
      }
      void* mapped = nullptr;
      EW_CUDA_CHECK(cudaIpcOpenMemHandle(&mapped, r.handle, cudaIpcMemLazyEnablePeerAccess));
      opened_.push_back(mapped);
      bases[peer] = static_cast<uint8_t*>(mapped);
    }
    peer_table_ = DeviceBuffer(bases.size() * sizeof(uint8_t*));
    EW_CUDA_CHECK(cudaMemcpy(peer_table_.get(), bases.data(), bases.size() * sizeof(uint8_t*),
                             cudaMemcpyHostToDevice));
  } catch (...) {
    for (void* mapped : opened_) cudaIpcCloseMemHandle(mapped);
    throw;
  }
}

IpcSymmetricBuffer::~IpcSymmetricBuffer() {
  cudaDeviceSynchronize();
  for (void* mapped : opened_) cudaIpcCloseMemHandle(mapped);
}

}  // namespace expertwire
