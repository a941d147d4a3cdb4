//! The FP8 GEMM's index arithmetic (`cuda/tiles.cuh`: which tile a unit of work is, the ring's
//! stage and parity, which weight scale block a column takes), compiled for the host by the
//! system's C++ compiler and checked exhaustively over grids, bands, ring depths and every tile
//! width the template takes; and the launch grids `Fp8GemmParams::grid` gives, walked block by
//! block as the kernel walks them, cover every tile exactly once (of every group, when
//! K-grouped; and the groups' K blocks cover K exactly once). The kernel itself needs a GPU to
//! run; its index arithmetic does not.
//! Without a C++ compiler (`$CXX`, `c++`, `g++` or `clang++`) this fails saying so, unless
//! `FATHOM_SKIP_HOST_CXX=1` is set.

use std::path::PathBuf;
use std::process::Command;

use fathom_kernels::{
    BLOCK_N_CHOICES, Fp8GemmParams, GemmGrouping, GemmProblem, TileSchedule, TrainingGemm,
};

const TILES: &str = include_str!("../cuda/tiles.cuh");

/// The checks, in C++ over the header as the kernel includes it.
const DRIVER: &str = r#"
#define FATHOM_HOST_DEVICE inline
#include "tiles.cuh"
#include <cstdio>
#include <vector>
using namespace fathom;

static long failures = 0;
#define CHECK(cond, ...)                                   \
  do {                                                     \
    if (!(cond) && failures++ < 20) {                      \
      std::printf("FAILED %s: ", #cond);                   \
      std::printf(__VA_ARGS__);                            \
      std::printf("\n");                                   \
    }                                                      \
  } while (0)

template <int STAGES>
long check_ring() {
  RingCursor<STAGES> ring;
  for (int i = 0; i < 10 * STAGES + 3; ++i, ring.advance()) {
    CHECK(ring.stage == i % STAGES && ring.phase == unsigned((i / STAGES) & 1), "use %d of %d stages", i, STAGES);
  }
  return 10 * STAGES + 3;
}

int main() {
  long checked = 0;
  // Every tile exactly once, in its band, and down the band's rows first.
  for (int m_blocks = 1; m_blocks <= 37; ++m_blocks) {
    for (int n_blocks = 1; n_blocks <= 37; ++n_blocks) {
      for (int band : {1, 2, 3, 4, 8, 16, 100}) {
        const int tiles = m_blocks * n_blocks;
        std::vector<int> seen(tiles, 0);
        for (int t = 0; t < tiles; ++t, ++checked) {
          const TilePosition p = tile_position(t, m_blocks, n_blocks, band);
          const bool inside = p.m_block >= 0 && p.m_block < m_blocks && p.n_block >= 0 && p.n_block < n_blocks;
          CHECK(inside, "tile %d of %dx%d, band %d at (%d, %d)", t, m_blocks, n_blocks, band, p.m_block, p.n_block);
          if (!inside) continue;
          ++seen[p.m_block * n_blocks + p.n_block];
          CHECK(p.m_block / band == t / (band * n_blocks), "tile %d of %dx%d outside band %d", t, m_blocks, n_blocks,
                band);
          if (t + 1 < tiles) {
            const TilePosition q = tile_position(t + 1, m_blocks, n_blocks, band);
            if (q.n_block == p.n_block && q.m_block / band == p.m_block / band) {
              CHECK(q.m_block == p.m_block + 1, "tile %d of %dx%d, band %d: not the next row", t + 1, m_blocks,
                    n_blocks, band);
            }
          }
        }
        for (int i = 0; i < tiles; ++i) CHECK(seen[i] == 1, "tile (%d, %d) numbered %d times", i / n_blocks, i % n_blocks, seen[i]);
      }
    }
  }
  checked += check_ring<1>() + check_ring<2>() + check_ring<5>() + check_ring<6>() + check_ring<16>();
  // Every 8 columns of every tile take the scale block they lie in, one of at most two.
  const int widths[] = {WIDTHS};
  for (int width : widths) {
    for (int tile = 0; tile < 256; ++tile) {
      const int n0 = tile * width;
      for (int column = 0; column < width; column += 8, ++checked) {
        const int block = (n0 + column) / 128;
        const bool first = in_first_scale_block(n0, column);
        CHECK(first == (block == n0 / 128), "width %d, tile %d, column %d", width, tile, column);
        CHECK(block <= n0 / 128 + 1, "width %d, tile %d, column %d: a third scale block", width, tile, column);
        // The kernel picks per 8 columns: all 8 lie in one block.
        CHECK((n0 + column) / 128 == (n0 + column + 7) / 128, "width %d, tile %d, column %d straddles", width, tile,
              column);
      }
    }
  }
  // The grids the launcher computes, walked as the kernel walks them: every tile once.
  const int walks[][5] = {WALKS};  // m_blocks, n_blocks, cluster, raster band, blocks
  for (const auto& w : walks) {
    const int m_blocks = w[0], n_blocks = w[1], cluster = w[2], band = w[3], blocks = w[4];
    CHECK(blocks % cluster == 0, "%d blocks in clusters of %d", blocks, cluster);
    const int units = (m_blocks + cluster - 1) / cluster * n_blocks;
    std::vector<int> count(m_blocks * n_blocks, 0);
    for (int b = 0; b < blocks; ++b) {
      const UnitWalk walk = unit_walk(b, blocks, cluster);
      const UnitWalk leader = unit_walk(b - b % cluster, blocks, cluster);
      CHECK(walk.first == leader.first && walk.stride == leader.stride, "block %d leaves its cluster", b);
      CHECK(walk.stride > 0, "%d blocks in clusters of %d: no whole cluster", blocks, cluster);
      if (walk.stride <= 0) continue;
      for (int unit = walk.first; unit < units; unit += walk.stride, ++checked) {
        const TilePosition t = unit_tile(unit, b % cluster, m_blocks, n_blocks, band, cluster);
        CHECK(t.n_block >= 0 && t.n_block < n_blocks && t.m_block >= 0, "unit %d at (%d, %d)", unit, t.m_block,
              t.n_block);
        if (t.m_block >= m_blocks) {
          // Only a cluster's last unit row, when the row blocks do not divide, reaches past M.
          CHECK(m_blocks % cluster != 0 && t.m_block / cluster == m_blocks / cluster,
                "%dx%d in clusters of %d: unit %d past M at row block %d", m_blocks, n_blocks, cluster, unit, t.m_block);
          continue;
        }
        ++count[t.m_block * n_blocks + t.n_block];
      }
    }
    for (int i = 0; i < m_blocks * n_blocks; ++i) {
      CHECK(count[i] == 1, "%dx%d, cluster %d, band %d, %d blocks: tile (%d, %d) computed %d times", m_blocks,
            n_blocks, cluster, band, blocks, i / n_blocks, i % n_blocks, count[i]);
    }
  }
  // K-grouped grids: units numbered group by group; every (group, tile) once, each group's tiles
  // where a dense GEMM's units put them.
  const int group_walks[][5] = {GROUP_WALKS};  // m_blocks, n_blocks, groups, raster band, blocks
  for (const auto& w : group_walks) {
    const int m_blocks = w[0], n_blocks = w[1], groups = w[2], band = w[3], blocks = w[4];
    const int tiles = m_blocks * n_blocks;
    std::vector<int> count(groups * tiles, 0);
    for (int b = 0; b < blocks; ++b) {
      const UnitWalk walk = unit_walk(b, blocks, 1);
      for (int unit = walk.first; unit < groups * tiles; unit += walk.stride, ++checked) {
        const GroupTilePosition g = group_unit_tile(unit, m_blocks, n_blocks, band);
        const TilePosition dense = unit_tile(unit % tiles, 0, m_blocks, n_blocks, band, 1);
        const bool inside = g.group >= 0 && g.group < groups && g.tile.m_block >= 0 && g.tile.m_block < m_blocks &&
                            g.tile.n_block >= 0 && g.tile.n_block < n_blocks;
        CHECK(inside, "%dx%d, %d groups: unit %d at group %d (%d, %d)", m_blocks, n_blocks, groups, unit, g.group,
              g.tile.m_block, g.tile.n_block);
        if (!inside) continue;
        CHECK(g.group == unit / tiles && g.tile.m_block == dense.m_block && g.tile.n_block == dense.n_block,
              "%dx%d, %d groups: unit %d not its group's dense tile", m_blocks, n_blocks, groups, unit);
        ++count[g.group * tiles + g.tile.m_block * n_blocks + g.tile.n_block];
      }
    }
    for (int i = 0; i < groups * tiles; ++i) {
      CHECK(count[i] == 1, "%dx%d, %d groups, band %d, %d blocks: group %d tile %d computed %d times", m_blocks,
            n_blocks, groups, band, blocks, i / tiles, i % tiles, count[i]);
    }
  }
  // The groups' K blocks: from offsets that are multiples of 128 (empty groups included), each K
  // block of [0, K) belongs to exactly one group, in order.
  const int segments[][8] = {{128, 0, 256, 0, 0, 384, 128, 0}, {0, 0, 0, 0, 0, 0, 0, 128}, {1280, 0, 0, 0, 0, 0, 0, 0}};
  for (const auto& sizes : segments) {
    int offset = 0, next_block = 0;
    for (int g = 0; g < 8; ++g, ++checked) {
      const KBlocks kb = group_k_blocks(offset, offset + sizes[g]);
      CHECK(kb.first == next_block && kb.count == sizes[g] / 128, "group %d of K blocks at %d: (%d, %d)", g,
            offset, kb.first, kb.count);
      next_block = kb.first + kb.count;
      offset += sizes[g];
    }
    CHECK(next_block * 128 == offset, "K blocks cover %d of %d", next_block * 128, offset);
  }
  std::printf("%ld checks, %ld failed\n", checked, failures);
  return failures == 0 ? 0 : 1;
}
"#;

/// `{m_blocks, n_blocks, cluster, band, blocks}` for the grids the launcher computes: tiles of
/// 64 and 128 rows, 128 to 192 columns, alone and in pairs, at ragged and DeepSeek-V3 sizes, one
/// block per tile and persistent grids of 1 to 133 blocks.
fn walks() -> Vec<String> {
    let mut out = Vec::new();
    for (block_m, block_n, cluster_m) in [
        (64, 128, 1),
        (128, 128, 1),
        (128, 144, 2),
        (128, 192, 2),
        (128, 128, 2),
    ] {
        let params = Fp8GemmParams {
            cluster_m,
            ..Fp8GemmParams::new(block_m, block_n, 2)
        };
        for m in [1, 100, 128, 300, 640, 4096] {
            for n in [8, 576, 2112, 7168] {
                let problem = GemmProblem {
                    m,
                    n,
                    k: 128,
                    groups: 1,
                };
                let mut schedules = vec![TileSchedule::ONE_TILE_PER_BLOCK];
                for (blocks, band) in [(1, 1), (3, 2), (132, 1), (132, 8), (133, 16)] {
                    schedules.push(TileSchedule::persistent(blocks, band));
                }
                for schedule in schedules {
                    let [blocks, _, _] = params.grid(&problem, &schedule);
                    out.push(format!(
                        "{{{}, {}, {cluster_m}, {}, {blocks}}}",
                        m.div_ceil(block_m),
                        n.div_ceil(block_n),
                        schedule.raster_band
                    ));
                }
            }
        }
    }
    out
}

/// `{m_blocks, n_blocks, groups, band, blocks}` for the K-grouped grids the launcher computes:
/// 64- and 128-row tiles, narrow to wide, for the tiny model's and DeepSeek-V3's experts, one
/// block per tile and persistent.
fn group_walks() -> Vec<String> {
    let mut out = Vec::new();
    for (block_m, block_n) in [(64, 16), (128, 128), (128, 192)] {
        let params = TrainingGemm::WeightGrad.params(block_m, block_n, 2, GemmGrouping::KGrouped);
        for (m, n, groups) in [
            (32, 16, 4),
            (100, 576, 3),
            (640, 2048, 37),
            (7168, 2048, 8),
            (4096, 7168, 1),
        ] {
            let problem = GemmProblem {
                m,
                n,
                k: 128 * groups,
                groups,
            };
            let mut schedules = vec![TileSchedule::ONE_TILE_PER_BLOCK];
            for (blocks, band) in [(1, 1), (3, 2), (132, 1), (132, 8)] {
                schedules.push(TileSchedule::persistent(blocks, band));
            }
            for schedule in schedules {
                let [blocks, _, _] = params.grid(&problem, &schedule);
                out.push(format!(
                    "{{{}, {}, {groups}, {}, {blocks}}}",
                    m.div_ceil(block_m),
                    n.div_ceil(block_n),
                    schedule.raster_band
                ));
            }
        }
    }
    out
}

fn compiler() -> Option<PathBuf> {
    if let Some(cxx) = std::env::var_os("CXX").filter(|c| !c.is_empty()) {
        return Some(PathBuf::from(cxx));
    }
    ["c++", "g++", "clang++"].into_iter().find_map(|name| {
        let found = Command::new(name).arg("--version").output();
        found
            .is_ok_and(|out| out.status.success())
            .then(|| PathBuf::from(name))
    })
}

#[test]
fn the_fp8_gemms_index_arithmetic_holds_on_the_host() {
    let Some(cxx) = compiler() else {
        if std::env::var_os("FATHOM_SKIP_HOST_CXX").is_some_and(|v| v == "1") {
            eprintln!("skipped: no C++ compiler, and FATHOM_SKIP_HOST_CXX=1");
            return;
        }
        panic!(
            "no C++ compiler ($CXX, c++, g++ or clang++) to check cuda/tiles.cuh on the host; \
             install one or set FATHOM_SKIP_HOST_CXX=1"
        );
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tiles.cuh"), TILES).unwrap();
    let widths: Vec<String> = BLOCK_N_CHOICES.iter().map(u32::to_string).collect();
    let driver = DRIVER
        .replace("WIDTHS", &widths.join(", "))
        .replace("GROUP_WALKS", &group_walks().join(", "))
        .replace("WALKS", &walks().join(", "));
    let source = dir.path().join("check_tiles.cpp");
    std::fs::write(&source, driver).unwrap();
    let binary = dir.path().join("check_tiles");
    let build = Command::new(&cxx)
        .args(["-std=c++17", "-O1", "-Wall", "-Werror", "-o"])
        .arg(&binary)
        .arg(&source)
        .output()
        .unwrap();
    assert!(
        build.status.success(),
        "{} could not compile the check:\n{}",
        cxx.display(),
        String::from_utf8_lossy(&build.stderr)
    );
    let run = Command::new(&binary).output().unwrap();
    let report = String::from_utf8_lossy(&run.stdout);
    println!("{report}");
    assert!(run.status.success(), "{report}");
    assert!(report.contains(", 0 failed"), "{report}");
}
