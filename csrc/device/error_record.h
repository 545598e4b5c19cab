// The error record a kernel fills instead of asserting; the host reads it and raises DeviceError.
// Plain C++ so host code can include it without CUDA.
#pragma once

#include <cstdint>
#include <string>

#include "device/wire_protocol.h"
#include "expertwire/dtype.h"

namespace expertwire {

enum class ErrorCode : int32_t {
  kNone = 0,
  kTimeout = 1,           // a wait for a peer's signal ran out of time; peer = the rank waited for
  kBadExpertIndex = 2,    // indices[t][k] outside [0, num_experts); value = the index, nothing was sent for it
  kBadBoundM = 3,         // *bound_m > m; value = *bound_m, the call moved no tokens
  kSlotOverflow = 4,      // more than max_num_tokens tokens for one expert (a repeated expert in a row)
  kRepeatedExpert = 5,    // an expert appears twice in one token's row; value = the expert, sent once
  kRowTypeMismatch = 6,   // peer's combine rows travel as another type than ours; value = RowTypeMismatch, no
                          // output written
  kCapacityExceeded = 7,  // a high-throughput dispatch needs more rows than its capacity; value = the rows
                          // needed, none written
  kPayloadMismatch = 8,   // a peer's high-throughput dispatch sends another payload size per token than ours;
                          // peer = that rank, value = its bytes, no row written
  kMaskedOut = 9,         // fault-tolerant mode: the other ranks gave up on this one; peer = the rank that said so
};

enum class Phase : int32_t {
  kNone = 0,
  kDispatchSend = 1,
  kDispatchRecv = 2,
  kCombineSend = 3,
  kCombineRecv = 4,
};

// Written by the first error of a kernel (record_error): it claims the record, fills phase, peer and value, and
// publishes `code` last, so a reader that sees a code sees the fields that go with it.
struct ErrorRecord {
  ErrorCode code;
  Phase phase;
  int32_t peer;     // rank waited for, or -1
  int32_t claimed;  // 1 once an error has taken the record (its code may not be published yet)
  int64_t value;
};

inline const char* phase_name(Phase phase) {
  switch (phase) {
    case Phase::kDispatchSend: return "dispatch send";
    case Phase::kDispatchRecv: return "dispatch receive";
    case Phase::kCombineSend: return "combine send";
    case Phase::kCombineRecv: return "combine receive";
    default: return "unknown phase";
  }
}

// One sentence for the host exception.
inline std::string describe(const ErrorRecord& record, int64_t rank) {
  const std::string where = std::string(" in ") + phase_name(record.phase) + " on rank " + std::to_string(rank);
  switch (record.code) {
    case ErrorCode::kTimeout:
      return "timed out after " + std::to_string(record.value) + " ms waiting for rank " + std::to_string(record.peer) +
             where;
    case ErrorCode::kBadExpertIndex: return "expert index " + std::to_string(record.value) + " out of range" + where;
    case ErrorCode::kBadBoundM: return "bound_m = " + std::to_string(record.value) + " exceeds m" + where;
    case ErrorCode::kSlotOverflow:
      return "more than max_num_tokens tokens for expert " + std::to_string(record.value) +
             " (repeated expert in a token's row?)" + where;
    case ErrorCode::kRepeatedExpert:
      return "expert " + std::to_string(record.value) + " appears twice in one token's row" + where;
    case ErrorCode::kRowTypeMismatch:
      return std::string("rank ") + std::to_string(record.peer) + "'s expert rows travel as " +
             scalar_type_name(RowTypeMismatch::peer(record.value)) + ", this rank's as " +
             scalar_type_name(RowTypeMismatch::own(record.value)) +
             " (a rank's rows travel as its expert_y's type, or as its out_tokens' with a float32 expert_y, and "
             "must travel alike on every rank); no output written" +
             where;
    case ErrorCode::kCapacityExceeded:
      return "the dispatch needs " + std::to_string(record.value) +
             " rows, more than the receive capacity (HighThroughputConfig.recv_capacity, or the outputs' "
             "capacity_rows); no row written" +
             where;
    case ErrorCode::kPayloadMismatch:
      return "rank " + std::to_string(record.peer) + " dispatches " + std::to_string(record.value) +
             " payload bytes per token, not this rank's (x_bytes must be equal on every rank); no row written" + where;
    case ErrorCode::kMaskedOut:
      return "rank " + std::to_string(record.peer) +
             " reports that the ranks gave up on this one (it was too late for them or stopped calling) and masked "
             "it out; the survivors go on without it, so this object cannot rejoin them" +
             where;
    default: return "no error";
  }
}

}  // namespace expertwire
