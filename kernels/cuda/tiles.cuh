// The FP8 GEMM's index arithmetic: which tile a unit of work is, where each stage of the ring
// is, which weight scale block a column takes. Plain C++ as well as CUDA (FATHOM_HOST_DEVICE),
// so that a host compiler can test it exhaustively (kernels/tests/host_tiles.rs) on machines
// without a GPU.
#pragma once

#ifndef FATHOM_HOST_DEVICE
#define FATHOM_HOST_DEVICE __host__ __device__ __forceinline__
#endif

namespace fathom {

struct TilePosition {
  int m_block;
  int n_block;
};

// Where tile `tile` lies: bands of `band` row blocks (the last band may be shorter), numbered
// down each band's rows, then across its column blocks.
FATHOM_HOST_DEVICE TilePosition tile_position(int tile, int m_blocks, int n_blocks, int band) {
  const int band_tiles = band * n_blocks;
  const int first_m = tile / band_tiles * band;
  const int rows = band < m_blocks - first_m ? band : m_blocks - first_m;
  const int in_band = tile - first_m * n_blocks;
  return TilePosition{first_m + in_band % rows, in_band / rows};
}

// The units of work a block takes in turn: a unit is a cluster's CLUSTER tiles (one tile without
// clusters), and block `block` of a grid of `blocks` takes units first, first + stride, …
struct UnitWalk {
  int first;
  int stride;
};

FATHOM_HOST_DEVICE UnitWalk unit_walk(int block, int blocks, int cluster) {
  return UnitWalk{block / cluster, blocks / cluster};
}

// The tile that the block of cluster rank `rank` computes of unit `unit`: units are numbered as
// tiles of a grid with ceil(m_blocks / cluster) rows (`tile_position`, bands counted in units),
// and a unit's tiles are `cluster` neighbouring row blocks of one column block. The last unit's
// may lie past the last row block (m_block >= m_blocks) when the row blocks do not divide.
FATHOM_HOST_DEVICE TilePosition unit_tile(int unit, int rank, int m_blocks, int n_blocks, int raster_band,
                                          int cluster) {
  const int unit_rows = (m_blocks + cluster - 1) / cluster;
  const int band = raster_band / cluster > 1 ? raster_band / cluster : 1;
  const TilePosition at = tile_position(unit, unit_rows, n_blocks, band);
  return TilePosition{at.m_block * cluster + rank, at.n_block};
}

// K-grouped GEMMs compute one [M][N] product per group: `groups` grids of tiles. Units are
// numbered group by group (unit / tiles is the group), and within a group as unit_tile numbers a
// dense GEMM's (no clusters), so a persistent grid walks every group's tiles in the same bands.
struct GroupTilePosition {
  int group;
  TilePosition tile;
};

FATHOM_HOST_DEVICE GroupTilePosition group_unit_tile(int unit, int m_blocks, int n_blocks, int raster_band) {
  const int tiles = m_blocks * n_blocks;
  return GroupTilePosition{unit / tiles, unit_tile(unit % tiles, 0, m_blocks, n_blocks, raster_band, 1)};
}

// The 128-wide K blocks a group sums over: its range [begin, end) of K, both multiples of 128.
struct KBlocks {
  int first;
  int count;
};

FATHOM_HOST_DEVICE KBlocks group_k_blocks(int begin, int end) { return KBlocks{begin / 128, (end - begin) / 128}; }

// A ring slot and the parity of its current use; both sides of the pipeline walk the same sequence.
template <int STAGES>
struct RingCursor {
  int stage = 0;
  unsigned phase = 0;
  FATHOM_HOST_DEVICE void advance() {
    if (++stage == STAGES) {
      stage = 0;
      phase ^= 1;
    }
  }
};

// Whether column `column` of a tile starting at column `n0` lies in the same 128-wide weight
// scale block as the tile's first column (else in the next: a tile meets at most two).
FATHOM_HOST_DEVICE bool in_first_scale_block(int n0, int column) { return column < 128 - n0 % 128; }

}  // namespace fathom
