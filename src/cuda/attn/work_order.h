// The order in which the persistent wgmma attention kernel's CTAs take causal work tiles. Host and
// device code: the kernel calls it, the CPU tests check that every work tile is taken exactly once.
#pragma once

#include "sparge/layout.h"

namespace sparge::cuda {

// What slot n of a CTA's sequence of work tiles holds: a work tile, a piece of a split work tile
// (non-causal split tails only), nothing (skipped), or the end of the sequence.
enum class Slot { kTile, kPiece, kEmpty, kEnd };

// The order of causal work tiles over `heads` (b, h) rows of q_tiles query tiles each and `grid` CTAs.
// A query tile costs in proportion to the keys it sees, which grow along the head, so a head's tiles go
// in pairs of equal total cost, the j-th longest and the j-th shortest (the longer first, slots 2k and
// 2k + 1), and CTA c takes pairs c, c + grid, ...; a head with an odd number of query tiles has one
// single (an empty slot).
// With an even number of query tiles every pair costs the same, so the full rounds leave all CTAs
// equally busy; then the last round of pairs, when it does not fill the grid and lies in one head (the
// balanced pairs of that head, j near q_tiles / 2), is handed out as single tiles instead, longest
// first, the first `grid` of them to CTAs 0, 1, ... and the rest back from CTA grid − 1, so its longest
// tile rather than a whole pair sets the end (B1 H16 L32k, 132 CTAs: 4051 instead of 4112 key tiles
// for the busiest CTA, against a mean of 3987). With an odd number the heads' middle singles already
// make the full rounds uneven, and singles in the last round could leave a CTA busier than the pairs
// do (found by tests/cpp/test_work_order.cpp: 127 query tiles, 32 heads, 7 CTAs).
// causal_order computes the order's constants once per launch (host), so that causal_slot divides
// only by pairs_per_head.
struct CausalOrder {
  int q_tiles = 0;
  int pairs_per_head = 0;
  int pairs = 0;
  int singles_from = 0;  // the slot n where the last round's singles start (2 · pairs + 2: none)
  int tail = 0;          // pairs of the last round handed out as singles
};

// q_tiles, heads, grid >= 1.
SPARGE_HD CausalOrder causal_order(int q_tiles, int heads, int grid) {
  CausalOrder o;
  o.q_tiles = q_tiles;
  o.pairs_per_head = (q_tiles + 1) / 2;
  o.pairs = o.pairs_per_head * heads;
  const int full_rounds = o.pairs / grid;
  const int tail = o.pairs - full_rounds * grid;
  const bool tail_in_one_head = (o.pairs - tail) / o.pairs_per_head == (o.pairs - 1) / o.pairs_per_head;
  const bool singles = q_tiles % 2 == 0 && tail > 0 && tail_in_one_head;
  o.singles_from = singles ? 2 * full_rounds : 2 * o.pairs + 2;
  o.tail = singles ? tail : 0;
  return o;
}

// Slot n of CTA `cta` (bh, q_tile); kEmpty slots are skipped, kEnd ends the sequence.
SPARGE_HD Slot causal_slot(const CausalOrder& o, int grid, int cta, int n, int* bh, int* q_tile) {
  if (n >= o.singles_from) {
    const int k = n - o.singles_from;  // 0: this CTA's first single, 1: its second
    if (k > 1) return Slot::kEnd;
    const int rank = k == 0 ? cta : 2 * grid - 1 - cta;  // among the tail's 2 · tail tiles, longest first
    if (rank >= 2 * o.tail) return k == 0 ? Slot::kEmpty : Slot::kEnd;
    *bh = (o.pairs - 1) / o.pairs_per_head;
    // The tail is pairs j in [pairs_per_head − tail, pairs_per_head) of that head: their longer tiles
    // q_tiles − 1 − j (j ascending), then their shorter ones j (j descending).
    const int j = rank < o.tail ? o.pairs_per_head - o.tail + rank : o.pairs_per_head - 1 - (rank - o.tail);
    *q_tile = rank < o.tail ? o.q_tiles - 1 - j : j;
    return Slot::kTile;
  }
  const int pair = cta + (n / 2) * grid;
  if (pair >= o.pairs) return Slot::kEnd;
  const int j = pair % o.pairs_per_head;
  *bh = pair / o.pairs_per_head;
  *q_tile = n % 2 == 0 ? o.q_tiles - 1 - j : j;
  return n % 2 == 1 && j == o.q_tiles - 1 - j ? Slot::kEmpty : Slot::kTile;
}

}  // namespace sparge::cuda
