//! The cross-entropy and its gradient as one loop nest each, over the logits' rows with the
//! vocabulary innermost: the label's logit, the row's max and its sum of exponentials are
//! per-row reductions, so each row is read from memory once and reused from cache.
//!
//! Two forms of the pair. By default nothing vocabulary-wide is stored but the gradient itself,
//! which takes the forward's loss to skip the max and the sum and recomputes one exponential
//! per logit. Under [`LowerOptions::cross_entropy_keeps_exponentials`] (the CPU's choice) a
//! forward whose gradient the program computes also stores each row's exponentials `exp(x − m)`
//! and their sum, and the gradient is `(e / Σe − [v = label]) · g`, a pass of arithmetic with no
//! exponential and no reduction (the exponential is most of these kernels' work on the CPU).
//!
//! The label's position is found by comparing it with a constant index vector `0..vocab`
//! loaded along the inner axis (one small buffer per vocabulary size, shared by every such
//! kernel of the program): the kernel IR needs no notion of "the current index".
//!
//! Under [`LowerOptions::cross_entropy_routines`] (the CPU's choice where it has AVX-512) the
//! kept forward and its gradient are library calls instead, on dense buffers.
//!
//! [`LowerOptions::cross_entropy_keeps_exponentials`]: super::super::LowerOptions
//! [`LowerOptions::cross_entropy_routines`]: super::super::LowerOptions

use crate::graph::{BinaryOp, CompareOp, ConstantData, NodeId, Op, ReduceOp, UnaryOp};
use crate::kernel::{self, Buffer, BufferRole, Expr, KernelBody, Library, Stmt};
use crate::{DType, TensorType};

use super::super::{Affine, KernelBuilder, LowerError, StridedView, load, new_buffer};
use super::super::{temporary, what};
use super::Lowering;

/// What a cross-entropy's forward kernel stored for its gradient: each row's exponentials
/// `exp(x − m)` (the logits' shape) and their sum (one per row).
#[derive(Clone, Debug)]
pub(in crate::lower) struct KeptExponentials {
    exponentials: StridedView,
    sums: StridedView,
}

impl Lowering<'_> {
    /// Emits the loop nest (or, under [`LowerOptions::cross_entropy_routines`], the library
    /// call) of a `CrossEntropy` or `CrossEntropyGrad` node.
    pub(super) fn emit_cross_entropy(&mut self, id: NodeId) -> Result<(), LowerError> {
        if self.options.cross_entropy_routines && self.emit_cross_entropy_call(id)? {
            return Ok(());
        }
        let node = self.graph.node(id);
        let (logits, labels) = (node.inputs[0], node.inputs[1]);
        let domain = self.dims(logits).to_vec();
        let rank = domain.len();
        let vocab = domain[rank - 1];
        let identity = Affine::identity(rank);
        // Row operands (labels, the loss, the cotangent) follow the outer axes only.
        let per_row = Affine::picking(&(0..rank - 1).collect::<Vec<_>>(), rank);
        let along_vocab = Affine::picking(&[rank - 1], rank);

        let mut k = KernelBuilder::new(domain.clone());
        k.nodes.push(id);
        let label = self.expr(&mut k, labels, &per_row)?;
        let iota = load(
            &self.vocabulary_index(vocab, self.ty(labels).dtype),
            &along_vocab,
        );
        let is_label = Expr::Compare(CompareOp::Eq, Box::new(iota), Box::new(label.clone()));
        let counted = Expr::Compare(
            CompareOp::Ge,
            Box::new(label),
            Box::new(Expr::Constant(0.0)),
        );
        let ignoring_others =
            |value: Expr| Expr::Select(Box::new(counted.clone()), Box::new(value), zero());
        let out = new_buffer(&mut self.program, temporary(&node.ty));
        let out_view = StridedView::contiguous(out, node.ty.dims());
        // Either gradient: dx = (softmax − [v = label]) · g, its softmax computed either way.
        let store_gradient = |softmax: Expr, g: Expr| {
            let residual =
                Expr::Binary(BinaryOp::Sub, Box::new(softmax), Box::new(is_label.clone()));
            let dx = Expr::Binary(BinaryOp::Mul, Box::new(residual), Box::new(g));
            Stmt::Store {
                view: out_view.compose(&identity),
                value: ignoring_others(dx),
            }
        };

        let body = match node.inputs.get(2..4) {
            // The gradient of a forward that kept its exponentials.
            Some(&[loss, cotangent]) if self.kept_exponentials.contains_key(&loss) => {
                let kept = self.kept_exponentials[&loss].clone();
                let g = self.expr(&mut k, cotangent, &per_row)?;
                let softmax = Expr::Binary(
                    BinaryOp::Div,
                    Box::new(load(&kept.exponentials, &identity)),
                    Box::new(load(&kept.sums, &per_row)),
                );
                vec![store_gradient(softmax, g)]
            }
            backward => {
                let x = self.expr(&mut k, logits, &identity)?;
                let backward = match backward {
                    Some(&[loss, cotangent]) => Some((
                        self.expr(&mut k, loss, &per_row)?,
                        self.expr(&mut k, cotangent, &per_row)?,
                    )),
                    _ => None,
                };
                // Our row values come after any the operands' expressions reduced.
                let first_row = k.rows.len();
                let row = |r: usize| Box::new(Expr::Row(first_row + r));
                // The label's logit is the max of a row that is −∞ elsewhere: exact, and a
                // vector max is cheap. An ignored row picks −∞, and the select below zeroes it.
                let label_logit = Stmt::Reduce {
                    row: first_row,
                    op: ReduceOp::Max,
                    value: Expr::Select(
                        Box::new(is_label.clone()),
                        Box::new(x.clone()),
                        Box::new(Expr::Constant(f64::NEG_INFINITY)),
                    ),
                };
                match backward {
                    None => {
                        // loss = log Σ exp(x − m) − (x[label] − m), m the row's max.
                        let max = Stmt::Reduce {
                            row: first_row + 1,
                            op: ReduceOp::Max,
                            value: x.clone(),
                        };
                        let shifted = Expr::Binary(BinaryOp::Sub, Box::new(x), row(1));
                        let exponentials = Expr::Unary(UnaryOp::Exp, Box::new(shifted));
                        let label_shifted = Expr::Binary(BinaryOp::Sub, row(0), row(1));
                        let loss = Expr::Binary(
                            BinaryOp::Sub,
                            Box::new(Expr::Unary(UnaryOp::Log, row(2))),
                            Box::new(label_shifted),
                        );
                        let store_loss = Stmt::StoreRow {
                            view: out_view.compose(&per_row),
                            value: ignoring_others(loss),
                        };
                        let sum_of = |value| Stmt::Reduce {
                            row: first_row + 2,
                            op: ReduceOp::Sum,
                            value,
                        };
                        if self.gradient_keeps_exponentials(id) {
                            let kept = self.keep_exponentials(&domain);
                            let stores = vec![
                                label_logit,
                                max,
                                Stmt::Store {
                                    view: kept.exponentials.compose(&identity),
                                    value: exponentials,
                                },
                                sum_of(load(&kept.exponentials, &identity)),
                                store_loss,
                                Stmt::StoreRow {
                                    view: kept.sums.compose(&per_row),
                                    value: *row(2),
                                },
                            ];
                            self.kept_exponentials.insert(id, kept);
                            stores
                        } else {
                            vec![label_logit, max, sum_of(exponentials), store_loss]
                        }
                    }
                    Some((loss, g)) => {
                        // The forward's loss plus the label's logit is the row's log-sum-exp
                        // (to a rounding of the loss), so dx = (exp(x − lse) − [v = label]) · g
                        // takes one exponential per logit and no sum.
                        let lse = Expr::Binary(BinaryOp::Add, Box::new(loss), row(0));
                        let shifted = Expr::Binary(BinaryOp::Sub, Box::new(x), Box::new(lse));
                        let softmax = Expr::Unary(UnaryOp::Exp, Box::new(shifted));
                        vec![label_logit, store_gradient(softmax, g)]
                    }
                }
            }
        };
        let (nest, nodes) = k.into_loop(body);
        self.push_node_kernel(id, what(&node.op), nodes, KernelBody::Loop(nest));
        self.views[id.index()] = Some(out_view);
        Ok(())
    }

    /// Emits `id` as a library call, and says whether it did: a forward (keeping its
    /// exponentials when its gradient will read them), or the gradient of one that kept them
    /// (a gradient that recomputes them stays a loop nest).
    fn emit_cross_entropy_call(&mut self, id: NodeId) -> Result<bool, LowerError> {
        let node = self.graph.node(id);
        let inputs = node.inputs.clone();
        let call = match inputs[..] {
            [logits, labels] => {
                let kept = self.gradient_keeps_exponentials(id).then(|| {
                    let domain = self.dims(logits).to_vec();
                    let kept = self.keep_exponentials(&domain);
                    self.kept_exponentials.insert(id, kept.clone());
                    kernel::KeptExponentials {
                        exponentials: kept.exponentials.buffer,
                        sums: kept.sums.buffer,
                    }
                });
                Library::CrossEntropy {
                    logits: self.dense(logits)?,
                    labels: self.dense(labels)?,
                    loss: new_buffer(&mut self.program, temporary(&node.ty)),
                    kept,
                }
            }
            [_, labels, loss, cotangent] if self.kept_exponentials.contains_key(&loss) => {
                let kept = &self.kept_exponentials[&loss];
                let kept = kernel::KeptExponentials {
                    exponentials: kept.exponentials.buffer,
                    sums: kept.sums.buffer,
                };
                Library::CrossEntropyGrad {
                    kept,
                    labels: self.dense(labels)?,
                    cotangent: self.dense(cotangent)?,
                    out: new_buffer(&mut self.program, temporary(&node.ty)),
                }
            }
            _ => return Ok(false),
        };
        let out = match &call {
            Library::CrossEntropy { loss, .. } => *loss,
            Library::CrossEntropyGrad { out, .. } => *out,
            _ => unreachable!(),
        };
        let view = StridedView::contiguous(out, node.ty.dims());
        self.push_node_kernel(id, what(&node.op), vec![id], KernelBody::Library(call));
        self.views[id.index()] = Some(view);
        Ok(true)
    }

    /// Whether the forward cross-entropy `id` stores its exponentials for its gradient: the
    /// option is on and the program computes the gradient of this very loss (same logits and
    /// labels, `id` as its loss).
    fn gradient_keeps_exponentials(&self, id: NodeId) -> bool {
        let forward = self.graph.node(id);
        self.options.cross_entropy_keeps_exponentials
            && self.users[id.index()].iter().any(|&user| {
                let user = self.graph.node(user);
                matches!(user.op, Op::CrossEntropyGrad)
                    && user.inputs[..3] == [forward.inputs[0], forward.inputs[1], id]
            })
    }

    /// Buffers for a forward's exponentials (f32, the logits' `domain`) and row sums.
    fn keep_exponentials(&mut self, domain: &[usize]) -> KeptExponentials {
        let rows = &domain[..domain.len() - 1];
        let mut buffer = |dims: &[usize]| {
            let ty = TensorType::new(DType::F32, dims.to_vec());
            StridedView::contiguous(new_buffer(&mut self.program, temporary(&ty)), dims)
        };
        KeptExponentials {
            exponentials: buffer(domain),
            sums: buffer(rows),
        }
    }

    /// The constant `0, 1, …, vocab − 1` of `dtype`, one buffer per vocabulary size.
    fn vocabulary_index(&mut self, vocab: usize, dtype: DType) -> StridedView {
        let ty = TensorType::new(dtype, vec![vocab]);
        let existing = self.program.buffers.iter().position(|b| {
            b.ty == ty && matches!(&b.role, BufferRole::Constant(c) if c.label == INDEX_LABEL)
        });
        let buffer = match existing {
            Some(i) => kernel::BufferId(i as u32),
            None => new_buffer(
                &mut self.program,
                Buffer {
                    ty,
                    role: BufferRole::Constant(ConstantData {
                        label: INDEX_LABEL.into(),
                        values: (0..vocab).map(|v| v as f64).collect(),
                    }),
                },
            ),
        };
        StridedView::contiguous(buffer, &[vocab])
    }
}

const INDEX_LABEL: &str = "vocabulary index";

fn zero() -> Box<Expr> {
    Box::new(Expr::Constant(0.0))
}
