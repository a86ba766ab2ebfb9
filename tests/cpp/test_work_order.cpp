// The causal work order of the persistent wgmma kernel (src/cuda/attn/work_order.h), checked on the
// host: every work tile is taken exactly once, and no CTA's load exceeds that of plain pairs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <iterator>
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

// The busiest CTA's load, a tile costing q_tile + 1 (the key tiles a top-left causal tile sees) plus
// `overhead` (its set-up and epilogue, in key tiles).
int64_t max_load(const Schedule& s, int64_t overhead = 0) {
  int64_t most = 0;
  for (const auto& cta : s.tiles) {
    int64_t load = 0;
    for (const auto& [bh, q] : cta) load += q + 1 + overhead;
    most = std::max(most, load);
  }
  return most;
}

// The same for the plain pair order (the j-th longest and j-th shortest of a head, pair p to CTA p % grid).
int64_t pairs_max_load(int q_tiles, int heads, int grid, int64_t overhead = 0) {
  const int pairs_per_head = (q_tiles + 1) / 2;
  std::vector<int64_t> load(grid, 0);
  for (int p = 0; p < pairs_per_head * heads; ++p) {
    const int j = p % pairs_per_head;
    load[p % grid] += (q_tiles - j) + overhead + (j == q_tiles - 1 - j ? 0 : j + 1 + overhead);
  }
  return *std::max_element(load.begin(), load.end());
}

TEST(CausalWorkOrder, EveryTileExactlyOnceAndNoCtaBusierThanWithPairs) {
  for (int q_tiles : {1, 2, 3, 5, 8, 63, 64, 65, 127, 255, 256}) {
    for (int heads : {1, 2, 3, 16, 32}) {
      for (int grid : {1, 7, 19, 132}) {
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
        // In the order's own cost model (key tiles plus each tile's set-up), never busier than plain pairs.
        constexpr int64_t kOverhead = cuda::work_order::kTileOverhead;
        EXPECT_LE(max_load(s, kOverhead), pairs_max_load(q_tiles, heads, used, kOverhead));
      }
    }
  }
}

// The mean load over the CTAs, in key tiles (the balance the order aims at).
double mean_load(int q_tiles, int heads, int grid) {
  return static_cast<double>(heads) * q_tiles * (q_tiles + 1) / 2 / grid;
}

TEST(CausalWorkOrder, L32kH16EndsWithinSixTenthsOfAPercentOfTheMean) {
  // B1 H16 L32768 at 128 query rows per tile on 132 CTAs: 2048 pairs of 257 key tiles each, 68 of them
  // past the last whole round. Plain pairs: 16 rounds for the busiest CTAs (4112 key tiles); the last
  // round as singles, longest first: 15 · 257 + 196 = 4051; the mean is 526336 / 132 = 3987.4.
  const Schedule s = walk(256, 16, 132);
  EXPECT_EQ(pairs_max_load(256, 16, 132), 4112);
  EXPECT_LE(static_cast<double>(max_load(s)), 1.006 * mean_load(256, 16, 132));
}

TEST(CausalWorkOrder, GridsBeyondTheTableTakeTheLastRoundAsSingles) {
  // B1 H16 L32768 on 150 CTAs (more than the table holds): 13 whole rounds of pairs of 257 key tiles, then
  // the 98 pairs j = 30..127 of head 15 as singles, longest first: CTA 0 takes q_tile 255 − 30 (226 key
  // tiles), CTA 149 the single of rank 149 (q_tile 76) and, back from the end, rank 150 (q_tile 75).
  ASSERT_GT(150, cuda::kTableMaxCtas);
  const Schedule s = walk(256, 16, 150);
  EXPECT_EQ(max_load(s), 13 * 257 + 226);
  ASSERT_FALSE(s.tiles[0].empty());
  EXPECT_EQ(s.tiles[0].back(), std::make_pair(15, 225));
  ASSERT_GE(s.tiles[149].size(), 2u);
  EXPECT_EQ(s.tiles[149][s.tiles[149].size() - 2], std::make_pair(15, 76));
  EXPECT_EQ(s.tiles[149].back(), std::make_pair(15, 75));
}

TEST(CausalWorkOrder, LargeProblemsEndWithinOnePercentOfTheMean) {
  // The table (two whole rounds and the rest) balances every problem whose heads span several rounds.
  for (const auto& [q_tiles, heads] : {std::pair{64, 32}, {128, 16}, {256, 32}, {512, 8}, {255, 16}, {96, 40}}) {
    SCOPED_TRACE(testing::Message() << "q_tiles " << q_tiles << " heads " << heads);
    const Schedule s = walk(q_tiles, heads, 132);
    EXPECT_LE(static_cast<double>(max_load(s)), 1.01 * mean_load(q_tiles, heads, 132));
  }
}

TEST(CausalWorkOrder, TheCacheGivesTheOrderItWouldBuild) {
  const cuda::CausalOrder built = cuda::causal_order(256, 16, 132);
  for (int round = 0; round < 2; ++round) {
    for (int q_tiles : {256, 64, 63, 256}) {
      const cuda::CausalOrder cached = cuda::cached_causal_order(q_tiles, 16, 132);
      const cuda::CausalOrder fresh = cuda::causal_order(q_tiles, 16, 132);
      EXPECT_EQ(cached.table_from, fresh.table_from);
      EXPECT_EQ(cached.table_pair0, fresh.table_pair0);
      EXPECT_EQ(cached.singles_from, fresh.singles_from);
      EXPECT_TRUE(std::equal(std::begin(cached.table), std::end(cached.table), std::begin(fresh.table)));
    }
  }
  EXPECT_LT(built.table_from, 2 * built.pairs);  // this problem has a table
}

}  // namespace
}  // namespace sparge::test
