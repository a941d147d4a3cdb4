//! What must hold before a loop nest is compiled, checked once per kernel: every access stays
//! inside its buffer (the generated code does no bounds checks), a buffer the kernel writes is
//! read only element for element as it is written (the code streams element by element, where
//! the reference computes a whole row before storing it; both agree when each element read is
//! the one the same point stores), rows are defined before they are used, and — for splitting
//! rows across threads — whether different rows write disjoint elements.

use fathom_compiler::kernel::{Buffer, BufferId, Expr, LoopNest, Stmt, View};

use super::JitError;

/// A loop nest's shape and the facts the code generator and the executor rely on.
#[derive(Debug)]
pub(super) struct NestPlan {
    /// The buffers the kernel touches; the generated function receives their base pointers in
    /// this order.
    pub slots: Vec<BufferId>,
    /// The element count of each slot's buffer, which the bounds proof assumed.
    pub lens: Vec<usize>,
    /// Whether the kernel writes each slot's buffer (the others it only reads).
    pub written: Vec<bool>,
    /// Extents of the outer axes.
    pub outer: Vec<usize>,
    /// Extent of the innermost axis (1 for a scalar domain, as in the reference).
    pub inner: usize,
    /// Number of rows: the product of the outer extents.
    pub rows: usize,
    /// Whether different rows write disjoint elements, so rows may run on different threads.
    pub parallel: bool,
}

impl NestPlan {
    pub fn slot(&self, buffer: BufferId) -> usize {
        self.slots
            .iter()
            .position(|&b| b == buffer)
            .expect("every view's buffer has a slot")
    }

    /// A view's stride along the innermost axis (0 in a scalar domain, as in the reference).
    pub fn inner_stride(&self, view: &View) -> isize {
        view.strides.get(self.outer.len()).copied().unwrap_or(0)
    }
}

/// The views a statement reads or writes, with whether each is written.
pub(super) fn views(stmt: &Stmt) -> Vec<(&View, bool)> {
    let mut out = Vec::new();
    match stmt {
        Stmt::Reduce { value, .. } => loads(value, &mut out),
        Stmt::Store { view, value } | Stmt::StoreRow { view, value } => {
            loads(value, &mut out);
            out.push((view, true));
        }
    }
    out
}

fn loads<'a>(expr: &'a Expr, out: &mut Vec<(&'a View, bool)>) {
    match expr {
        Expr::Load(view) => out.push((view, false)),
        Expr::Constant(_) | Expr::Row(_) => {}
        Expr::Unary(_, a) | Expr::Cast(_, a) => loads(a, out),
        Expr::Binary(_, a, b) | Expr::Compare(_, a, b) => {
            loads(a, out);
            loads(b, out);
        }
        Expr::Select(c, a, b) => {
            loads(c, out);
            loads(a, out);
            loads(b, out);
        }
    }
}

fn for_each_row(expr: &Expr, visit: &mut impl FnMut(usize)) {
    match expr {
        Expr::Row(r) => visit(*r),
        Expr::Load(_) | Expr::Constant(_) => {}
        Expr::Unary(_, a) | Expr::Cast(_, a) => for_each_row(a, visit),
        Expr::Binary(_, a, b) | Expr::Compare(_, a, b) => {
            for_each_row(a, visit);
            for_each_row(b, visit);
        }
        Expr::Select(c, a, b) => {
            for_each_row(c, visit);
            for_each_row(a, visit);
            for_each_row(b, visit);
        }
    }
}

pub(super) fn plan(nest: &LoopNest, buffers: &[Buffer]) -> Result<NestPlan, JitError> {
    let (outer, inner) = match nest.domain.split_last() {
        Some((&inner, outer)) => (outer.to_vec(), inner),
        None => (Vec::new(), 1),
    };
    let rows: usize = outer.iter().product();
    let rank = nest.domain.len();

    let mut slots: Vec<BufferId> = Vec::new();
    let mut reads: Vec<&View> = Vec::new();
    let mut writers: Vec<(BufferId, usize)> = Vec::new();
    let mut defined: Vec<usize> = Vec::new();
    for stmt in &nest.body {
        let value = match stmt {
            Stmt::Reduce { value, .. }
            | Stmt::Store { value, .. }
            | Stmt::StoreRow { value, .. } => value,
        };
        let mut used = Vec::new();
        for_each_row(value, &mut |r| used.push(r));
        if let Some(&row) = used.iter().find(|r| !defined.contains(r)) {
            return Err(JitError::RowBeforeReduce { row });
        }
        if let Stmt::Reduce { row, .. } = stmt {
            defined.push(*row);
        }
        for (view, written) in views(stmt) {
            // A StoreRow touches inner index 0 only; every other access spans the domain.
            let row_only = written && matches!(stmt, Stmt::StoreRow { .. });
            check_bounds(view, rank, &outer, inner, row_only, buffers)?;
            if !slots.contains(&view.buffer) {
                slots.push(view.buffer);
            }
            if written {
                match writers.iter_mut().find(|(b, _)| *b == view.buffer) {
                    Some(entry) => entry.1 += 1,
                    None => writers.push((view.buffer, 1)),
                }
            } else {
                reads.push(view);
            }
        }
    }
    // A written buffer may be read through the view of its one `Store` (a merged kernel
    // reading back what an earlier statement stored): each point then reads what it wrote.
    let written_elementwise = |view: &View| {
        let mut stores = nest
            .body
            .iter()
            .filter(|s| s.target().is_some_and(|t| t.buffer == view.buffer));
        matches!(
            (stores.next(), stores.next()),
            (Some(Stmt::Store { view: stored, .. }), None) if stored == view
        )
    };
    if let Some(view) = reads
        .iter()
        .find(|v| writers.iter().any(|(b, _)| *b == v.buffer) && !written_elementwise(v))
    {
        return Err(JitError::ReadsItsOutput {
            buffer: view.buffer,
        });
    }
    // Rows write disjoint elements when each written buffer has one writer whose view maps
    // distinct points of its loops to distinct elements.
    let parallel = nest.body.iter().all(|stmt| match stmt {
        Stmt::Reduce { .. } => true,
        Stmt::Store { view, .. } => {
            writers.iter().any(|&(b, n)| b == view.buffer && n == 1)
                && injective(&domain_strides(view, rank), &nest.domain)
        }
        Stmt::StoreRow { view, .. } => {
            writers.iter().any(|&(b, n)| b == view.buffer && n == 1)
                && injective(&view.strides[..outer.len()], &outer)
        }
    });
    let lens = slots
        .iter()
        .map(|b| buffers[b.index()].ty.numel())
        .collect();
    let written = slots
        .iter()
        .map(|b| writers.iter().any(|(w, _)| w == b))
        .collect();
    Ok(NestPlan {
        slots,
        lens,
        written,
        outer,
        inner,
        rows,
        parallel,
    })
}

/// Whether every element the view touches lies inside its buffer.
fn check_bounds(
    view: &View,
    rank: usize,
    outer: &[usize],
    inner: usize,
    row_only: bool,
    buffers: &[Buffer],
) -> Result<(), JitError> {
    // As in the reference: a stride per outer axis, the inner one 0 when absent.
    if view.strides.len() < outer.len() {
        return Err(JitError::StrideRank {
            buffer: view.buffer,
            strides: view.strides.len(),
            rank,
        });
    }
    let Some(buffer) = buffers.get(view.buffer.index()) else {
        return Err(JitError::NoSuchBuffer {
            buffer: view.buffer,
        });
    };
    let len = buffer.ty.numel();
    // Conservative: an axis of extent 0 is treated as extent 1 (the code for a StoreRow still
    // reads inner index 0 when the inner extent is 0, as the reference does).
    let inner_extent = if row_only { 1 } else { inner.max(1) };
    let extents = outer
        .iter()
        .copied()
        .chain((rank > 0).then_some(inner_extent));
    let (mut low, mut high) = (view.offset as i128, view.offset as i128);
    for (extent, stride) in extents.zip(domain_strides(view, rank)) {
        let span = (extent.max(1) - 1) as i128 * stride as i128;
        if span < 0 {
            low += span;
        } else {
            high += span;
        }
    }
    if low < 0 || high >= len as i128 {
        return Err(JitError::OutOfBounds {
            buffer: view.buffer,
            low: low as i64,
            high: high as i64,
            len,
        });
    }
    Ok(())
}

/// The view's stride along each domain axis, as the reference reads them: the inner one is 0
/// when absent, extra ones are ignored.
fn domain_strides(view: &View, rank: usize) -> Vec<isize> {
    (0..rank)
        .map(|d| view.strides.get(d).copied().unwrap_or(0))
        .collect()
}

/// A sufficient condition for `(i_0, …) ↦ Σ i_d · strides[d]` to be one-to-one over `extents`:
/// taken by increasing |stride|, each stride exceeds the farthest reach of the smaller ones
/// (true of every dense or sliced row-major layout, false for any broadcast of extent > 1).
fn injective(strides: &[isize], extents: &[usize]) -> bool {
    let mut axes: Vec<(usize, usize)> = strides
        .iter()
        .zip(extents)
        .filter(|&(_, &n)| n > 1)
        .map(|(&s, &n)| (s.unsigned_abs(), n))
        .collect();
    axes.sort_unstable();
    let mut reach: usize = 0;
    for (stride, extent) in axes {
        if stride <= reach {
            return false;
        }
        reach = match stride
            .checked_mul(extent - 1)
            .and_then(|r| r.checked_add(reach))
        {
            Some(r) => r,
            None => return false,
        };
    }
    true
}

#[cfg(test)]
mod tests {
    use super::injective;

    #[test]
    fn injectivity_accepts_dense_and_sliced_layouts_only() {
        assert!(injective(&[12, 4, 1], &[2, 3, 4]));
        assert!(injective(&[1, 3], &[3, 5])); // transposed
        assert!(injective(&[24, 1], &[2, 4])); // a slice of wider rows
        assert!(injective(&[0, 1], &[1, 8])); // a broadcast of extent 1 writes nothing twice
        assert!(!injective(&[0, 1], &[2, 8])); // a broadcast store
        assert!(!injective(&[2, 1], &[3, 4])); // overlapping rows
        assert!(injective(&[], &[]));
    }
}
