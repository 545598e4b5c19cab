#include "symmem/ipc_buffer.h"

#include <cuda.h>
#include <cudaTypedefs.h>
#include <unistd.h>

#include <cstring>

#include "core/env.h"
#include "core/error.h"
#include "symmem/fd_passing.h"

namespace expertwire {
namespace {

// The driver calls of the virtual memory API, found through the runtime: linking libcuda would keep the
// library from loading on machines without a driver (CI builds and skips there).
struct DriverApi {
  PFN_cuGetErrorName_v6000 error_name;
  PFN_cuDeviceGet_v2000 device_get;
  PFN_cuDeviceGetAttribute_v2000 device_attribute;
  PFN_cuMemGetAllocationGranularity_v10020 granularity;
  PFN_cuMemCreate_v10020 create;
  PFN_cuMemRelease_v10020 release;
  PFN_cuMemExportToShareableHandle_v10020 export_handle;
  PFN_cuMemImportFromShareableHandle_v10020 import_handle;
  PFN_cuMemAddressReserve_v10020 reserve;
  PFN_cuMemAddressFree_v10020 address_free;
  PFN_cuMemMap_v10020 map;
  PFN_cuMemUnmap_v10020 unmap;
  PFN_cuMemSetAccess_v10020 set_access;
};

template <class Fn>
void find_entry_point(Fn& fn, const char* symbol) {
  void* address = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  EW_CUDA_CHECK(cudaGetDriverEntryPointByVersion(symbol, &address, 12000, cudaEnableDefault, &found));
  if (found != cudaDriverEntryPointSuccess || address == nullptr) {
    EW_THROW(RuntimeError, "intranode: the CUDA driver has no ", symbol,
             " (the virtual memory API needs a 12.x driver)");
  }
  fn = reinterpret_cast<Fn>(address);
}

const DriverApi& driver() {
  static const DriverApi api = [] {
    DriverApi d{};
    find_entry_point(d.error_name, "cuGetErrorName");
    find_entry_point(d.device_get, "cuDeviceGet");
    find_entry_point(d.device_attribute, "cuDeviceGetAttribute");
    find_entry_point(d.granularity, "cuMemGetAllocationGranularity");
    find_entry_point(d.create, "cuMemCreate");
    find_entry_point(d.release, "cuMemRelease");
    find_entry_point(d.export_handle, "cuMemExportToShareableHandle");
    find_entry_point(d.import_handle, "cuMemImportFromShareableHandle");
    find_entry_point(d.reserve, "cuMemAddressReserve");
    find_entry_point(d.address_free, "cuMemAddressFree");
    find_entry_point(d.map, "cuMemMap");
    find_entry_point(d.unmap, "cuMemUnmap");
    find_entry_point(d.set_access, "cuMemSetAccess");
    return d;
  }();
  return api;
}

#define EW_CU_CHECK(expr)                                                                                      \
  do {                                                                                                         \
    const CUresult ew_result_ = (expr);                                                                        \
    if (ew_result_ != CUDA_SUCCESS) {                                                                          \
      const char* ew_name_ = nullptr;                                                                          \
      driver().error_name(ew_result_, &ew_name_);                                                              \
      EW_THROW(RuntimeError, "expertwire: intranode: ", #expr,                                                 \
               " failed: ", ew_name_ ? std::string(ew_name_) : "CUresult " + std::to_string(int(ew_result_))); \
    }                                                                                                          \
  } while (0)

// A physical allocation handle until it is mapped (MappedAllocation takes it over).
class AllocationHandle {
 public:
  explicit AllocationHandle(CUmemGenericAllocationHandle handle) : handle_(handle) {}
  ~AllocationHandle() {
    if (handle_ != 0) driver().release(handle_);
  }
  AllocationHandle(const AllocationHandle&) = delete;
  AllocationHandle& operator=(const AllocationHandle&) = delete;

 private:
  CUmemGenericAllocationHandle handle_;
};

}  // namespace

void require_exportable_memory(int device) {
  const DriverApi& d = driver();
  CUdevice handle = 0;
  int vmm = 0, posix_fd = 0;
  EW_CU_CHECK(d.device_get(&handle, device));
  EW_CU_CHECK(d.device_attribute(&vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, handle));
  EW_CU_CHECK(d.device_attribute(&posix_fd, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED, handle));
  if (!vmm || !posix_fd) {
    EW_THROW(RuntimeError, "intranode: device ", device, " does not support ",
             !vmm ? "the CUDA virtual memory API" : "exporting memory as POSIX file descriptors",
             ", which the intranode buffer needs; use the internode transport");
  }
}

namespace {

CUmemAllocationProp exportable_device_memory(int device) {
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
  return prop;
}

// What each rank tells the others about its buffer. Fixed size and trivially copyable: sent as raw bytes.
struct PeerRecord {
  uint32_t magic;
  int32_t rank;
  uint64_t bytes;
  uint64_t mapped_bytes;
  char host[64];
  char pci_bus_id[32];
  int32_t device;
  char mailbox[64];
};
constexpr uint32_t kRecordMagic = 0x65777032;  // "ewp2"
constexpr int kExchangeTimeoutMs = 60000;

PeerRecord parse_record(const std::string& bytes, int expected_rank) {
  EW_REQUIRE(bytes.size() == sizeof(PeerRecord), "intranode: rank ", expected_rank, " sent ", bytes.size(),
             " bytes of buffer description, expected ", sizeof(PeerRecord),
             " (all_gather must return each rank's "
             "bytes unchanged, in rank order)");
  PeerRecord r;
  std::memcpy(&r, bytes.data(), sizeof(r));
  EW_REQUIRE(r.magic == kRecordMagic && r.rank == expected_rank, "intranode: entry ", expected_rank,
             " of all_gather is not rank ", expected_rank, "'s buffer description (got rank ", r.rank, ")");
  return r;
}

}  // namespace

MappedAllocation::MappedAllocation(unsigned long long handle, size_t bytes, size_t alignment, int device) {
  const AllocationHandle owned(handle);
  const DriverApi& d = driver();
  CUdeviceptr address = 0;
  EW_CU_CHECK(d.reserve(&address, bytes, alignment, 0, 0));
  if (const CUresult mapped = d.map(address, bytes, 0, handle, 0); mapped != CUDA_SUCCESS) {
    d.address_free(address, bytes);
    EW_CU_CHECK(mapped);
  }
  CUmemAccessDesc access{};
  access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = device;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  if (const CUresult granted = d.set_access(address, bytes, &access, 1); granted != CUDA_SUCCESS) {
    d.unmap(address, bytes);
    d.address_free(address, bytes);
    EW_CU_CHECK(granted);
  }
  address_ = address;
  bytes_ = bytes;
}

MappedAllocation::~MappedAllocation() {
  driver().unmap(address_, bytes_);
  driver().address_free(address_, bytes_);
}

IpcSymmetricBuffer::IpcSymmetricBuffer(size_t bytes, int rank, int world_size, const AllGatherBytes& all_gather) {
  EW_REQUIRE(world_size >= 1 && world_size <= kMaxIntranodeRanks, "intranode: world_size must be 1..",
             kMaxIntranodeRanks, " (one node), got ", world_size, "; use the internode transport across nodes");
  EW_REQUIRE(rank >= 0 && rank < world_size, "intranode: rank must be in [0, ", world_size, "), got ", rank);
  EW_REQUIRE(bool(all_gather), "intranode: an all_gather function is required to exchange buffer handles");
  const DriverApi& d = driver();

  PeerRecord own{};
  own.magic = kRecordMagic;
  own.rank = rank;
  own.bytes = bytes;
  EW_REQUIRE(gethostname(own.host, sizeof(own.host) - 1) == 0, "gethostname failed");
  EW_CUDA_CHECK(cudaGetDevice(&own.device));
  EW_CUDA_CHECK(cudaDeviceGetPCIBusId(own.pci_bus_id, sizeof(own.pci_bus_id), own.device));
  require_exportable_memory(own.device);
  const CUmemAllocationProp prop = exportable_device_memory(own.device);
  size_t granularity = 0;
  EW_CU_CHECK(d.granularity(&granularity, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED));
  own.mapped_bytes = (bytes + granularity - 1) / granularity * granularity;

  CUmemGenericAllocationHandle handle = 0;
  EW_CU_CHECK(d.create(&handle, own.mapped_bytes, &prop, 0));
  int exported = -1;
  if (const CUresult result = d.export_handle(&exported, handle, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);
      result != CUDA_SUCCESS) {
    d.release(handle);
    EW_CU_CHECK(result);
  }
  const UniqueFd exported_fd(exported);
  local_ = std::make_unique<MappedAllocation>(handle, own.mapped_bytes, granularity, own.device);
  // Peers may signal into the buffer as soon as they have mapped it: it must be zero before we publish it.
  EW_CUDA_CHECK(cudaMemset(local(), 0, own.mapped_bytes));
  EW_CUDA_CHECK(cudaDeviceSynchronize());

  const FdMailbox mailbox;
  EW_REQUIRE(mailbox.name().size() < sizeof(own.mailbox), "intranode: socket name too long");
  std::memcpy(own.mailbox, mailbox.name().c_str(), mailbox.name().size() + 1);
  const std::vector<std::string> gathered = all_gather(std::string(reinterpret_cast<const char*>(&own), sizeof(own)));
  EW_REQUIRE(int(gathered.size()) == world_size, "intranode: all_gather returned ", gathered.size(),
             " entries, expected world_size=", world_size);

  // Every rank checks every record before any rank sends: they see the same records, so all go on or none.
  std::vector<PeerRecord> records;
  for (int peer = 0; peer < world_size; ++peer) {
    const PeerRecord r = parse_record(gathered[peer], peer);
    EW_REQUIRE(std::strncmp(r.host, own.host, sizeof(r.host)) == 0, "intranode: rank ", peer, " runs on host '", r.host,
               "', rank ", rank, " on '", own.host,
               "'; every rank must share one node (use the internode transport across nodes)");
    EW_REQUIRE(r.bytes == bytes && r.mapped_bytes == own.mapped_bytes, "intranode: rank ", peer, " allocated ", r.bytes,
               " bytes (", r.mapped_bytes, " mapped), rank ", rank, " allocated ", bytes, " (", own.mapped_bytes,
               " mapped); every rank must use the same configuration and GPU model");
    if (peer != rank && std::strncmp(r.pci_bus_id, own.pci_bus_id, sizeof(r.pci_bus_id)) != 0) {
      int peer_device = -1, can_access = 0;
      EW_CUDA_CHECK(cudaDeviceGetByPCIBusId(&peer_device, r.pci_bus_id));
      EW_CUDA_CHECK(cudaDeviceCanAccessPeer(&can_access, own.device, peer_device));
      EW_REQUIRE(can_access, "intranode: GPU ", own.pci_bus_id, " of rank ", rank, " cannot access GPU ", r.pci_bus_id,
                 " of rank ", peer, " (no NVLink/PCIe peer path)");
    }
    records.push_back(r);
  }

  for (int peer = 0; peer < world_size; ++peer) {
    if (peer != rank) mailbox.send(records[peer].mailbox, peer, rank, exported_fd.get(), kExchangeTimeoutMs);
  }
  std::vector<uint8_t*> bases(world_size, nullptr);
  bases[rank] = local();
  peers_.resize(world_size);
  for (int received = 0; received + 1 < world_size; ++received) {
    FdMailbox::Received message;
    try {
      message = mailbox.receive(kExchangeTimeoutMs);
    } catch (const RuntimeError& error) {
      std::string missing;
      for (int peer = 0; peer < world_size; ++peer) {
        if (bases[peer] == nullptr) missing += (missing.empty() ? "" : ", ") + std::to_string(peer);
      }
      EW_THROW(RuntimeError, "intranode: rank ", rank, " never received the buffer of rank(s) ", missing, ": ",
               error.what());
    }
    const int peer = message.from_rank;
    EW_REQUIRE(peer >= 0 && peer < world_size && peer != rank && bases[peer] == nullptr, "intranode: rank ", rank,
               " got a memory handle tagged rank ", peer, ", which is not a peer still to be heard from");
    CUmemGenericAllocationHandle imported = 0;
    EW_CU_CHECK(d.import_handle(&imported, reinterpret_cast<void*>(uintptr_t(message.fd.get())),
                                CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR));
    peers_[peer] = std::make_unique<MappedAllocation>(imported, own.mapped_bytes, granularity, own.device);
    bases[peer] = peers_[peer]->get();
  }
  peer_table_ = DeviceBuffer(bases.size() * sizeof(uint8_t*));
  EW_CUDA_CHECK(cudaMemcpy(peer_table_.get(), bases.data(), bases.size() * sizeof(uint8_t*), cudaMemcpyHostToDevice));
}

IpcSymmetricBuffer::~IpcSymmetricBuffer() { cudaDeviceSynchronize(); }

void require_intranode_supported(bool force_puts, int64_t world_size, int device) {
  require_peer_memory_allowed("intranode");
  EW_REQUIRE(!force_puts,
             "intranode: AllToAllOptions.force_puts must be false (peer memory has no puts; the internode transport "
             "sends every byte through puts with it)");
  EW_REQUIRE(world_size <= kMaxIntranodeRanks, "intranode: world_size must be 1..", kMaxIntranodeRanks,
             " (one node), got ", world_size, "; use the internode transport across nodes");
  require_exportable_memory(device);
}

}  // namespace expertwire
