//! The canonical form of a loop nest, from which its CUDA source is generated.
//!
//! Buffers become kernel parameters in first-use order (`BufferId(i)` stands for parameter `i`),
//! and each parameter's base is the smallest offset among the views of its buffer, so that view
//! offsets are relative to the pointer the launcher passes. Two loop nests with equal canonical
//! forms — the same layer repeated, or the same copy into different expert slots — get the same
//! source text by construction; the canonical form is also the memoisation key.

use std::collections::HashMap;

use crate::kernel::{BufferId, Expr, LoopNest, Stmt, View};

use super::{Access, CodegenError};

/// A kernel parameter: which buffer it is, where its pointer starts, and how it is used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Param {
    pub buffer: BufferId,
    /// Elements from the buffer's start to the pointer passed to the kernel.
    pub base: usize,
    pub access: Access,
    /// `in0`, `in1`, … for read-only parameters, `out0`, … for written ones.
    pub name: String,
}

/// A loop nest over parameters instead of buffers.
#[derive(Clone, Debug)]
pub(crate) struct Canonical {
    pub nest: LoopNest,
    pub params: Vec<Param>,
}

impl Canonical {
    pub fn of(nest: &LoopNest) -> Self {
        // First use: the loads of each statement's value, then the view it stores.
        let mut order: Vec<BufferId> = Vec::new();
        let mut written: Vec<BufferId> = Vec::new();
        let mut base: HashMap<BufferId, usize> = HashMap::new();
        let mut visit = |view: &View, writes: bool| {
            if !order.contains(&view.buffer) {
                order.push(view.buffer);
            }
            if writes && !written.contains(&view.buffer) {
                written.push(view.buffer);
            }
            let b = base.entry(view.buffer).or_insert(view.offset);
            *b = (*b).min(view.offset);
        };
        for stmt in &nest.body {
            match stmt {
                Stmt::Reduce { value, .. } => value.for_each_load(&mut |v| visit(v, false)),
                Stmt::Store { view, value } | Stmt::StoreRow { view, value } => {
                    value.for_each_load(&mut |v| visit(v, false));
                    visit(view, true);
                }
            }
        }
        let mut loaded: Vec<BufferId> = Vec::new();
        for stmt in &nest.body {
            stmt.value().for_each_load(&mut |v| {
                if !loaded.contains(&v.buffer) {
                    loaded.push(v.buffer);
                }
            });
        }
        let (mut ins, mut outs) = (0, 0);
        let params: Vec<Param> = order
            .iter()
            .map(|&buffer| {
                let (access, name) = match (written.contains(&buffer), loaded.contains(&buffer)) {
                    (false, _) => {
                        ins += 1;
                        (Access::Read, format!("in{}", ins - 1))
                    }
                    (true, reads) => {
                        outs += 1;
                        let access = if reads {
                            Access::ReadWrite
                        } else {
                            Access::Write
                        };
                        (access, format!("out{}", outs - 1))
                    }
                };
                Param {
                    buffer,
                    base: base[&buffer],
                    access,
                    name,
                }
            })
            .collect();
        let index: HashMap<BufferId, usize> =
            order.iter().enumerate().map(|(i, b)| (*b, i)).collect();
        let rename = |view: &View| View {
            buffer: BufferId(index[&view.buffer] as u32),
            offset: view.offset - base[&view.buffer],
            strides: view.strides.clone(),
        };
        let body = nest
            .body
            .iter()
            .map(|stmt| match stmt {
                Stmt::Reduce { row, op, value } => Stmt::Reduce {
                    row: *row,
                    op: *op,
                    value: map_views(value, &rename),
                },
                Stmt::Store { view, value } => Stmt::Store {
                    view: rename(view),
                    value: map_views(value, &rename),
                },
                Stmt::StoreRow { view, value } => Stmt::StoreRow {
                    view: rename(view),
                    value: map_views(value, &rename),
                },
            })
            .collect();
        Canonical {
            nest: LoopNest {
                domain: nest.domain.clone(),
                body,
            },
            params,
        }
    }

    /// The memoisation key: equal keys give equal sources.
    pub fn key(&self) -> String {
        let accesses: Vec<Access> = self.params.iter().map(|p| p.access).collect();
        format!("{:?}{accesses:?}", self.nest)
    }

    /// Whether the nest has per-row work (reductions or per-row stores).
    pub fn has_rows(&self) -> bool {
        self.nest
            .body
            .iter()
            .any(|s| matches!(s, Stmt::Reduce { .. } | Stmt::StoreRow { .. }))
    }

    /// Checks that the threads of the generated kernel never race: no store writes one element
    /// for several points, and every load of a written parameter must read exactly the element the
    /// same thread stores (an identical view), or — in a row kernel — a value stored once per
    /// row by an earlier `StoreRow` of the same row (broadcast along the row after a barrier).
    /// Returns the statements that must be preceded by a barrier.
    pub fn check_dependencies(&self, kernel: &str) -> Result<Vec<bool>, CodegenError> {
        let body = &self.nest.body;
        let outer = self.nest.domain.len().saturating_sub(1);
        let mut barrier_before = vec![false; body.len()];
        for (k, stmt) in body.iter().enumerate() {
            // A store that repeats an element along an axis would have threads race for it
            // (the CPU keeps the last value); per-row stores repeat along the row by design.
            if let Stmt::Store { view, .. } = stmt
                && let Some(d) = (0..self.nest.domain.len())
                    .find(|&d| self.nest.domain[d] > 1 && view.strides.get(d) == Some(&0))
            {
                return Err(CodegenError::UnsupportedDependency {
                    kernel: kernel.to_owned(),
                    detail: format!(
                        "statement {k} stores every index of axis {d} into the same element of {}",
                        self.params[view.buffer.index()].name
                    ),
                });
            }
            let mut problem = None;
            stmt.value().for_each_load(&mut |load| {
                for (w, other) in body.iter().enumerate() {
                    let Some((written, per_row)) = stored_view(other) else {
                        continue;
                    };
                    if written.buffer != load.buffer || written == load && !per_row {
                        continue;
                    }
                    let same_row = written.offset == load.offset
                        && written.strides[..outer] == load.strides[..outer]
                        && load.strides.get(outer).is_none_or(|s| *s == 0);
                    if per_row && w < k && same_row {
                        barrier_before[k] = true;
                    } else if problem.is_none() {
                        problem = Some(format!(
                            "statement {k} loads {} through a view other than the one \
                             statement {w} stores it through",
                            self.params[load.buffer.index()].name
                        ));
                    }
                }
            });
            if let Some(detail) = problem {
                return Err(CodegenError::UnsupportedDependency {
                    kernel: kernel.to_owned(),
                    detail,
                });
            }
        }
        Ok(barrier_before)
    }
}

/// The view a statement stores through, and whether it stores once per row.
fn stored_view(stmt: &Stmt) -> Option<(&View, bool)> {
    stmt.target()
        .map(|view| (view, matches!(stmt, Stmt::StoreRow { .. })))
}

fn map_views(expr: &Expr, f: &impl Fn(&View) -> View) -> Expr {
    let map = |e: &Expr| Box::new(map_views(e, f));
    match expr {
        Expr::Load(view) => Expr::Load(f(view)),
        Expr::Constant(c) => Expr::Constant(*c),
        Expr::Row(r) => Expr::Row(*r),
        Expr::Unary(op, a) => Expr::Unary(*op, map(a)),
        Expr::Binary(op, a, b) => Expr::Binary(*op, map(a), map(b)),
        Expr::Compare(op, a, b) => Expr::Compare(*op, map(a), map(b)),
        Expr::Select(c, a, b) => Expr::Select(map(c), map(a), map(b)),
        Expr::Cast(to, a) => Expr::Cast(*to, map(a)),
    }
}
