//! `index_ops`: the index-driven library calls (`cuda/index_ops.cuh`) on f32 buffers holding
//! integers by value: `gather`, `take_along`, `index_add`, `one_hot`, `top_k`, and `group_rows`,
//! the stable grouping by id that `index_add` and the grouped GEMMs run after; `pad_groups` lays
//! the grouped rows out as the grouped FP8 GEMMs read them. Results equal the
//! CPU backend's exactly (no float atomics; `index_add` sums in the CPU's order). Kernels that read
//! indices report an invalid one through a `status` word (see the template) instead of failing
//! silently. Sizes are launch arguments: one instantiation per operation. `sm_80` or newer.

use crate::kernel::{
    ArchRequirement, COMMON, Elem, EntryPoint, KernelError, KernelParam, KernelSource, ParamType,
    Template, assemble,
};

const INDEX_OPS: Template = Template {
    file: "index_ops.cuh",
    text: include_str!("../cuda/index_ops.cuh"),
};

/// Threads of the one block of `group_rows`.
const GROUP_THREADS: u32 = 512;
/// Threads per block of the elementwise operations and of `top_k` (4 rows per block).
const THREADS: u32 = 256;
const TOP_K_THREADS: u32 = 128;
/// Grid-stride kernels need no more blocks than this to fill any GPU.
const MAX_BLOCKS: u64 = 1 << 16;

/// One operation of the template.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IndexOp {
    /// `ids [count]` → `offsets [groups + 1]`, `members [count]` (ints): positions by id, stable.
    GroupRows,
    Gather,
    TakeAlong,
    IndexAdd,
    OneHot,
    TopK,
    /// `group_rows`' offsets and members → the grouped FP8 GEMMs' padded layout (one block):
    /// segment starts, each 128-row block's group, and each padded row's source row of x and
    /// token-slot (-1 for padding).
    PadGroups,
}

/// Rows per segment alignment of `PadGroups` (the grouped FP8 GEMMs' `GROUPED_M_ALIGN`).
pub const PAD_ALIGN: u32 = crate::fp8_gemm::GROUPED_M_ALIGN;

/// Template parameters of `index_ops.cuh`: which operation (everything else is a launch argument).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IndexOpParams {
    pub op: IndexOp,
}

impl IndexOpParams {
    pub fn new(op: IndexOp) -> Self {
        Self { op }
    }

    /// The deterministic kernel name, e.g. `index_gather`.
    pub fn name(&self) -> String {
        let op = match self.op {
            IndexOp::GroupRows => "group_rows",
            IndexOp::Gather => "gather",
            IndexOp::TakeAlong => "take_along",
            IndexOp::IndexAdd => "index_add",
            IndexOp::OneHot => "one_hot",
            IndexOp::TopK => "top_k",
            IndexOp::PadGroups => "pad_groups",
        };
        format!("index_{op}")
    }

    pub fn block_threads(&self) -> u32 {
        match self.op {
            IndexOp::GroupRows => GROUP_THREADS,
            IndexOp::TopK => TOP_K_THREADS,
            _ => THREADS,
        }
    }

    /// Grid for `work` items: output elements (grid-stride, capped), rows of `top_k` (a warp
    /// each) or, for `group_rows`, one block.
    pub fn grid(&self, work: u64) -> [u32; 3] {
        let blocks = match self.op {
            IndexOp::GroupRows | IndexOp::PadGroups => 1,
            IndexOp::TopK => work.div_ceil(u64::from(TOP_K_THREADS / 32)),
            _ => work.div_ceil(u64::from(THREADS)).min(MAX_BLOCKS),
        };
        [u32::try_from(blocks).unwrap_or(u32::MAX), 1, 1]
    }

    /// Whether the kernel reads indices and so takes `status` and `tag`.
    pub fn checks_indices(&self) -> bool {
        !matches!(
            self.op,
            IndexOp::IndexAdd | IndexOp::TopK | IndexOp::PadGroups
        )
    }

    pub fn kernel_params(&self) -> Vec<KernelParam> {
        let f32_in = |name| KernelParam::new(name, ParamType::ConstPtr(Elem::F32));
        let f32_out = |name| KernelParam::new(name, ParamType::MutPtr(Elem::F32));
        let int = |name| KernelParam::new(name, ParamType::I32);
        let long = |name| KernelParam::new(name, ParamType::I64);
        let ints_in = |name| KernelParam::new(name, ParamType::ConstPtr(Elem::I32));
        let ints_out = |name| KernelParam::new(name, ParamType::MutPtr(Elem::I32));
        let mut params = match self.op {
            IndexOp::GroupRows => vec![
                f32_in("ids"),
                int("count"),
                int("groups"),
                KernelParam::new("offsets", ParamType::MutPtr(Elem::I32)),
                KernelParam::new("members", ParamType::MutPtr(Elem::I32)),
            ],
            IndexOp::Gather => vec![
                f32_in("table"),
                f32_in("indices"),
                f32_out("out"),
                long("count"),
                int("rows"),
                int("width"),
            ],
            IndexOp::TakeAlong => vec![
                f32_in("x"),
                f32_in("indices"),
                f32_out("out"),
                int("outer"),
                int("len"),
                int("inner"),
                int("x_len"),
            ],
            IndexOp::IndexAdd => vec![
                f32_in("values"),
                KernelParam::new("offsets", ParamType::ConstPtr(Elem::I32)),
                KernelParam::new("members", ParamType::ConstPtr(Elem::I32)),
                f32_out("out"),
                int("rows"),
                int("width"),
            ],
            IndexOp::OneHot => vec![
                f32_in("indices"),
                f32_out("out"),
                long("count"),
                int("depth"),
            ],
            IndexOp::TopK => vec![
                f32_in("x"),
                f32_out("out"),
                int("rows"),
                int("len"),
                int("k"),
            ],
            IndexOp::PadGroups => vec![
                ints_in("offsets"),
                ints_in("members"),
                int("groups"),
                int("slots"),
                int("x_slots"),
                int("m_padded"),
                ints_out("padded_offsets"),
                ints_out("block_group"),
                ints_out("source_rows"),
                ints_out("out_rows"),
            ],
        };
        if self.checks_indices() {
            params.push(KernelParam::new("status", ParamType::MutPtr(Elem::I32)));
            params.push(int("tag"));
        }
        params
    }

    /// Instantiates the template (portable: `sm_80` or newer).
    pub fn instantiate(&self) -> Result<KernelSource, KernelError> {
        let name = self.name();
        let params = self.kernel_params();
        let args: Vec<&str> = params.iter().map(|p| p.name).collect();
        let call = match self.op {
            IndexOp::GroupRows => format!("fathom::group_rows<{GROUP_THREADS}>"),
            IndexOp::Gather => "fathom::gather_rows".to_owned(),
            IndexOp::TakeAlong => "fathom::take_along".to_owned(),
            IndexOp::IndexAdd => "fathom::index_add".to_owned(),
            IndexOp::OneHot => "fathom::one_hot".to_owned(),
            IndexOp::TopK => format!("fathom::top_k<{TOP_K_THREADS}>"),
            IndexOp::PadGroups => format!("fathom::pad_groups<{PAD_ALIGN}>"),
        };
        let description = vec![format!(
            "{:?} on f32 buffers holding integers by value; exact, deterministic.",
            self.op
        )];
        Ok(assemble(
            &description,
            &[COMMON, INDEX_OPS],
            |_| {},
            EntryPoint {
                name: &name,
                block_threads: self.block_threads(),
                cluster_x: 1,
                params: &params,
                body: vec![format!("{call}({});", args.join(", "))],
            },
            ArchRequirement::Sm80OrNewer,
            0,
        ))
    }

    /// Every operation, for compile checks.
    pub fn all() -> [IndexOpParams; 7] {
        [
            IndexOp::GroupRows,
            IndexOp::Gather,
            IndexOp::TakeAlong,
            IndexOp::IndexAdd,
            IndexOp::OneHot,
            IndexOp::TopK,
            IndexOp::PadGroups,
        ]
        .map(IndexOpParams::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_grids_and_parameters() {
        let gather = IndexOpParams::new(IndexOp::Gather);
        assert_eq!(gather.name(), "index_gather");
        assert_eq!(gather.grid(1000), [4, 1, 1]);
        assert_eq!(gather.grid(1 << 40), [1 << 16, 1, 1]);
        assert_eq!(IndexOpParams::new(IndexOp::TopK).grid(9), [3, 1, 1]);
        assert_eq!(
            IndexOpParams::new(IndexOp::GroupRows).grid(1 << 20),
            [1, 1, 1]
        );
        let source = gather.instantiate().expect("valid");
        assert!(
            source.source.contains(
                "fathom::gather_rows(table, indices, out, count, rows, width, status, tag);"
            ),
            "{}",
            source.generated_wrapper()
        );
        let add = IndexOpParams::new(IndexOp::IndexAdd).kernel_params();
        assert!(add.iter().all(|p| p.name != "status"));
    }
}
