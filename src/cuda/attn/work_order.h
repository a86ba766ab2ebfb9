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

// The table's shape: kTableSlots slots for each of at most kTableMaxCtas CTAs (2.3 KB of the kernel's
// parameters), at most kTableSlots − 1 tiles, then kNoTile, which ends the CTA's list.
inline constexpr int kTableSlots = 8;
inline constexpr int kTableMaxCtas = 144;
inline constexpr uint16_t kNoTile = 0xffff;

// The order of causal work tiles over `heads` (b, h) rows of q_tiles query tiles each and `grid` CTAs.
// A query tile costs in proportion to the keys it sees, which grow along the head, so a head's tiles go
// in pairs of equal total cost, the j-th longest and the j-th shortest (the longer first, slots 2k and
// 2k + 1), and CTA c takes pairs c, c + grid, ..., heads in order (the CTAs share one or two heads' keys
// in L2 at a time); a head with an odd number of query tiles has one single (an empty slot).
// Whole rounds of pairs leave the CTAs equally busy; the rest (the tail) goes out in one of two forms,
// whichever leaves the busiest CTA least busy by the host's cost model (work_order::tile_cost):
// * a table made on the host: the pairs after the last whole rounds but two, as single tiles, longest
//   first to the least busy CTA. CTA c's table slots are table[c · kTableSlots + k], each a rank r among
//   those tiles: pair table_pair0 + r / 2, its longer tile for even r. B1 H16 L32k on 132 CTAs: the
//   busiest CTA sees 4008 key tiles against a mean of 3987.4 (4051 for the singles below, 4112 for plain
//   pairs); the causal kernel alone, against the singles: L32k +0.6-2.0 %, D64 H32 L32k and B4 H32 L8k
//   +1.9 %, B2 L8k ±0 (bench/RESULTS.md, session 38).
// * the last round's pairs as singles, where that round lies in one head and q_tiles is even (the
//   balanced pairs of that head, j near q_tiles / 2): longest first, the first `grid` of them to CTAs 0,
//   1, ... and the rest back from CTA grid − 1, so its longest tile rather than a whole pair sets the end.
//   With an odd number the heads' middle singles already make the full rounds uneven, and singles in
//   the last round could leave a CTA busier than the pairs do (found by tests/cpp/test_work_order.cpp:
//   127 query tiles, 32 heads, 7 CTAs).
// causal_slot keeps the singles' branch after the table's: with it, ptxas schedules the D128 kernels'
// main loops as without the table (SASS identical; without it, a different schedule of the same
// instructions ran the causal kernel 1.5-2.4 % slower, bench/RESULTS.md session 38).
struct CausalOrder {
  int q_tiles = 0;
  int pairs_per_head = 0;
  int pairs = 0;
  int table_from = 0;    // the slot n where the table's slots start (2 · rounds); none: 2 · pairs + 2
  int table_pair0 = 0;   // the table's first pair (rounds · grid)
  int singles_from = 0;  // the slot n where the last round's singles start; none: 2 · pairs + 2
  int singles = 0;       // pairs of the last round handed out as singles
  uint16_t table[kTableMaxCtas * kTableSlots] = {};
};

// Slot n of CTA `cta` (bh, q_tile); kEmpty slots are skipped, kEnd ends the sequence.
SPARGE_HD Slot causal_slot(const CausalOrder& o, int grid, int cta, int n, int* bh, int* q_tile) {
  if (n >= o.table_from) {
    const int rank = o.table[cta * kTableSlots + n - o.table_from];
    if (rank == kNoTile) return Slot::kEnd;
    const int pair = o.table_pair0 + rank / 2;
    const int j = pair % o.pairs_per_head;
    *bh = pair / o.pairs_per_head;
    *q_tile = rank % 2 == 0 ? o.q_tiles - 1 - j : j;
    return Slot::kTile;
  }
  if (n >= o.singles_from) {
    const int k = n - o.singles_from;  // 0: this CTA's first single, 1: its second
    if (k > 1) return Slot::kEnd;
    const int rank = k == 0 ? cta : 2 * grid - 1 - cta;  // among the last round's 2 · singles tiles, longest first
    if (rank >= 2 * o.singles) return k == 0 ? Slot::kEmpty : Slot::kEnd;
    *bh = (o.pairs - 1) / o.pairs_per_head;
    // The last round is pairs j in [pairs_per_head − singles, pairs_per_head) of that head: their longer
    // tiles q_tiles − 1 − j (j ascending), then their shorter ones j (j descending).
    const int j = rank < o.singles ? o.pairs_per_head - o.singles + rank : o.pairs_per_head - 1 - (rank - o.singles);
    *q_tile = rank < o.singles ? o.q_tiles - 1 - j : j;
    return Slot::kTile;
  }
  const int pair = cta + (n / 2) * grid;
  if (pair >= o.pairs) return Slot::kEnd;
  const int j = pair % o.pairs_per_head;
  *bh = pair / o.pairs_per_head;
  *q_tile = n % 2 == 0 ? o.q_tiles - 1 - j : j;
  return n % 2 == 1 && j == o.q_tiles - 1 - j ? Slot::kEmpty : Slot::kTile;
}

namespace work_order {

// The host's cost of a work tile: the key tiles a top-left causal query tile sees, plus its set-up and
// epilogue (about three key tiles' time, bench/RESULTS.md session 32).
inline constexpr int64_t kTileOverhead = 3;

inline int64_t tile_cost(int q_tile) { return q_tile + 1 + kTileOverhead; }

// The busiest CTA's cost under order o, walked as the kernel walks it.
inline int64_t busiest(const CausalOrder& o, int grid) {
  int64_t most = 0;
  for (int c = 0; c < grid; ++c) {
    int64_t load = 0;
    int bh = 0;
    int q_tile = 0;
    for (int n = 0;; ++n) {
      const Slot slot = causal_slot(o, grid, c, n, &bh, &q_tile);
      if (slot == Slot::kEnd) break;
      if (slot == Slot::kTile) load += tile_cost(q_tile);
    }
    most = std::max(most, load);
  }
  return most;
}

// The table for `rounds` whole rounds of pairs before it (o has no singles); false where some CTA would
// need more than kTableSlots − 1 tiles.
inline bool fill_table(CausalOrder* o, int grid, int rounds) {
  struct Tile {
    int64_t cost;
    uint16_t rank;
  };
  // After whole rounds each CTA has `rounds` pairs of q_tiles + 1 key tiles and two set-ups, less a
  // head's middle single's other half (odd q_tiles) where it has one.
  std::vector<int64_t> load(grid, rounds * (o->q_tiles + 1 + 2 * kTileOverhead));
  if (o->q_tiles % 2 == 1) {
    for (int p = o->pairs_per_head - 1; p < rounds * grid; p += o->pairs_per_head) {
      load[p % grid] -= tile_cost(o->q_tiles / 2);
    }
  }
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
    if (taken[c] == kTableSlots - 1) return false;
    o->table[c * kTableSlots + taken[c]++] = t.rank;
    least.emplace(busy + t.cost, c);
  }
  o->table_from = 2 * rounds;
  o->table_pair0 = rounds * grid;
  return true;
}

}  // namespace work_order

// The order for q_tiles, heads, grid >= 1 (host; tens of microseconds at L32k: cached_causal_order
// keeps the recent ones).
inline CausalOrder causal_order(int q_tiles, int heads, int grid) {
  CausalOrder o;
  o.q_tiles = q_tiles;
  o.pairs_per_head = (q_tiles + 1) / 2;
  o.pairs = o.pairs_per_head * heads;
  o.table_from = 2 * o.pairs + 2;
  std::fill(std::begin(o.table), std::end(o.table), kNoTile);
  const int full_rounds = o.pairs / grid;
  const int rest = o.pairs - full_rounds * grid;
  const bool rest_in_one_head = (o.pairs - rest) / o.pairs_per_head == (o.pairs - 1) / o.pairs_per_head;
  const bool singles = q_tiles % 2 == 0 && rest > 0 && rest_in_one_head;
  o.singles_from = singles ? 2 * full_rounds : 2 * o.pairs + 2;
  o.singles = singles ? rest : 0;
  if (rest == 0 || grid > kTableMaxCtas) return o;
  CausalOrder table = o;
  table.singles_from = 2 * o.pairs + 2;
  table.singles = 0;
  for (int extra = 2; extra >= 0; --extra) {
    if (work_order::fill_table(&table, grid, std::max(full_rounds - extra, 0))) {
      return work_order::busiest(table, grid) < work_order::busiest(o, grid) ? table : o;
    }
    std::fill(std::begin(table.table), std::end(table.table), kNoTile);
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
