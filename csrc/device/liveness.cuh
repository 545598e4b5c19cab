// Waiting for peers, in both modes, and the fault-tolerant mode's losses (AllToAllOptions::fault_tolerant).
//
// Default mode: a wait that runs out records a timeout naming the peer; every other wait of the rank then gives
// up too, and the error is sticky.
// Fault-tolerant mode: a wait that runs out gives up on that peer alone: the peer is marked lost in active_ranks,
// the loss is posted to every rank still active (loss_posts), and the phase goes on as if the peer had sent
// nothing. Waits read the posts every so often: a peer another rank has given up on is given up at once, and any
// new loss restarts the clock of the waits still running (the ranks they wait for may themselves be waiting out
// the dead one). Before a combine returns, the ranks agree on the lost set (agree_on_losses): each posts its set
// and takes the union of the others', round after round until no round adds a rank. Every later call skips the
// lost ranks: nothing is sent to them, nothing waited for, none of their memory read.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "device/primitives.cuh"
#include "device/rank_state.h"
#include "device/wire_protocol.h"

namespace expertwire::device {

// Marks `rank` lost; whether it was active until now (then the waits of this rank hear the news).
template <class Peers>
__device__ __forceinline__ bool mark_lost(const Peers& c, uint32_t rank) {
  if (atomicExch(&c.active_ranks()[rank], 0) == 0) return false;
  atomicAdd(&c.liveness()->news, 1u);
  return true;
}

// Word `word` of this rank's lost set, as a LossPost carries it.
template <class Peers>
__device__ __forceinline__ uint32_t lost_bits(const Peers& c, uint32_t word) {
  uint32_t bits = 0;
  const uint32_t first = word * 32, end = min(first + 32, c.world_size());
  for (uint32_t rank = first; rank < end; ++rank) bits |= uint32_t(marked_lost(c, rank)) << (rank - first);
  return bits;
}

// Takes in what every active rank has posted: the ranks they gave up on are lost here too. Then a post that
// names this rank, from a rank still active, means the others masked it out (recorded; every wait then stops):
// only after every loss is in, so that a post of a rank that another post says is lost does not count. Returns
// whether such a post named this rank.
template <class Peers>
__device__ inline bool absorb_loss_posts(const Peers& c, Phase phase) {
  auto post_of = [&](uint32_t source, uint32_t word) {
    return LossPost::lost_bits(*reinterpret_cast<const volatile uint64_t*>(c.local(c.loss_post(source, word))));
  };
  const uint32_t own_word = c.own_rank() / 32, own_bit = 1u << (c.own_rank() % 32);
  for (uint32_t source = 0; source < c.world_size(); ++source) {
    if (source == c.own_rank() || marked_lost(c, source)) continue;
    for (uint32_t word = 0; word < c.loss_words(); ++word) {
      for (uint32_t bits = post_of(source, word) & ~(word == own_word ? own_bit : 0u); bits != 0; bits &= bits - 1) {
        mark_lost(c, word * 32 + uint32_t(__ffs(int(bits)) - 1));
      }
    }
  }
  for (uint32_t source = 0; source < c.world_size(); ++source) {
    if (source != c.own_rank() && !marked_lost(c, source) && (post_of(source, own_word) & own_bit) != 0) {
      record_error(c.error, ErrorCode::kMaskedOut, phase, int32_t(source), 0);
      return true;
    }
  }
  return false;
}

// Whether the others have masked this rank out, as one thread finds it: a post naming it (absorbed now), or the
// record saying so. One thread looks (the record is in host memory), and at what it found itself: another block
// may hold the record's claim without having published its code yet, or an earlier error may hold it for good.
template <class Peers>
__device__ inline bool masked_now(const Peers& c, Phase phase) {
  return absorb_loss_posts(c, phase) || masked_out(c.error);
}

// The fault-tolerant mode's verdicts that every block of a grid must take alike: the first block to settle `word`
// (0 until then) stores `mine` there; every block gets the settled value.
__device__ __forceinline__ uint32_t settle_once(uint32_t* word, uint32_t mine) {
  const uint32_t before = atomicCAS(word, 0u, mine);
  return before == 0 ? mine : before;
}
__device__ __forceinline__ uint64_t settle_once(uint64_t* word, uint64_t mine) {
  const unsigned long long before = atomicCAS(reinterpret_cast<unsigned long long*>(word), 0ull, mine);
  return before == 0 ? mine : uint64_t(before);
}

// Whether this rank may send (the fault-tolerant mode): not once the others have masked it out, whose buffers
// it would write stale rows into (one that was stuck and calls again). Call with the whole block.
template <class Peers>
__device__ inline bool still_serving(const Peers& c, Phase phase) {
  return __syncthreads_or(threadIdx.x == 0 && masked_now(c, phase)) == 0;
}

// still_serving for a whole grid: the first block to look decides (masked_now, or `stopped`, an earlier verdict),
// the others take its verdict through `verdict` (settle_once; the grid's last block out clears it), so that the
// grid's rows and its last block's signals go out together or not at all. Call with the whole block.
template <class Peers>
__device__ inline bool still_serving_grid(const Peers& c, uint32_t* verdict, bool stopped, Phase phase) {
  constexpr uint32_t kServing = 1, kStopped = 2;
  __shared__ bool serving;
  if (threadIdx.x == 0) {
    serving = settle_once(verdict, stopped || masked_now(c, phase) ? kStopped : kServing) == kServing;
  }
  __syncthreads();
  return serving;
}

// The fault-tolerant push receive's count from `source`, the same in every block (settled_counts): the first
// block to settle it takes the count that arrived (`waited`, or one that came just as its wait gave up), else
// the sender is lost; a sender lost before the block looked (`lost_before`) settles as lost, so that a count a
// lost rank writes late is never taken. Returns the DispatchCount, 0 for none.
__device__ inline uint64_t settle_count(const RankContext& c, uint32_t source, uint64_t waited, bool lost_before) {
  const uint64_t* signal = c.local(c.dispatch_count(source));
  uint64_t mine = waited;
  if (mine == 0 && !lost_before) mine = load_acquire_sys(signal);
  if (mine == 0) mine = SettledCount::kLost;
  const uint64_t settled = settle_once(&c.settled_counts()[source], mine);
  if (settled == SettledCount::kLost) return 0;
  if (settled == mine) return mine;
  // Another block took the count: this one acquires it too, for the tokens it guards.
  return load_acquire_sys(signal);
}

// Posts this rank's lost set, under `sequence`, to every rank still active: ranks first_rank, first_rank +
// rank_stride, ... of them (one thread: all; a block: threadIdx.x, blockDim.x).
template <class Peers, class Transport>
__device__ void post_losses(const Peers& c, const Transport& transport, uint32_t sequence, uint32_t first_rank = 0,
                            uint32_t rank_stride = 1) {
  for (uint32_t word = 0; word < c.loss_words(); ++word) {
    const uint64_t post = LossPost::encode(sequence, lost_bits(c, word));
    for (uint32_t rank = first_rank; rank < c.world_size(); rank += rank_stride) {
      if (rank != c.own_rank() && !marked_lost(c, rank))
        transport.signal(int(rank), c.loss_post(c.own_rank(), word), post);
    }
  }
}

// The bound of a wait for `peer` (-1: several): WaitBound's in the default mode. In the fault-tolerant mode it
// gives up as soon as the peer is lost or this rank was masked out, and counts its timeout anew from each loss
// this rank hears of.
template <class Transport, class Peers>
class PeerBound {
 public:
  __device__ PeerBound(const Transport&, const Peers& c, Phase phase, int32_t peer)
      : c_(c), phase_(phase), peer_(peer) {
    if constexpr (Transport::kFaultTolerant) news_ = *reinterpret_cast<const volatile uint32_t*>(&c.liveness()->news);
  }
  __device__ __forceinline__ bool ran_out() {
    if ((++polls_ & 1023) == 0) {
      if constexpr (!Transport::kFaultTolerant) {
        if (wait_failed(c_.error)) return true;
      } else {
        // A post naming this rank stops the wait even where the record already holds another error.
        if (absorb_loss_posts(c_, phase_) || masked_out(c_.error)) return true;
        if (peer_ >= 0 && marked_lost(c_, uint32_t(peer_))) return true;
        const uint32_t news = *reinterpret_cast<const volatile uint32_t*>(&c_.liveness()->news);
        if (news != news_) start_ = 0;
        news_ = news;
      }
    }
    const uint64_t now = global_timer_ns();
    if (start_ == 0) start_ = now;
    return now - start_ > c_.timeout_ns;
  }

 private:
  const Peers& c_;
  Phase phase_;
  int32_t peer_;
  uint64_t start_ = 0;
  uint32_t polls_ = 0;
  uint32_t news_ = 0;
};

// What a wait that gave up on `peer` leaves behind: the default mode's sticky timeout; in the fault-tolerant
// mode the peer lost and the loss posted (nothing, once this rank was masked out). The peer itself hears of it
// where its memory is mapped (a store, which a dead peer's mapping takes harmlessly; no put to a dead peer):
// one that was only stuck then finds itself masked out when it calls again (absorb_loss_posts).
template <class Peers, class Transport>
__device__ void give_up_on(const Peers& c, const Transport& transport, Phase phase, uint32_t peer) {
  if constexpr (!Transport::kFaultTolerant) {
    record_timeout(c.error, c.timeout_ns, phase, int32_t(peer));
  } else if (peer == c.own_rank()) {
    record_timeout(c.error, c.timeout_ns, phase, int32_t(peer));  // a rank never gives up on itself
  } else if (!masked_out(c.error) && mark_lost(c, peer)) {
    const uint32_t sequence = c.liveness()->posted;
    post_losses(c, transport, sequence);
    for (uint32_t word = 0; word < c.loss_words(); ++word) {
      if (uint64_t* mapped = transport.peer(int(peer), c.loss_post(c.own_rank(), word))) {
        store_release_sys(mapped, LossPost::encode(sequence, lost_bits(c, word)));
      }
    }
  }
}

// The one wait for a peer's signal: until done(*signal) holds for a value `peer` writes, which it returns; 0
// when this rank gives up on the peer (give_up_on), at once for a lost one. One thread.
template <class Peers, class Transport, class Done>
__device__ uint64_t wait_for_peer(const Peers& c, const Transport& transport, const uint64_t* signal, Done done,
                                  Phase phase, uint32_t peer) {
  if (is_lost(transport, c, peer)) return 0;
  uint64_t value = 0;
  PeerBound bound(transport, c, phase, int32_t(peer));
  if (wait_until([&] { return done(value = load_acquire_sys(signal)); }, bound)) return value;
  give_up_on(c, transport, phase, peer);
  return 0;
}

// One agreement, by one block: rounds of posting this rank's lost set to every active rank and taking the union
// of theirs, until a round adds no rank (or kMaxRound rounds), then a final post, which a rank still in a later
// round takes as this one's last word. A rank that dies during the agreement may leave the survivors with
// different sets for this call; the next call's waits and agreement make them equal.
template <class Peers, class Transport>
__device__ void run_agreement(const Peers& c, const Transport& transport, uint32_t call, Phase phase) {
  LivenessWords* words = c.liveness();
  __shared__ uint32_t news_before;
  __shared__ bool settled;
  uint32_t round = 1;
  for (;; ++round) {
    const uint32_t sequence = LossPost::sequence(call, round);
    if (threadIdx.x == 0) {
      absorb_loss_posts(c, phase);
      news_before = words->news;
      words->posted = sequence;
    }
    __syncthreads();
    post_losses(c, transport, sequence, threadIdx.x, blockDim.x);
    for (uint32_t rank = threadIdx.x; rank < c.world_size(); rank += blockDim.x) {
      for (uint32_t word = 0; word < c.loss_words() && rank != c.own_rank(); ++word) {
        wait_for_peer(
            c, transport, c.local(c.loss_post(rank, word)),
            [&](uint64_t post) { return LossPost::reached(post, sequence); }, phase, rank);
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      absorb_loss_posts(c, phase);
      settled = words->news == news_before || masked_out(c.error) || round == LossPost::kMaxRound;
    }
    __syncthreads();
    if (settled) break;
  }
  const uint32_t final_sequence = LossPost::sequence(call, round | LossPost::kFinal);
  if (threadIdx.x == 0) words->posted = final_sequence;
  post_losses(c, transport, final_sequence, threadIdx.x, blockDim.x);
}

// The agreement on the lost set, called by every block of a grid once its waits are done (so that the set covers
// every one of them): the last block out (counted on `waits_done`, a phase counter this resets) agrees, the others
// wait for it. On return active_ranks is this call's final mask, which the phase after the waits then applies.
// Call with the whole block.
template <class Peers, class Transport>
__device__ void agree_on_losses(const Peers& c, const Transport& transport, uint32_t* waits_done, Phase phase) {
  LivenessWords* words = c.liveness();
  __shared__ uint32_t call;
  // Every block reads the count before it counts out; the last one out advances it.
  if (threadIdx.x == 0) call = *reinterpret_cast<const volatile uint32_t*>(&words->calls);
  if (last_block_out(waits_done)) {
    run_agreement(c, transport, call, phase);
    __syncthreads();
    if (threadIdx.x == 0) {
      words->calls = call + 1;
      store_release_gpu(&words->agreed, call + 1);
      *waits_done = 0;
    }
  } else if (threadIdx.x == 0) {
    // Bounded as every wait is. An agreement runs at most min(world_size, kMaxRound) + 1 rounds (a round that
    // does not settle masks a rank), and a round's waits end a timeout after the last loss they hear of (at most
    // world_size of them).
    const uint64_t world = c.world_size();
    const uint64_t rounds = (world < LossPost::kMaxRound ? world : LossPost::kMaxRound) + 1;
    const uint64_t limit = c.timeout_ns * rounds * (world + 1);
    WaitBound bound(limit, c.error);
    if (!wait_until([&] { return load_acquire_gpu(&words->agreed) == call + 1; }, bound, 64)) {
      record_timeout(c.error, limit, phase, int32_t(c.own_rank()));
    }
  }
  __syncthreads();
}

}  // namespace expertwire::device
