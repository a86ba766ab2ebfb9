// The causal work order of the persistent wgmma kernel (src/cuda/attn/work_order.h), checked on the
// host: every work tile is taken exactly once, and no CTA's load exceeds that of plain pairs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <set>
#include <utility>
#include <vector>

#include "cuda/attn/work_order.h"

namespace sparge::test {
namespace {

using cuda::Slot;

struct Schedule {
  std::vector<std::vector<std::pair<int, int>>> tiles;  // per CTA: (bh, q_tile) in slot order
};

// Walks every CTA's slots as the kernel does: kEmpty skipped, kEnd ends the sequence.
Schedule walk(int q_tiles, int heads, int grid) {
  Schedule s;
  s.tiles.resize(grid);
  const cuda::CausalOrder order = cuda::causal_order(q_tiles, heads, grid);
  for (int cta = 0; cta < grid; ++cta) {
    for (int n = 0;; ++n) {
      int bh = -1;
      int q_tile = -1;
      const Slot slot = cuda::causal_slot(order, grid, cta, n, &bh, &q_tile);
      if (slot == Slot::kEnd) break;
      EXPECT_NE(slot, Slot::kPiece);
      if (slot == Slot::kTile) s.tiles[cta].emplace_back(bh, q_tile);
      if (n > 4 * q_tiles * heads + 4) {
        ADD_FAILURE() << "CTA " << cta << " never reaches kEnd";
        break;
      }
    }
  }
  return s;
}

// The busiest CTA's load, a tile costing q_tile + 1 (the key tiles a top-left causal tile sees).
int64_t max_load(const Schedule& s) {
  int64_t most = 0;
  for (const auto& cta : s.tiles) {
    int64_t load = 0;
    for (const auto& [bh, q] : cta) load += q + 1;
    most = std::max(most, load);
  }
  return most;
}

// The plain pair order (the j-th longest and j-th shortest of a head, pair p to CTA p % grid).
int64_t pairs_max_load(int q_tiles, int heads, int grid) {
  const int pairs_per_head = (q_tiles + 1) / 2;
  std::vector<int64_t> load(grid, 0);
  for (int p = 0; p < pairs_per_head * heads; ++p) {
    const int j = p % pairs_per_head;
    load[p % grid] += (q_tiles - j) + (j == q_tiles - 1 - j ? 0 : j + 1);
  }
  return *std::max_element(load.begin(), load.end());
}

TEST(CausalWorkOrder, EveryTileExactlyOnceAndNoCtaBusierThanWithPairs) {
  for (int q_tiles : {1, 2, 3, 5, 8, 63, 64, 65, 127, 255, 256}) {
    for (int heads : {1, 2, 3, 16, 32}) {
      for (int grid : {1, 7, 132}) {
        SCOPED_TRACE(testing::Message() << "q_tiles " << q_tiles << " heads " << heads << " grid " << grid);
        const int used = std::min(grid, q_tiles * heads);  // the launch never starts more CTAs than tiles
        const Schedule s = walk(q_tiles, heads, used);
        std::set<std::pair<int, int>> seen;
        int64_t count = 0;
        for (const auto& cta : s.tiles) {
          for (const auto& t : cta) {
            EXPECT_GE(t.first, 0);
            EXPECT_LT(t.first, heads);
            EXPECT_GE(t.second, 0);
            EXPECT_LT(t.second, q_tiles);
            seen.insert(t);
            ++count;
          }
        }
        EXPECT_EQ(count, int64_t{q_tiles} * heads);
        EXPECT_EQ(static_cast<int64_t>(seen.size()), int64_t{q_tiles} * heads);
        EXPECT_LE(max_load(s), pairs_max_load(q_tiles, heads, used));
      }
    }
  }
}

TEST(CausalWorkOrder, LastRoundOfL32kH16GoesOutAsSingles) {
  // B1 H16 L32768 at 128 query rows per tile on 132 CTAs: 2048 pairs of 257 key tiles each, 68 of them
  // in the last round (pairs j = 60..127 of head 15). Pairs: 16 rounds of 257 = 4112 for the busiest
  // CTAs; singles: 15 · 257 + the longest tail tile, q_tile 195 (196 key tiles).
  const Schedule s = walk(256, 16, 132);
  EXPECT_EQ(pairs_max_load(256, 16, 132), 4112);
  EXPECT_EQ(max_load(s), 15 * 257 + 196);
  ASSERT_FALSE(s.tiles[0].empty());
  EXPECT_EQ(s.tiles[0].back(), std::make_pair(15, 195));
}

}  // namespace
}  // namespace sparge::test
