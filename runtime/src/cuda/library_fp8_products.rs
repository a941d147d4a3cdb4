//! Products computed where they are quantised. The experts' backward multiplies the combine
//! gradient by each slot's routing weight, `g[t][k][h] = dy[t][h] · w[t][k]`, a `[tokens, 8,
//! hidden]` f32 tensor stored by one loop nest and read only by the FP8 GEMMs' `quantize` steps
//! (the down projection's input gradient and weight gradient). Such a loop nest launches nothing
//! on the GPU: the `quantize` steps read its two factors ([`QuantizeInput::F32Product`]) and
//! multiply them as the loop nest would, one f32 multiply, so every code is unchanged, and the
//! product is never written nor read back (at DeepSeek-V3's sizes 0.94 GB per layer and
//! micro-batch, written once and read twice).
//!
//! A loop nest qualifies when its body is one `Store` of `Load(x) * Load(y)` into a whole
//! temporary (no output, no window into it), each factor's index is `(r / div)·stride +
//! c·col_stride` over the product's `[rows][cols]` (broadcasts over trailing row axes, and
//! plain rows), neither factor is written before the last `quantize` reads them, and every step
//! naming the product is such a `quantize` reading it whole.

use fathom_compiler::graph::BinaryOp;
use fathom_compiler::kernel::{BufferId, Expr, KernelBody, LoopNest, Program, Stmt, View};
use fathom_kernels::QuantizeInput;

use super::library::{LibraryCall, StepArg};
use super::library_fp8_saved::{quantize_only_readers, read_input_as};

/// Why a loop nest launches nothing on the GPU.
pub(crate) const PRODUCT_QUANTIZED_WHERE_READ: &str =
    "a product read only by FP8 quantisations, which multiply its factors as they read them";

/// A factor's index over the product's `[rows][cols]`: `(r / div)·row_stride + c·col_stride`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FactorIndex {
    pub div: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl FactorIndex {
    /// The index of `view` over a loop domain whose last axis is the columns, when it has
    /// that form: trailing row axes of stride 0 (a broadcast) fold into `div`, the others must
    /// nest as one row axis. Axes of extent 1 take any stride.
    pub(crate) fn of(view: &View, domain: &[usize]) -> Option<Self> {
        let (&cols, rows) = domain.split_last()?;
        if view.offset != 0 || view.strides.len() != domain.len() {
            return None;
        }
        let strides: Vec<usize> =
            (view.strides.iter().map(|&s| usize::try_from(s).ok())).collect::<Option<_>>()?;
        let col_stride = if cols == 1 { 0 } else { strides[rows.len()] };
        let axes: Vec<(usize, usize)> = (rows.iter().copied().zip(strides))
            .filter(|&(extent, _)| extent > 1)
            .collect();
        // Trailing broadcast axes: every row within them reads the same factor row.
        let kept = axes
            .iter()
            .rposition(|&(_, stride)| stride != 0)
            .map_or(0, |i| i + 1);
        let div = axes[kept..].iter().map(|&(extent, _)| extent).product();
        let merged = &axes[..kept];
        // The rest must merge into one axis: each stride the next one's times its extent.
        let nests = merged.windows(2).all(|w| w[0].1 == w[1].1 * w[1].0);
        nests.then(|| FactorIndex {
            div,
            row_stride: merged.last().map_or(0, |&(_, stride)| stride),
            col_stride,
        })
    }
}

/// A loop nest storing the product of two views: its output, `[rows][cols]`, and its factors.
struct Product {
    out: BufferId,
    rows: usize,
    cols: usize,
    factors: [(View, FactorIndex); 2],
}

/// The views of a loop nest whose body is one store of the product of two loads: where it
/// stores, and the factors, in the expression's order.
pub(crate) fn product_of_loads(nest: &LoopNest) -> Option<(&View, &View, &View)> {
    let [
        Stmt::Store {
            view,
            value: Expr::Binary(BinaryOp::Mul, x, y),
        },
    ] = nest.body.as_slice()
    else {
        return None;
    };
    match (x.as_ref(), y.as_ref()) {
        (Expr::Load(x), Expr::Load(y)) => Some((view, x, y)),
        _ => None,
    }
}

impl Product {
    fn of(program: &Program, nest: &LoopNest) -> Option<Self> {
        let (view, x, y) = product_of_loads(nest)?;
        let (&cols, rows) = nest.domain.split_last()?;
        let rows: usize = rows.iter().product();
        let out = view.buffer;
        // The whole output, row-major over the domain (a stride along an axis of one element
        // is never taken).
        let contiguous = FactorIndex::of(view, &nest.domain).is_some_and(|index| {
            index.div == 1
                && (index.col_stride == 1 || cols == 1)
                && (index.row_stride == cols || rows == 1)
        });
        let whole = program.buffer(out).ty.numel() == rows * cols;
        // (Whether it is a temporary no output holds, `quantize_only_readers` checks.)
        if !(contiguous && whole) {
            return None;
        }
        let x_index = FactorIndex::of(x, &nest.domain)?;
        let y_index = FactorIndex::of(y, &nest.domain)?;
        Some(Product {
            out,
            rows,
            cols,
            factors: [(x.clone(), x_index), (y.clone(), y_index)],
        })
    }
}

/// Lets the `quantize` steps reading a qualifying product multiply its factors, and skips the
/// loop nests storing them (see the module docs).
pub(crate) fn quantize_products_where_read(program: &Program, calls: &mut [Option<LibraryCall>]) {
    let writes: Vec<Vec<BufferId>> = (program.kernels.iter())
        .map(|k| k.reads_and_writes().1)
        .collect();
    for (position, kernel) in program.kernels.iter().enumerate() {
        let KernelBody::Loop(nest) = &kernel.body else {
            continue;
        };
        let Some(product) = Product::of(program, nest) else {
            continue;
        };
        let Some(ints) = product_ints(&product) else {
            continue;
        };
        let out = product.out;
        let shape = (product.rows, product.cols);
        let Some(readers) = quantize_only_readers(program, calls, out, shape, position) else {
            continue;
        };
        // The factors as the loop nest would read them, until the last quantisation.
        let last = readers.iter().copied().max().unwrap_or(position);
        let factors: Vec<BufferId> = (product.factors.iter())
            .flat_map(|(view, _)| [view.buffer, program.holder(view.buffer).0])
            .collect();
        let factors_change =
            (position..=last).any(|k| writes[k].iter().any(|w| factors.contains(w)));
        if readers.is_empty() || factors_change {
            continue;
        }
        let [(x, _), (y, _)] = &product.factors;
        let mut source = vec![StepArg::Buffer(x.buffer, 0), StepArg::Buffer(y.buffer, 0)];
        source.extend(ints.map(StepArg::I32));
        for &j in &readers {
            if let Some(call) = calls[j].as_mut() {
                read_input_as(call, out, QuantizeInput::F32Product, &source);
            }
        }
        calls[position] = Some(LibraryCall {
            name: kernel.name.clone(),
            skipped: Some(PRODUCT_QUANTIZED_WHERE_READ),
            ..LibraryCall::default()
        });
    }
}

/// The six index ints of [`QuantizeInput::F32Product`] (`fathom_kernels::quantize::
/// PRODUCT_INTS` order), when they fit the kernels' 32-bit ints.
fn product_ints(product: &Product) -> Option<[i32; 6]> {
    let [(_, x), (_, y)] = &product.factors;
    let all = [
        x.div,
        x.row_stride,
        x.col_stride,
        y.div,
        y.row_stride,
        y.col_stride,
    ];
    let ints: Vec<i32> = all
        .iter()
        .map(|&v| i32::try_from(v).ok())
        .collect::<Option<_>>()?;
    ints.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(strides: &[isize]) -> View {
        View {
            buffer: BufferId(0),
            offset: 0,
            strides: strides.to_vec(),
        }
    }

    #[test]
    fn factor_indices_fold_broadcast_rows_and_merge_nested_ones() {
        let index = |div, row_stride, col_stride| {
            Some(FactorIndex {
                div,
                row_stride,
                col_stride,
            })
        };
        // dy[t][h] broadcast over the 8 slots of [t, 8, h]: row r = 8t + k reads dy row r / 8.
        assert_eq!(
            FactorIndex::of(&view(&[64, 0, 1]), &[16, 8, 64]),
            index(8, 64, 1)
        );
        // w[t][k] broadcast along h: row r reads w[r].
        assert_eq!(
            FactorIndex::of(&view(&[8, 1, 0]), &[16, 8, 64]),
            index(1, 1, 0)
        );
        // A contiguous [t, 8, h] tensor: plain rows.
        assert_eq!(
            FactorIndex::of(&view(&[512, 64, 1]), &[16, 8, 64]),
            index(1, 64, 1)
        );
        // An axis of extent 1 takes any stride; a 2-D view is rows as they are.
        assert_eq!(
            FactorIndex::of(&view(&[7, 64, 1]), &[1, 8, 64]),
            index(1, 64, 1)
        );
        assert_eq!(FactorIndex::of(&view(&[32, 1]), &[4, 32]), index(1, 32, 1));
        // One row (a 1-D domain): no row stride.
        assert_eq!(FactorIndex::of(&view(&[1]), &[64]), index(1, 0, 1));
        // A transposed view: columns apart by its row count.
        assert_eq!(FactorIndex::of(&view(&[1, 16]), &[16, 64]), index(1, 1, 16));
        // Broadcast over the outer axis alone, an offset: not of the form.
        assert_eq!(FactorIndex::of(&view(&[0, 64, 1]), &[16, 8, 64]), None);
        let offset = View {
            offset: 3,
            ..view(&[64, 1])
        };
        assert_eq!(FactorIndex::of(&offset, &[16, 64]), None);
    }
}
