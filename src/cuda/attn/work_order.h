// The order in which the persistent wgmma attention kernel's CTAs take causal work tiles. Host and
// device code: the launcher builds it (causal_order, host), the kernel walks it (causal_slot), the CPU
// tests check that every work tile is taken exactly once and how even the CTAs' loads come out.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <iterator>
#include <mutex>
#include <queue>
#include <utility>
#include <vector>

#include "sparge/layout.h"

namespace sparge::cuda {

// What slot n of a CTA's sequence of work tiles holds: a work tile, a piece of a split work tile
// (non-causal split tails only), nothing (skipped), or the end of the sequence.
enum class Slot { kTile, kPiece, kEmpty, kEnd };

// The tail's table: at most kTailSlots tiles for each of at most kTailMaxCtas CTAs (2.3 KB of the kernel's
// parameters); kNoTile ends a CTA's list. Grids of more CTAs, or tails that would need more slots, run
// plain pairs.
inline constexpr int kTailSlots = 8;
inline constexpr int kTailMaxCtas = 144;
inline constexpr uint16_t kNoTile = 0xffff;

// The order of causal work tiles over `heads` (b, h) rows of q_tiles query tiles each and `grid` CTAs.
// A query tile costs in proportion to the keys it sees, which grow along the head, so a head's tiles go
// in pairs of equal total cost, the j-th longest and the j-th shortest (the longer first, slots 2k and
// 2k + 1), and CTA c takes pairs c, c + grid, ..., heads in order (the CTAs share one or two heads' keys
// in L2 at a time); a head with an odd number of query tiles has one single (an empty slot).
// Whole rounds of pairs leave the CTAs equally busy; the pairs after the last `rounds` whole rounds (the
// tail: the rest plus up to two whole rounds, a few heads at most) go out as single tiles by a table made
// on the host, longest tile first to the least busy CTA. B1 H16 L32k on 132 CTAs: the busiest CTA sees
// 4008 key tiles against a mean of 3987.4 (the last round alone as singles, longest first: 4051; plain
// pairs: 4112), and the causal kernel alone runs 1.5 % faster than with the last round as singles
// (B2 L8k 3.7 %, D64 H32 L32k 1.4 %; bench/RESULTS.md, session 38). CTA c's tail slots are
// tail[c · kTailSlots + k], each a rank r among the tail's tiles: pair tail_pair0 + r / 2, its longer
// tile for even r.
struct CausalOrder {
  int q_tiles = 0;
  int pairs_per_head = 0;
  int pairs = 0;
  int tail_from = 0;   // the slot n where the tail starts (2 · rounds); pairs only: past every pair slot
  int tail_pair0 = 0;  // the tail's first pair (rounds · grid)
  uint16_t tail[kTailMaxCtas * kTailSlots] = {};
};

// Slot n of CTA `cta` (bh, q_tile); kEmpty slots are skipped, kEnd ends the sequence.
SPARGE_HD Slot causal_slot(const CausalOrder& o, int grid, int cta, int n, int* bh, int* q_tile) {
  int pair = 0;
  bool longer = true;
  if (n >= o.tail_from) {
    const int k = n - o.tail_from;
    const int rank = k < kTailSlots ? o.tail[cta * kTailSlots + k] : kNoTile;
    if (rank == kNoTile) return Slot::kEnd;
    pair = o.tail_pair0 + rank / 2;
    longer = rank % 2 == 0;
  } else {
    pair = cta + (n / 2) * grid;
    if (pair >= o.pairs) return Slot::kEnd;
    longer = n % 2 == 0;
  }
  const int j = pair % o.pairs_per_head;
  *bh = pair / o.pairs_per_head;
  *q_tile = longer ? o.q_tiles - 1 - j : j;
  return !longer && j == o.q_tiles - 1 - j ? Slot::kEmpty : Slot::kTile;
}

namespace work_order {

// The host's cost of a work tile: the key tiles a top-left causal query tile sees, plus its set-up and
// epilogue (about three key tiles' time, bench/RESULTS.md session 32).
inline constexpr int64_t kTileOverhead = 3;

inline int64_t tile_cost(int q_tile) { return q_tile + 1 + kTileOverhead; }

// The CTAs' loads after pairs [0, n_pairs), pair p on CTA p % grid: a pair costs q_tiles + 1 key tiles
// and two set-ups, a head's middle single (odd q_tiles) only its own.
inline std::vector<int64_t> pair_loads(const CausalOrder& o, int grid, int n_pairs) {
  std::vector<int64_t> load(grid);
  for (int c = 0; c < grid; ++c) {
    load[c] = (n_pairs / grid + (c < n_pairs % grid ? 1 : 0)) * (o.q_tiles + 1 + 2 * kTileOverhead);
  }
  if (o.q_tiles % 2 == 1) {
    for (int p = o.pairs_per_head - 1; p < n_pairs; p += o.pairs_per_head) load[p % grid] -= tile_cost(o.q_tiles / 2);
  }
  return load;
}

// Fills the tail's table for `rounds` whole rounds of pairs before it; returns the busiest CTA's load, or
// -1 where some CTA would need more than kTailSlots tiles.
inline int64_t fill_tail(CausalOrder* o, int grid, int rounds) {
  struct Tile {
    int64_t cost;
    uint16_t rank;
  };
  const std::vector<int64_t> load = pair_loads(*o, grid, rounds * grid);
  std::vector<Tile> tiles;
  for (int p = rounds * grid; p < o->pairs; ++p) {
    const int j = p % o->pairs_per_head;
    const auto rank = static_cast<uint16_t>(2 * (p - rounds * grid));
    tiles.push_back({tile_cost(o->q_tiles - 1 - j), rank});
    if (j != o->q_tiles - 1 - j) tiles.push_back({tile_cost(j), static_cast<uint16_t>(rank + 1)});
  }
  std::stable_sort(tiles.begin(), tiles.end(), [](const Tile& a, const Tile& b) { return a.cost > b.cost; });
  // Longest first to the least busy CTA (the lowest index among equals), so each CTA's slots run longest first.
  std::vector<int> taken(grid, 0);
  std::priority_queue<std::pair<int64_t, int>, std::vector<std::pair<int64_t, int>>, std::greater<>> least;
  for (int c = 0; c < grid; ++c) least.emplace(load[c], c);
  for (const Tile& t : tiles) {
    const auto [busy, c] = least.top();
    least.pop();
    if (taken[c] == kTailSlots) return -1;
    o->tail[c * kTailSlots + taken[c]++] = t.rank;
    least.emplace(busy + t.cost, c);
  }
  int64_t busiest = 0;
  for (; !least.empty(); least.pop()) busiest = std::max(busiest, least.top().first);
  o->tail_from = 2 * rounds;
  o->tail_pair0 = rounds * grid;
  return busiest;
}

}  // namespace work_order

// The order for q_tiles, heads, grid >= 1 (host; tens of microseconds at L32k: cached_causal_order
// keeps the recent ones).
inline CausalOrder causal_order(int q_tiles, int heads, int grid) {
  CausalOrder o;
  o.q_tiles = q_tiles;
  o.pairs_per_head = (q_tiles + 1) / 2;
  o.pairs = o.pairs_per_head * heads;
  o.tail_from = 2 * o.pairs + 2;
  std::fill(std::begin(o.tail), std::end(o.tail), kNoTile);
  if (o.pairs % grid == 0 || grid > kTailMaxCtas) return o;
  // A tail table where it leaves the busiest CTA less busy than plain pairs do.
  const std::vector<int64_t> pairs_only = work_order::pair_loads(o, grid, o.pairs);
  const int64_t pairs_busiest = *std::max_element(pairs_only.begin(), pairs_only.end());
  for (int extra = 2; extra >= 0; --extra) {
    CausalOrder t = o;
    const int64_t busiest = work_order::fill_tail(&t, grid, std::max(o.pairs / grid - extra, 0));
    if (busiest >= 0) return busiest < pairs_busiest ? t : o;
  }
  return o;
}

// causal_order through a small cache of the recently used (q_tiles, heads, grid), shared by the threads.
inline CausalOrder cached_causal_order(int q_tiles, int heads, int grid) {
  struct Entry {
    int q_tiles = 0;
    int heads = 0;
    int grid = 0;
    CausalOrder order;
  };
  constexpr size_t kEntries = 8;
  static std::mutex mutex;
  static std::vector<Entry> entries;  // the most recently used last
  const std::lock_guard<std::mutex> lock(mutex);
  auto hit = std::find_if(entries.begin(), entries.end(), [&](const Entry& e) {
    return e.q_tiles == q_tiles && e.heads == heads && e.grid == grid;
  });
  if (hit != entries.end()) {
    std::rotate(hit, hit + 1, entries.end());
  } else {
    if (entries.size() == kEntries) entries.erase(entries.begin());
    entries.push_back({q_tiles, heads, grid, causal_order(q_tiles, heads, grid)});
  }
  return entries.back().order;
}

}  // namespace sparge::cuda
