//! `quantize`: f32/bf16 → FP8 E4M3 with DeepSeek-V3's fine-grained scales (`cuda/quantize.cuh`):
//! `scale = max(amax, 1e-4) / 448` per group, optionally rounded up to a power of two, and
//! `q = saturate(x / scale)`. The output layouts are the ones the FP8 GEMMs read.

use crate::kernel::{
    ArchRequirement, COMMON, Elem, EntryPoint, KernelError, KernelParam, KernelSource, ParamType,
    Template, assemble, check_problem, cpp_bool,
};

const QUANTIZE: Template = Template {
    file: "quantize.cuh",
    text: include_str!("../cuda/quantize.cuh"),
};

const TEMPLATE: &str = "quantize";
/// The index arithmetic of [`QuantizeInput::F32Product`]'s two factors, after `y`.
pub const PRODUCT_INTS: [&str; 6] = [
    "x_row_div",
    "x_row_stride",
    "x_col_stride",
    "y_row_div",
    "y_row_stride",
    "y_col_stride",
];
/// Warps (rows) per block of the 1×128 kernel.
const TILE_WARPS: u32 = 8;

/// Which groups share a scale, and the output orientation. Every kind pads the codes' rows with
/// zero codes to a multiple of 16 bytes (TMA's row stride; zeros add nothing to a product,
/// [`QuantizeParams::codes_shape`]); the activation kinds take any sizes, the 128×128 blocks
/// columns in multiples of 4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantizeKind {
    /// Activations: one scale per 1×128 tile; `q [rows][round_up(cols, 16)]`, scales
    /// `[ceil(cols/128)][round_up(rows, 4)]`.
    Tile1x128,
    /// `Tile1x128` of rows gathered from the input: output row `r` is input row
    /// `source_rows[r]`, or zeros where that is -1 (the grouped FP8 GEMMs' padded layout);
    /// `rows` counts output rows.
    GatheredTile1x128,
    /// Weights: one scale per 128×128 block; `q [rows][round_up(cols, 16)]`, scales
    /// `[ceil(rows/128)][ceil(cols/128)]`; `transpose` writes `q [cols][round_up(rows, 16)]` and
    /// scales `[ceil(cols/128)][ceil(rows/128)]` instead (the input-gradient GEMM's Wᵀ; equal to
    /// transposing the plain result). A launch may take a stack of such matrices (the experts'
    /// weights, [`QuantizeParams::stacked_grid`]): codes and scales stacked likewise.
    Block128x128 { transpose: bool },
    /// Transposed re-tiling for the weight-gradient GEMM: `q [cols][round_up(rows, 16)]` with one
    /// scale per 128 input rows of each column, scales `[ceil(rows/128)][round_up(cols, 4)]`.
    Tile128x1Transposed,
    /// `Tile128x1Transposed` of rows gathered from the input, as `GatheredTile1x128` gathers
    /// them: row `r` of what is quantised is input row `source_rows[r]`, or zeros where that is
    /// -1 (zero rows add nothing to a tile's amax; an all-padding tile gets the scale of zero
    /// and zero codes); `rows` counts those (padded) rows. The K-grouped weight-gradient GEMM's
    /// operands, K being the experts' padded token-slots.
    GatheredTile128x1Transposed,
}

impl QuantizeKind {
    /// Whether the kernel gathers its rows through `source_rows`.
    pub fn gathers(self) -> bool {
        matches!(
            self,
            QuantizeKind::GatheredTile1x128 | QuantizeKind::GatheredTile128x1Transposed
        )
    }
}

/// What the kernel reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantizeInput {
    F32,
    Bf16,
    /// An activation kept as E4M3 codes in 1×128 tiles, as [`QuantizeKind::Tile1x128`] writes
    /// them (`x`: codes, `x_scales`: scales, `x_rows`: its rows): each element is its code
    /// times its tile's scale rounded once to f32, the value an E4M3 rounding in 1×128 tiles
    /// gives it. The activation kinds only (not the 128×128 weight blocks).
    E4m3Tiles,
    /// The element-wise product of two f32 tensors `x` and `y` that no kernel stores: element
    /// `(r, c)` is `x[(r / x_row_div)·x_row_stride + c·x_col_stride]` times `y`'s likewise,
    /// one f32 multiply (a loop nest's `x * y`, bit for bit). The activation kinds only.
    F32Product,
}

impl QuantizeInput {
    fn elem(self) -> Elem {
        match self {
            QuantizeInput::F32 => Elem::F32,
            QuantizeInput::Bf16 => Elem::Bf16,
            QuantizeInput::E4m3Tiles => Elem::E4m3,
            QuantizeInput::F32Product => Elem::F32,
        }
    }

    fn tag(self) -> &'static str {
        match self {
            QuantizeInput::F32 => "f32",
            QuantizeInput::Bf16 => "bf16",
            QuantizeInput::E4m3Tiles => "e4m3tiles",
            QuantizeInput::F32Product => "f32mul",
        }
    }

    /// The template's source over the entry point's parameters (`quantize.cuh`).
    fn source(self) -> &'static str {
        match self {
            QuantizeInput::F32 => "fathom::DenseRows<float>{x, cols}",
            QuantizeInput::Bf16 => "fathom::DenseRows<bf16>{x, cols}",
            QuantizeInput::E4m3Tiles => "fathom::E4m3Tiles{x, x_scales, x_rows, cols}",
            QuantizeInput::F32Product => {
                "fathom::ProductRows{x, y, cols, x_row_div, x_row_stride, x_col_stride, \
                 y_row_div, y_row_stride, y_col_stride}"
            }
        }
    }
}

/// Template parameters of `quantize.cuh`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantizeParams {
    pub kind: QuantizeKind,
    pub input: QuantizeInput,
    /// Round every scale up to a power of two (DeepSeek-V3 does for the MoE dispatch input and
    /// for the input of the linear after attention).
    pub pow2_scales: bool,
}

impl QuantizeParams {
    /// The deterministic kernel name, e.g. `quantize_1x128_bf16_e4m3_pow2`.
    pub fn name(&self) -> String {
        let kind = match self.kind {
            QuantizeKind::Tile1x128 => "1x128",
            QuantizeKind::GatheredTile1x128 => "1x128_gathered",
            QuantizeKind::Block128x128 { transpose: false } => "128x128",
            QuantizeKind::Block128x128 { transpose: true } => "128x128t",
            QuantizeKind::Tile128x1Transposed => "128x1t",
            QuantizeKind::GatheredTile128x1Transposed => "128x1t_gathered",
        };
        let pow2 = if self.pow2_scales { "_pow2" } else { "" };
        format!("quantize_{kind}_{}_e4m3{pow2}", self.input.tag())
    }

    pub fn block_threads(&self) -> u32 {
        256
    }

    /// Launch grid for a `[rows][cols]` input (gathered: `rows` output rows).
    pub fn grid(&self, rows: u32, cols: u32) -> [u32; 3] {
        match self.kind {
            QuantizeKind::Tile1x128 | QuantizeKind::GatheredTile1x128 => {
                [cols.div_ceil(128), rows.div_ceil(TILE_WARPS), 1]
            }
            QuantizeKind::Block128x128 { .. } => [cols.div_ceil(128), rows.div_ceil(128), 1],
            QuantizeKind::Tile128x1Transposed | QuantizeKind::GatheredTile128x1Transposed => {
                [cols.div_ceil(32), rows.div_ceil(128), 1]
            }
        }
    }

    /// [`grid`](Self::grid) for `matrices` `[rows][cols]` matrices one after another (128×128
    /// blocks only: a grid layer per matrix).
    pub fn stacked_grid(
        &self,
        rows: u32,
        cols: u32,
        matrices: u32,
    ) -> Result<[u32; 3], KernelError> {
        let blocks = matches!(self.kind, QuantizeKind::Block128x128 { .. });
        check_problem(
            blocks || matrices == 1,
            TEMPLATE,
            "matrices",
            matrices,
            "1 (only the 128x128 blocks quantise a stack of matrices in one launch)",
        )?;
        check_problem(
            (1..=65_535).contains(&matrices),
            TEMPLATE,
            "matrices",
            matrices,
            "1 to 65535 (a grid's z extent)",
        )?;
        let [x, y, _] = self.grid(rows, cols);
        Ok([x, y, matrices])
    }

    /// The codes' layout for a `[rows][cols]` input: `[rows][cols]` of the output as written,
    /// padding included.
    pub fn codes_shape(&self, rows: usize, cols: usize) -> (usize, usize) {
        match self.kind {
            QuantizeKind::Tile1x128 | QuantizeKind::GatheredTile1x128 => {
                (rows, cols.next_multiple_of(16))
            }
            QuantizeKind::Block128x128 { transpose: false } => (rows, cols.next_multiple_of(16)),
            QuantizeKind::Block128x128 { transpose: true } => (cols, rows.next_multiple_of(16)),
            QuantizeKind::Tile128x1Transposed | QuantizeKind::GatheredTile128x1Transposed => {
                (cols, rows.next_multiple_of(16))
            }
        }
    }

    /// Checks that the kernel handles a `[rows][cols]` input: any size, but the 128×128 blocks
    /// read 4 values at a time (`cols % 4 == 0`).
    pub fn check_problem(&self, rows: u32, cols: u32) -> Result<(), KernelError> {
        check_problem(rows > 0, TEMPLATE, "rows", rows, "at least 1")?;
        check_problem(cols > 0, TEMPLATE, "cols", cols, "at least 1")?;
        self.check_input()?;
        let blocks = matches!(self.kind, QuantizeKind::Block128x128 { .. });
        check_problem(
            !blocks || cols.is_multiple_of(4),
            TEMPLATE,
            "cols",
            cols,
            "a multiple of 4 (128x128 blocks)",
        )
    }

    /// Refuses E4M3 tiles and products as the input of the 128×128 weight blocks.
    fn check_input(&self) -> Result<(), KernelError> {
        let blocks = matches!(self.kind, QuantizeKind::Block128x128 { .. });
        let plain = matches!(self.input, QuantizeInput::F32 | QuantizeInput::Bf16);
        check_problem(
            !blocks || plain,
            TEMPLATE,
            "input",
            self.input.tag(),
            "f32 or bf16 (128x128 blocks quantise weights)",
        )
    }

    /// How many of [`QuantizeParams::kernel_params`] describe the input: they come first (`x`,
    /// then the input's own), and the rest are every input's alike.
    pub fn input_params(&self) -> usize {
        match self.input {
            QuantizeInput::F32 | QuantizeInput::Bf16 => 1,
            QuantizeInput::E4m3Tiles => 3,
            QuantizeInput::F32Product => 2 + PRODUCT_INTS.len(),
        }
    }

    pub fn kernel_params(&self) -> Vec<KernelParam> {
        let mut params = vec![KernelParam::new(
            "x",
            ParamType::ConstPtr(self.input.elem()),
        )];
        match self.input {
            QuantizeInput::E4m3Tiles => params.extend([
                KernelParam::new("x_scales", ParamType::ConstPtr(Elem::F32)),
                KernelParam::new("x_rows", ParamType::I32),
            ]),
            QuantizeInput::F32Product => {
                params.push(KernelParam::new("y", ParamType::ConstPtr(Elem::F32)));
                params.extend(PRODUCT_INTS.map(|name| KernelParam::new(name, ParamType::I32)));
            }
            QuantizeInput::F32 | QuantizeInput::Bf16 => {}
        }
        if self.kind.gathers() {
            params.push(KernelParam::new(
                "source_rows",
                ParamType::ConstPtr(Elem::I32),
            ));
        }
        params.extend([
            KernelParam::new("q", ParamType::MutPtr(Elem::E4m3)),
            KernelParam::new("scales", ParamType::MutPtr(Elem::F32)),
            KernelParam::new("rows", ParamType::I32),
            KernelParam::new("cols", ParamType::I32),
        ]);
        params
    }

    /// Instantiates the template (portable: `sm_80` or newer).
    pub fn instantiate(&self) -> Result<KernelSource, KernelError> {
        let name = self.name();
        let params = self.kernel_params();
        let pow2 = cpp_bool(self.pow2_scales);
        // The activation kinds read through a source object standing for `x` (and `x_scales`,
        // `x_rows`); the weight blocks read f32 or bf16 directly.
        let source = self.input.source();
        let source_params = ["x", "x_scales", "x_rows", "y"];
        let mut args: Vec<&str> = vec![source];
        args.extend(
            (params.iter().map(|p| p.name))
                .filter(|n| !source_params.contains(n) && !PRODUCT_INTS.contains(n)),
        );
        let call = match self.kind {
            QuantizeKind::Tile1x128 => format!("fathom::quantize_1x128<{pow2}, {TILE_WARPS}>("),
            QuantizeKind::GatheredTile1x128 => {
                format!("fathom::quantize_1x128_gathered<{pow2}, {TILE_WARPS}>(")
            }
            QuantizeKind::Block128x128 { transpose } => {
                self.check_input()?;
                let input = match self.input {
                    QuantizeInput::Bf16 => "bf16",
                    _ => "float",
                };
                args[0] = "x";
                format!(
                    "fathom::quantize_128x128<{input}, {pow2}, {}>(",
                    cpp_bool(transpose)
                )
            }
            QuantizeKind::Tile128x1Transposed => format!("fathom::quantize_128x1t<{pow2}>("),
            QuantizeKind::GatheredTile128x1Transposed => {
                format!("fathom::quantize_128x1t_gathered<{pow2}>(")
            }
        };
        let description = vec![format!(
            "E4M3 quantisation ({:?}) of a {} [rows][cols] tensor, scale = max(amax, 1e-4) / 448{}.",
            self.kind,
            self.input.tag(),
            if self.pow2_scales {
                " rounded up to a power of two"
            } else {
                ""
            }
        )];
        Ok(assemble(
            &description,
            &[COMMON, QUANTIZE],
            |_| {},
            EntryPoint {
                name: &name,
                block_threads: self.block_threads(),
                cluster_x: 1,
                params: &params,
                body: vec![call, format!("    {});", args.join(", "))],
            },
            ArchRequirement::Sm80OrNewer,
            0,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_names_grids_and_checks() {
        let act = QuantizeParams {
            kind: QuantizeKind::Tile1x128,
            input: QuantizeInput::Bf16,
            pow2_scales: true,
        };
        assert_eq!(act.name(), "quantize_1x128_bf16_e4m3_pow2");
        assert_eq!(act.grid(4096, 7168), [56, 512, 1]);
        let wt = QuantizeParams {
            kind: QuantizeKind::Block128x128 { transpose: true },
            input: QuantizeInput::F32,
            pow2_scales: false,
        };
        assert_eq!(wt.name(), "quantize_128x128t_f32_e4m3");
        assert!(wt.check_problem(100, 128).is_ok());
        assert!(wt.check_problem(112, 126).is_err());
        // The activation kinds take any sizes, their codes' rows padded to 16 bytes.
        assert!(act.check_problem(3, 62).is_ok());
        assert_eq!(act.codes_shape(3, 62), (3, 64));
        let retiled = QuantizeParams {
            kind: QuantizeKind::Tile128x1Transposed,
            ..act
        };
        assert!(retiled.check_problem(62, 40).is_ok());
        assert_eq!(retiled.codes_shape(62, 40), (40, 64));
        assert_eq!(wt.codes_shape(100, 40), (40, 112));
        // The experts' weights in one launch: a grid layer each; the other kinds one matrix.
        assert_eq!(wt.stacked_grid(100, 256, 256).unwrap(), [2, 1, 256]);
        assert!(wt.stacked_grid(100, 256, 0).is_err());
        assert!(wt.stacked_grid(100, 256, 70_000).is_err());
        let err = act.stacked_grid(3, 62, 2).unwrap_err().to_string();
        assert!(err.contains("matrices"), "{err}");
        assert_eq!(act.stacked_grid(3, 62, 1).unwrap(), act.grid(3, 62));
        let source = wt.instantiate().expect("valid");
        assert!(
            source
                .source
                .contains("fathom::quantize_128x128<float, false, true>(")
        );
    }

    /// Every input's parameters come first, then the same ones for every input.
    #[test]
    fn the_inputs_parameters_lead() {
        let kinds = [
            QuantizeKind::Tile1x128,
            QuantizeKind::GatheredTile1x128,
            QuantizeKind::Tile128x1Transposed,
            QuantizeKind::GatheredTile128x1Transposed,
        ];
        for kind in kinds {
            let plain = QuantizeParams {
                kind,
                input: QuantizeInput::F32,
                pow2_scales: false,
            };
            let rest = |p: QuantizeParams| p.kernel_params()[p.input_params()..].to_vec();
            for input in [
                QuantizeInput::Bf16,
                QuantizeInput::E4m3Tiles,
                QuantizeInput::F32Product,
            ] {
                let other = QuantizeParams { input, ..plain };
                assert_eq!(rest(other), rest(plain), "{}", other.name());
                assert_eq!(other.kernel_params()[0].name, "x");
            }
        }
    }

    /// A saved activation's codes re-quantised: the codes, their scales and their own rows come
    /// first, and the template reads them through `E4m3Tiles`; weights' blocks refuse them.
    #[test]
    fn e4m3_tiles_are_read_through_their_source() {
        let retile = QuantizeParams {
            kind: QuantizeKind::GatheredTile128x1Transposed,
            input: QuantizeInput::E4m3Tiles,
            pow2_scales: false,
        };
        assert_eq!(retile.name(), "quantize_128x1t_gathered_e4m3tiles_e4m3");
        let params: Vec<_> = (retile.kernel_params().iter())
            .map(|p| (p.name, p.ty))
            .collect();
        assert_eq!(
            params[..4],
            [
                ("x", ParamType::ConstPtr(Elem::E4m3)),
                ("x_scales", ParamType::ConstPtr(Elem::F32)),
                ("x_rows", ParamType::I32),
                ("source_rows", ParamType::ConstPtr(Elem::I32)),
            ]
        );
        let source = retile.instantiate().unwrap().source;
        assert!(source.contains("fathom::quantize_128x1t_gathered<false>("));
        assert!(source.contains(
            "fathom::E4m3Tiles{x, x_scales, x_rows, cols}, source_rows, q, scales, rows, cols);"
        ));
        let blocks = QuantizeParams {
            kind: QuantizeKind::Block128x128 { transpose: false },
            ..retile
        };
        let refused = blocks.check_problem(128, 128).unwrap_err().to_string();
        assert!(refused.contains("input"), "{refused}");
        assert!(blocks.instantiate().is_err());
    }

    #[test]
    fn gathered_128x1_tiles_are_the_transposed_kind_of_gathered_rows() {
        let plain = QuantizeParams {
            kind: QuantizeKind::Tile128x1Transposed,
            input: QuantizeInput::F32,
            pow2_scales: false,
        };
        let gathered = QuantizeParams {
            kind: QuantizeKind::GatheredTile128x1Transposed,
            ..plain
        };
        assert_eq!(gathered.name(), "quantize_128x1t_gathered_f32_e4m3");
        assert!(gathered.kind.gathers() && !plain.kind.gathers());
        assert!(QuantizeKind::GatheredTile1x128.gathers());
        // `rows` counts the padded rows: the layouts and grid are the plain kind's.
        assert_eq!(gathered.grid(640, 72), plain.grid(640, 72));
        assert_eq!(gathered.grid(640, 72), [3, 5, 1]);
        assert_eq!(gathered.codes_shape(640, 72), (72, 640));
        assert_eq!(gathered.codes_shape(150, 72), plain.codes_shape(150, 72));
        assert!(gathered.check_problem(640, 70).is_ok());
        let params: Vec<_> = gathered
            .kernel_params()
            .iter()
            .map(|p| (p.name, p.ty))
            .collect();
        assert_eq!(
            params,
            [
                ("x", ParamType::ConstPtr(Elem::F32)),
                ("source_rows", ParamType::ConstPtr(Elem::I32)),
                ("q", ParamType::MutPtr(Elem::E4m3)),
                ("scales", ParamType::MutPtr(Elem::F32)),
                ("rows", ParamType::I32),
                ("cols", ParamType::I32),
            ]
        );
        let pow2 = QuantizeParams {
            input: QuantizeInput::Bf16,
            pow2_scales: true,
            ..gathered
        };
        assert_eq!(pow2.name(), "quantize_128x1t_gathered_bf16_e4m3_pow2");
        let kernel = pow2.instantiate().expect("valid");
        assert_eq!(kernel.arch_requirement, ArchRequirement::Sm80OrNewer);
        insta::assert_snapshot!(kernel.generated_wrapper());
    }
}
