//! Adjacent loop nests over the same domain merged into one.
//!
//! The lowering gives every materialised node a kernel of its own, so a softmax was four passes
//! over the scores — the row max, the exponentials, their sum, the division — each reading back
//! from memory what the one before had just written. Merged, each row is one unit of work: its
//! values are re-read from cache, and the row values (the max, the sum) are not re-read at all.
//!
//! A kernel joins the one before it when both are loop nests over the same domain at the same
//! place in the model, it reads some of the earlier one's results (merging independent kernels
//! would save nothing but a launch, and would pair unrelated kernels: the CUDA backend could no
//! longer share one source among the parts of a stack), it writes nothing the earlier one reads
//! or writes, and what it reads of the earlier one's results is either
//! - element for element what the earlier one stored there (a load through the very view of a
//!   `Store`): every backend runs a row's (or point's) statements in order on one thread, so
//!   the load sees the value that thread stored (see `codegen::canon::check_dependencies` and
//!   the CPU JIT's `plan`), or
//! - a reduced row value stored by a `StoreRow` and loaded along that row, which becomes the
//!   `Row` itself (the very f32 that was stored).
//!
//! Results do not change by a bit: each statement computes what it computed before.

use crate::graph::NodeId;
use crate::kernel::{Expr, KernelBody, LoopNest, Stmt, View};

/// A kernel before it is named: what the lowering emitted for one node (or several, merged).
#[derive(Debug)]
pub(super) struct Pending {
    pub origin: String,
    /// The kernel-name words of the kernels it was merged from, each once, in order.
    pub whats: Vec<&'static str>,
    pub nodes: Vec<NodeId>,
    pub body: KernelBody,
}

/// `kernels` with every loop nest that may join the one before it merged into it.
pub(super) fn merge_adjacent(kernels: Vec<Pending>) -> Vec<Pending> {
    let mut out: Vec<Pending> = Vec::with_capacity(kernels.len());
    for kernel in kernels {
        if let Some(last) = out.last_mut()
            && last.origin == kernel.origin
            && let (KernelBody::Loop(first), KernelBody::Loop(second)) =
                (&mut last.body, &kernel.body)
            && let Some(body) = appended(first, second)
        {
            first.body = body;
            last.nodes.extend(kernel.nodes);
            last.nodes.sort();
            last.nodes.dedup();
            for what in kernel.whats {
                if !last.whats.contains(&what) {
                    last.whats.push(what);
                }
            }
            continue;
        }
        out.push(kernel);
    }
    out
}

/// The body of `first` followed by that of `second`, its reads of `first`'s results relinked,
/// or `None` when `second` may not join `first`.
fn appended(first: &LoopNest, second: &LoopNest) -> Option<Vec<Stmt>> {
    if first.domain != second.domain {
        return None;
    }
    let touched_by_first = |view: &View| {
        first.body.iter().any(|stmt| {
            let mut loaded = false;
            stmt.value()
                .for_each_load(&mut |v| loaded |= v.buffer == view.buffer);
            loaded || stmt.target().is_some_and(|v| v.buffer == view.buffer)
        })
    };
    if second
        .body
        .iter()
        .any(|stmt| stmt.target().is_some_and(touched_by_first))
    {
        return None;
    }
    let mut reads_first = false;
    for stmt in &second.body {
        stmt.value().for_each_load(&mut |view| {
            reads_first |= first
                .body
                .iter()
                .any(|s| s.target().is_some_and(|t| t.buffer == view.buffer))
        });
    }
    if !reads_first {
        return None;
    }
    // Rows of `second` are numbered after those of `first`.
    let shift = first
        .body
        .iter()
        .filter_map(|stmt| match stmt {
            Stmt::Reduce { row, .. } => Some(row + 1),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let outer = first.domain.len().saturating_sub(1);
    let relink = |expr: &Expr| relinked(expr, &first.body, outer, shift);
    let mut body = first.body.clone();
    for stmt in &second.body {
        body.push(match stmt {
            Stmt::Reduce { row, op, value } => Stmt::Reduce {
                row: row + shift,
                op: *op,
                value: relink(value)?,
            },
            Stmt::Store { view, value } => Stmt::Store {
                view: view.clone(),
                value: relink(value)?,
            },
            Stmt::StoreRow { view, value } => Stmt::StoreRow {
                view: view.clone(),
                value: relink(value)?,
            },
        });
    }
    Some(body)
}

/// `expr` of the second kernel inside the merged one: rows shifted by `shift`, loads of what
/// `first` stores kept when element for element, turned into the row value when along a row,
/// and `None` for any other read of `first`'s results.
fn relinked(expr: &Expr, first: &[Stmt], outer: usize, shift: usize) -> Option<Expr> {
    let go = |e: &Expr| relinked(e, first, outer, shift).map(Box::new);
    Some(match expr {
        Expr::Load(view) => {
            let mut writers = first
                .iter()
                .filter(|stmt| stmt.target().is_some_and(|v| v.buffer == view.buffer));
            match (writers.next(), writers.next()) {
                (None, _) => Expr::Load(view.clone()),
                (Some(Stmt::Store { view: stored, .. }), None) if stored == view => {
                    Expr::Load(view.clone())
                }
                (
                    Some(Stmt::StoreRow {
                        view: stored,
                        value: Expr::Row(row),
                    }),
                    None,
                ) if along_row(stored, view, outer) => Expr::Row(*row),
                _ => return None,
            }
        }
        Expr::Constant(c) => Expr::Constant(*c),
        Expr::Row(r) => Expr::Row(r + shift),
        Expr::Unary(op, a) => Expr::Unary(*op, go(a)?),
        Expr::Binary(op, a, b) => Expr::Binary(*op, go(a)?, go(b)?),
        Expr::Compare(op, a, b) => Expr::Compare(*op, go(a)?, go(b)?),
        Expr::Select(c, a, b) => Expr::Select(go(c)?, go(a)?, go(b)?),
        Expr::Cast(to, a) => Expr::Cast(*to, go(a)?),
    })
}

/// Whether `load` reads, at every point of a row, the one element `stored` (a `StoreRow`'s
/// view) writes for that row.
fn along_row(stored: &View, load: &View, outer: usize) -> bool {
    stored.offset == load.offset
        && stored.strides.get(..outer) == load.strides.get(..outer)
        && load.strides.get(outer).is_none_or(|&s| s == 0)
}

#[cfg(test)]
mod tests {
    use super::{Pending, merge_adjacent};
    use crate::graph::{BinaryOp, NodeId, ReduceOp, UnaryOp};
    use crate::kernel::tests::{load, view};
    use crate::kernel::{Expr, KernelBody, LoopNest, Stmt};

    fn kernel(what: &'static str, node: u32, domain: &[usize], body: Vec<Stmt>) -> Pending {
        Pending {
            origin: "attention".to_owned(),
            whats: vec![what],
            nodes: vec![NodeId(node)],
            body: KernelBody::Loop(LoopNest {
                domain: domain.to_vec(),
                body,
            }),
        }
    }

    /// `b<to> = op(b<from>)` per row (a `StoreRow` of row 0), as the lowering emits a
    /// reduction of node `to`.
    fn row_reduce(op: ReduceOp, from: u32, to: u32) -> Pending {
        kernel(
            "reduce",
            to,
            &[2, 8],
            vec![
                Stmt::Reduce {
                    row: 0,
                    op,
                    value: load(from, &[8, 1]),
                },
                Stmt::StoreRow {
                    view: view(to, &[1, 0]),
                    value: Expr::Row(0),
                },
            ],
        )
    }

    /// `b1 = max(b0)` per row.
    fn row_max() -> Pending {
        row_reduce(ReduceOp::Max, 0, 1)
    }

    fn body(kernel: &Pending) -> &[Stmt] {
        match &kernel.body {
            KernelBody::Loop(nest) => &nest.body,
            KernelBody::Library(_) => unreachable!("loops only"),
        }
    }

    #[test]
    fn a_softmax_becomes_one_kernel_reading_its_row_values_and_its_own_stores() {
        let shifted = Expr::Binary(
            BinaryOp::Sub,
            Box::new(load(0, &[8, 1])),
            Box::new(load(1, &[1, 0])),
        );
        let exp = kernel(
            "exp",
            2,
            &[2, 8],
            vec![Stmt::Store {
                view: view(2, &[8, 1]),
                value: Expr::Unary(UnaryOp::Exp, Box::new(shifted)),
            }],
        );
        let sum = row_reduce(ReduceOp::Sum, 2, 3);
        let div = kernel(
            "div",
            4,
            &[2, 8],
            vec![Stmt::Store {
                view: view(4, &[8, 1]),
                value: Expr::Binary(
                    BinaryOp::Div,
                    Box::new(load(2, &[8, 1])),
                    Box::new(load(3, &[1, 0])),
                ),
            }],
        );
        let merged = merge_adjacent(vec![row_max(), exp, sum, div]);
        assert_eq!(merged.len(), 1);
        let softmax = &merged[0];
        assert_eq!(softmax.whats, ["reduce", "exp", "div"]);
        assert_eq!(softmax.nodes, (1..=4).map(NodeId).collect::<Vec<_>>());
        // The max and the sum are read as rows (the sum renumbered after the max), the
        // exponentials through the very view that stores them.
        let exponentials = Expr::Unary(
            UnaryOp::Exp,
            Box::new(Expr::Binary(
                BinaryOp::Sub,
                Box::new(load(0, &[8, 1])),
                Box::new(Expr::Row(0)),
            )),
        );
        let expected = [
            body(&row_max()),
            &[
                Stmt::Store {
                    view: view(2, &[8, 1]),
                    value: exponentials,
                },
                Stmt::Reduce {
                    row: 1,
                    op: ReduceOp::Sum,
                    value: load(2, &[8, 1]),
                },
                Stmt::StoreRow {
                    view: view(3, &[1, 0]),
                    value: Expr::Row(1),
                },
                Stmt::Store {
                    view: view(4, &[8, 1]),
                    value: Expr::Binary(
                        BinaryOp::Div,
                        Box::new(load(2, &[8, 1])),
                        Box::new(Expr::Row(1)),
                    ),
                },
            ],
        ]
        .concat();
        assert_eq!(body(softmax), expected);
    }

    #[test]
    fn kernels_stay_apart_when_a_row_would_read_another_rows_results() {
        // The row max read along the wrong axis (every row reads row 0's).
        let other_row = kernel(
            "sub",
            2,
            &[2, 8],
            vec![Stmt::Store {
                view: view(2, &[8, 1]),
                value: load(1, &[0, 0]),
            }],
        );
        assert_eq!(merge_adjacent(vec![row_max(), other_row]).len(), 2);
        // The first kernel's stores read transposed.
        let store = |buffer, from: Expr| Stmt::Store {
            view: view(buffer, &[4, 1]),
            value: from,
        };
        let square = |node| kernel("copy", node, &[4, 4], vec![store(1, load(0, &[4, 1]))]);
        let transposed = kernel("copy", 2, &[4, 4], vec![store(2, load(1, &[1, 4]))]);
        assert_eq!(merge_adjacent(vec![square(1), transposed]).len(), 2);
        // Writing what the first kernel reads or writes (the second part of a concatenation).
        let overwrite = kernel("copy", 2, &[4, 4], vec![store(0, load(3, &[4, 1]))]);
        assert_eq!(merge_adjacent(vec![square(1), overwrite]).len(), 2);
        let same_buffer = kernel("copy", 2, &[4, 4], vec![store(1, load(3, &[4, 1]))]);
        assert_eq!(merge_adjacent(vec![square(1), same_buffer]).len(), 2);
        // Independent of the first kernel.
        let independent = kernel("copy", 2, &[4, 4], vec![store(2, load(3, &[4, 1]))]);
        assert_eq!(merge_adjacent(vec![square(1), independent]).len(), 2);
        // Another domain, or another place in the model.
        let wider = kernel("copy", 2, &[4, 8], vec![store(2, load(1, &[0, 1]))]);
        assert_eq!(merge_adjacent(vec![square(1), wider]).len(), 2);
        let mut elsewhere = kernel("copy", 2, &[4, 4], vec![store(2, load(1, &[4, 1]))]);
        assert_eq!(merge_adjacent(vec![square(1), elsewhere]).len(), 1);
        elsewhere = kernel("copy", 2, &[4, 4], vec![store(2, load(1, &[4, 1]))]);
        elsewhere.origin = "mlp".to_owned();
        assert_eq!(merge_adjacent(vec![square(1), elsewhere]).len(), 2);
    }
}
