// The wire protocol: every encoding ranks exchange through each other's buffers (signals, epochs, arrivals,
// routes, sentinels), and the shared-memory layouts of the kernels. Plain C++, so host code and unit tests see the
// same encodings the kernels use.
//
// One call is a dispatch then a combine, and every rank takes part in both. Each comes in two forms, chosen
// once per object and the same on every rank (AllToAllInternode agrees on it at construction):
//
// Pull (every peer's buffer is load/store reachable: NVLink, or ranks sharing a GPU). Each token's bytes move
// once.
//   dispatch send   announce this dispatch's epoch and m (DispatchEpoch, send_announce), then stage each token
//                   (header, payload, scales) in send_rows and stamp it with the epoch (send_stamps) once it is
//                   written. Rows the caller wrote there itself (dispatch_input_buffer) are not copied.
//   dispatch recv   copy each stamped token of the sender of our dp_rank in each group, as soon as it is
//                   stamped, from the sender's send_rows to every local expert its row names, at that expert's
//                   next free row; record where each (group, token, k) landed in combine_slots.
//   combine send    when expert_y is our expert_outputs, nothing moves; else (the caller's expert_y, which no
//                   peer can read) push its rows as the push combine does. Then each block adds its share to
//                   every rank's combine_done (ArrivalSignal) with CombineArrival saying which of the two.
//   combine recv    wait until every rank's combine_done is complete, then out[t] = sum_k w[t][k] * row(t, k),
//                   each row read from our combine_recv if its owner pushed it, else straight from the owner's
//                   expert_outputs at the slot it recorded.
// Push (some peer is reachable only through puts: another node). Each token goes once to each rank that owns
// one of its experts.
//   dispatch send   put each token into slot atomicAdd(send_counts[rank]) of the owner's dispatch_recv region
//                   for our DP group; the last block out sends every rank its count + 1 (dispatch_counts),
//                   zeros included, so every receiver hears from every sender.
//   dispatch recv   wait for all world_size counts, copy each received token to every local expert its row
//                   names and remember each row's route (TokenRoute).
//   combine send    put each row of expert_y back to row (token, k) of combine_recv of every rank of its source
//                   group (a float32 expert_y's rows as out_tokens' 16-bit type); then the last block out adds
//                   the whole grid's share to every rank's combine_done (one remote atomic per peer, not one per
//                   block: ArrivalSignal::share(0, 1, payload)).
//   combine recv    as the pull form, every row from combine_recv.
// Why no state is overwritten while a peer still reads it, and when each is reset: device/rank_state.h.
#pragma once

#include <cstdint>

#include "core/layout.h"
#include "expertwire/dtype.h"
#include "expertwire/host_device.h"

namespace expertwire {

// A u64 signal that every block of the sending rank adds its share to once, as soon as that block's part of
// the phase is written: no block waits for the others before peers hear of its work. (Where the signals are
// remote atomics, the last block out adds them all at once, as a grid of one block.) Bits 0..15 count the
// blocks that arrived; block 0 also adds a 24-bit payload (bits 16..39) and the sender's block count (bits
// 40..). Complete when the count reaches the block count; 0 until block 0 arrives.
struct ArrivalSignal {
  static constexpr uint32_t kMaxBlocks = 0xffff;
  static constexpr uint32_t kMaxPayload = 0xffffff;
  EW_HOST_DEVICE static constexpr uint64_t share(uint32_t block, uint32_t blocks, uint32_t payload) {
    return 1 + (block == 0 ? (uint64_t(payload) << 16) | (uint64_t(blocks) << 40) : 0);
  }
  EW_HOST_DEVICE static constexpr bool complete(uint64_t value) {
    return (value >> 40) != 0 && (value & kMaxBlocks) == (value >> 40);
  }
  EW_HOST_DEVICE static constexpr uint32_t payload(uint64_t value) { return uint32_t(value >> 16) & kMaxPayload; }
};

// The pull dispatch's epoch and announcement (send_announce, send_stamps). The epoch follows from the workspace
// counter of finished dispatches (dispatch_epoch), which counts modulo kPeriod: epochs run 1..kPeriod and again,
// never 0 (what a fresh buffer's stamps hold), and two dispatches in a row never share one. Every rank counts
// the same collective calls, and the counter lives on the device so that CUDA graph replays advance it too.
// The announcement packs the epoch with the sender's token count.
struct DispatchEpoch {
  static constexpr uint32_t kPeriod = 0xffffffffu;
  EW_HOST_DEVICE static constexpr uint32_t of(uint32_t finished) { return finished % kPeriod + 1; }
  // The counter once one more dispatch has finished.
  EW_HOST_DEVICE static constexpr uint32_t advance(uint32_t finished) {
    return of(finished) == kPeriod ? 0u : of(finished);
  }
  EW_HOST_DEVICE static constexpr uint64_t announcement(uint32_t epoch, uint32_t m) {
    return (uint64_t(epoch) << 32) | m;
  }
  EW_HOST_DEVICE static constexpr uint32_t announced_epoch(uint64_t value) { return uint32_t(value >> 32); }
  EW_HOST_DEVICE static constexpr uint32_t announced_tokens(uint64_t value) { return uint32_t(value); }
};

// The push dispatch's count from one sender (dispatch_counts): count + 1, so that 0 means "not arrived".
struct DispatchCount {
  EW_HOST_DEVICE static constexpr uint64_t encode(uint32_t tokens) { return uint64_t(tokens) + 1; }
  EW_HOST_DEVICE static constexpr bool arrived(uint64_t value) { return value != 0; }
  EW_HOST_DEVICE static constexpr uint32_t tokens(uint64_t value) { return uint32_t(value - 1); }
};

// The fault-tolerant push receive's settled count of a sender (settled_counts): 0 until a block settles it, then
// the DispatchCount it took, or kLost for a sender given up on before its count arrived.
struct SettledCount {
  static constexpr uint64_t kLost = ~uint64_t{0};
};

// Where a sender's rows start at a receiver, as the receiver derived it (the high-throughput kind's recv_bases, the
// fault-tolerant mode): (dispatch << 32) | first row, dispatch being the receiver's count of dispatches (from 1),
// 32 bits of it. Senders place their rows by it, so that receivers whose masks differ for a call still agree with
// every sender on where each row goes.
struct RecvBase {
  EW_HOST_DEVICE static constexpr uint64_t encode(uint64_t dispatch, uint32_t first_row) {
    return (uint64_t(uint32_t(dispatch)) << 32) | first_row;
  }
  EW_HOST_DEVICE static constexpr bool of(uint64_t value, uint64_t dispatch) {
    return uint32_t(value >> 32) == uint32_t(dispatch);
  }
  EW_HOST_DEVICE static constexpr uint32_t first_row(uint64_t value) { return uint32_t(value); }
};

// Where a received token came from (routes, one per row of out_expert_x); packed into 8 bytes.
struct TokenRoute {
  uint32_t token;
  uint16_t source_group;
  uint16_t k;
};
static_assert(sizeof(TokenRoute) == kTokenRouteBytes, "route table rows are kTokenRouteBytes");

// Where a rank's combine rows are for their readers.
enum CombineRowsAt : uint32_t {
  kRowsInOwnerBuffer = 0,  // the owner's expert_outputs, at the slot the pull dispatch recorded (pull combine)
  kRowsPushed = 1,         // the reader's own combine_recv[token][k]
};

// What a rank's combine_done arrival tells its readers (the payload of its ArrivalSignal): where its rows are
// (bit 0) and the 16-bit type they travel as (the bits above). Each rank passes its own expert_y, so the types
// may differ by mistake, and a reader that summed another type's bits would return garbage: it refuses
// (kRowTypeMismatch).
struct CombineArrival {
  EW_HOST_DEVICE static constexpr uint32_t payload(CombineRowsAt at, ScalarType row_type) {
    return uint32_t(at) | (uint32_t(row_type) << 1);
  }
  EW_HOST_DEVICE static constexpr CombineRowsAt rows_at(uint32_t payload) { return CombineRowsAt(payload & 1u); }
  EW_HOST_DEVICE static constexpr ScalarType row_type(uint32_t payload) { return ScalarType(payload >> 1); }
};

// kRowTypeMismatch's value in the error record: the peer's row type and this rank's (ScalarType codes).
struct RowTypeMismatch {
  EW_HOST_DEVICE static constexpr int64_t value(ScalarType peer, ScalarType own) {
    return int64_t(peer) << 8 | int64_t(own);
  }
  static constexpr ScalarType peer(int64_t value) { return ScalarType(value >> 8); }
  static constexpr ScalarType own(int64_t value) { return ScalarType(value & 0xff); }
};

// A pull-receive warp's view of one sender (shared memory, one u32 per source group): 0 until the warp has
// read the sender's announcement of this dispatch, then the sender's m + 1, with kAllTaken set once the grid
// has taken every token of the sender.
struct SenderView {
  static constexpr uint32_t kAllTaken = 0x80000000u;
  EW_HOST_DEVICE static constexpr uint32_t heard(uint32_t tokens) { return tokens + 1; }
  EW_HOST_DEVICE static constexpr bool is_heard(uint32_t view) { return view != 0; }
  EW_HOST_DEVICE static constexpr bool all_taken(uint32_t view) { return (view & kAllTaken) != 0; }
  EW_HOST_DEVICE static constexpr uint32_t tokens(uint32_t view) { return (view & ~kAllTaken) - 1; }
};

// What a rank tells the others of the ranks it has given up on (loss_posts, the fault-tolerant mode;
// device/liveness.cuh): a word per 32 ranks, (sequence << 32) | lost bits. The sequence orders one rank's posts:
// the call (its count of finished agreements, 24 bits) and the stage, the agreement's round (1..kMaxRound), with
// kFinal once that rank has agreed. A post between agreements repeats the last sequence with more bits, so a
// reader may take any post at or after the one it waits for. Several threads of a rank may post at once, and
// one with fewer bits may land last: a reader can see fewer bits than the rank holds, which its next round's
// post then carries (a round that adds a rank is never the last).
struct LossPost {
  static constexpr uint32_t kMaxRound = 0x7f;
  static constexpr uint32_t kFinal = 0x80;
  EW_HOST_DEVICE static constexpr uint32_t sequence(uint32_t call, uint32_t stage) { return (call << 8) | stage; }
  EW_HOST_DEVICE static constexpr uint64_t encode(uint32_t sequence, uint32_t lost_bits) {
    return (uint64_t(sequence) << 32) | lost_bits;
  }
  EW_HOST_DEVICE static constexpr uint32_t lost_bits(uint64_t post) { return uint32_t(post); }
  // Whether `post` is `sequence` or later (modulo 2^32: ranks are never 2^23 calls apart).
  EW_HOST_DEVICE static constexpr bool reached(uint64_t post, uint32_t sequence) {
    return int32_t(uint32_t(post >> 32) - sequence) >= 0;
  }
};

// Shared memory of each kernel, per block.
inline constexpr uint64_t kMaxDefaultSharedBytes = 48 << 10;  // more needs an opt-in attribute
// The push dispatch's receive: each source group's token count, then their exclusive scan (groups + 1 words).
struct PushDispatchShared {
  EW_HOST_DEVICE static uint64_t group_count_word() { return 0; }
  EW_HOST_DEVICE static uint64_t group_start_word(const BufferLayout& l) { return l.num_dp_groups; }
  static uint64_t bytes(const BufferLayout& l) { return (2 * uint64_t(l.num_dp_groups) + 1) * sizeof(uint32_t); }
};
// The pull dispatch's receive: each warp's SenderView of every source group.
struct PullDispatchShared {
  EW_HOST_DEVICE static uint64_t warp_views_word(const BufferLayout& l, uint32_t warp) {
    return uint64_t(warp) * l.num_dp_groups;
  }
  static uint64_t bytes(const BufferLayout& l, uint32_t threads) {
    return uint64_t(threads / 32) * l.num_dp_groups * sizeof(uint32_t);
  }
};
// Combine: each local expert's received row count (num_local_experts + 1 words, the last unused), its first
// row plus the total (an exclusive scan), then a bit per rank (the pull receive's note of which ranks pushed
// their rows).
struct CombineShared {
  EW_HOST_DEVICE static uint64_t expert_total_word() { return 0; }
  EW_HOST_DEVICE static uint64_t expert_start_word(const BufferLayout& l) { return uint64_t(l.num_local_experts) + 1; }
  EW_HOST_DEVICE static uint64_t rank_bits_word(const BufferLayout& l) { return 2 * expert_start_word(l); }
  EW_HOST_DEVICE static uint64_t rank_bit_words(const BufferLayout& l) { return (uint64_t(l.world_size) + 31) / 32; }
  static uint64_t bytes(const BufferLayout& l) { return (rank_bits_word(l) + rank_bit_words(l)) * sizeof(uint32_t); }
};

}  // namespace expertwire
