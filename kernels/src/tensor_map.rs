//! Host-side description of the TMA tensor maps (`CUtensorMap`) a Hopper kernel takes as
//! parameters. The runtime turns each [`TensorMapDesc`] into one `cuTensorMapEncodeTiled` call;
//! this crate only says what the map must be, since it knows the kernel's tiles.

/// Element type of a tensor map (`CUtensorMapDataType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TensorMapDtype {
    /// `CU_TENSOR_MAP_DATA_TYPE_UINT8`: FP8 E4M3 bytes.
    U8,
    /// `CU_TENSOR_MAP_DATA_TYPE_FLOAT32`: scales.
    F32,
}

impl TensorMapDtype {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            TensorMapDtype::U8 => 1,
            TensorMapDtype::F32 => 4,
        }
    }
}

/// Shared-memory swizzle of the box (`CUtensorMapSwizzle`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TensorMapSwizzle {
    /// `CU_TENSOR_MAP_SWIZZLE_NONE`.
    None,
    /// `CU_TENSOR_MAP_SWIZZLE_128B`: what the kernel's wgmma descriptors expect for operands.
    B128,
}

/// A 2-D tiled tensor map. Dimensions are innermost first (element counts); the interleave is
/// `NONE`, element strides are 1, L2 promotion `256B`, and out-of-bounds elements are filled with
/// zeros (`CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE`), which the kernels rely on at ragged edges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TensorMapDesc {
    /// The kernel parameter this map is passed as (e.g. `tmap_a`).
    pub param: &'static str,
    /// What the tensor holds, for messages (e.g. `A (E4M3, [M][K])`).
    pub what: &'static str,
    pub dtype: TensorMapDtype,
    /// `globalDim`: [inner, outer] in elements.
    pub global_dims: [u64; 2],
    /// `globalStrides[0]`: bytes from one outer index to the next (a multiple of 16).
    pub outer_stride_bytes: u64,
    /// `boxDim`: [inner, outer] in elements (each at most 256).
    pub box_dims: [u32; 2],
    pub swizzle: TensorMapSwizzle,
}

impl TensorMapDesc {
    /// Bytes one box occupies in shared memory (and counts toward the mbarrier transaction).
    pub fn box_bytes(&self) -> u64 {
        u64::from(self.box_dims[0]) * u64::from(self.box_dims[1]) * self.dtype.size()
    }
}
