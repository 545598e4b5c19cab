#include "transport/common/agreement.h"

#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "core/error.h"

namespace expertwire {
namespace {

// What each rank tells the others. Fixed size and trivially copyable: sent as raw bytes.
struct AgreementRecord {
  uint32_t magic;
  int32_t rank;
  uint32_t own_checks_failed;
  uint32_t reserved;
  LayoutSignature signature;
};
constexpr uint32_t kAgreementMagic = 0x65776167;  // "ewag"

AgreementRecord parse_record(const char* transport, const std::string& bytes, int expected_rank) {
  EW_REQUIRE(bytes.size() == sizeof(AgreementRecord), transport, ": entry ", expected_rank, " of all_gather holds ",
             bytes.size(), " bytes of agreement record, expected ", sizeof(AgreementRecord),
             " (all_gather must return each rank's bytes unchanged, in rank order)");
  AgreementRecord record;
  std::memcpy(&record, bytes.data(), sizeof(record));
  EW_REQUIRE(record.magic == kAgreementMagic && record.rank == expected_rank, transport, ": entry ", expected_rank,
             " of all_gather is not rank ", expected_rank, "'s agreement record (got rank ", record.rank, "'s)");
  return record;
}

}  // namespace

void agree_before_allocating(const char* transport, int rank, int world_size, const AllGatherBytes& all_gather,
                             const std::function<LayoutSignature()>& own_checks) {
  AgreementRecord own{};
  std::exception_ptr own_error;
  try {
    own.signature = own_checks();
  } catch (const Error&) {
    own_error = std::current_exception();
  }
  own.magic = kAgreementMagic;
  own.rank = rank;
  own.own_checks_failed = own_error ? 1 : 0;
  const std::vector<std::string> gathered = all_gather(std::string(reinterpret_cast<const char*>(&own), sizeof(own)));
  if (own_error) std::rethrow_exception(own_error);
  EW_REQUIRE(int64_t(gathered.size()) == world_size, transport, ": all_gather returned ", gathered.size(),
             " entries, expected world_size=", world_size);
  std::vector<LayoutSignature> by_rank;
  int failed_rank = -1;
  for (int peer = 0; peer < world_size; ++peer) {
    const AgreementRecord record = parse_record(transport, gathered[peer], peer);
    if (record.own_checks_failed != 0 && failed_rank < 0) failed_rank = peer;
    by_rank.push_back(record.signature);
  }
  EW_REQUIRE(failed_rank < 0, transport, ": rank ", failed_rank,
             " could not construct its all-to-all (its own error says why), so no rank does");
  require_same_layout(by_rank);
}

}  // namespace expertwire
