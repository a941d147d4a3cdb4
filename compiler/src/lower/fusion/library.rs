//! Library calls: an operand as the buffer a call reads (its own, or a dense copy), where a
//! call's result is laid out, and the calls of matmuls and of the other library ops (gathers,
//! index additions, top-k, one-hot, FP8 rounding; the experts' and attention's in files of
//! their own).

use crate::graph::{Accumulation, NodeId, Op, Triangular, inverse_permutation};
use crate::kernel::{BufferId, BufferRole, ExpertOutputs, KernelBody, Library, Stmt};

use super::super::exact::exact_operands;
use super::super::{
    Affine, KernelBuilder, LowerError, StridedView, load, new_buffer, temporary, what,
};
use super::Lowering;

impl Lowering<'_> {
    /// A buffer holding operand `id`'s values in row-major order, whatever the buffer's own
    /// shape but the same last axis: grouped matmuls read their `x` as rows of `k` (`Library::
    /// GroupedMatMul`), so the tokens `[t, k]` read as `[t, 1, k]` are their own buffer, not
    /// a copy per call.
    pub(super) fn rows(&mut self, id: NodeId) -> Result<BufferId, LowerError> {
        let view = self.operand_view(id)?;
        let buffer = &self.program.buffer(view.buffer).ty;
        let same_rows =
            buffer.numel() == self.ty(id).numel() && buffer.dims().last() == self.dims(id).last();
        if view.is_contiguous() && same_rows {
            return Ok(view.buffer);
        }
        self.dense(id)
    }

    /// A dense buffer holding operand `id` (copied when its view is not the whole buffer).
    pub(super) fn dense(&mut self, id: NodeId) -> Result<BufferId, LowerError> {
        let view = self.operand_view(id)?;
        // Library calls read their operands' shapes from the buffers, so a reshaped view is
        // copied too (the cases are small: routing scores regrouped per expert group).
        if view.is_contiguous() && self.program.buffer(view.buffer).ty.dims() == self.dims(id) {
            return Ok(view.buffer);
        }
        let ty = self.ty(id).clone();
        let buffer = new_buffer(&mut self.program, temporary(&ty));
        let dims = self.dims(id).to_vec();
        let map = Affine::identity(dims.len());
        let mut k = KernelBuilder::new(dims.clone());
        let store = Stmt::Store {
            view: StridedView::contiguous(buffer, &dims).compose(&map),
            value: load(&view, &map),
        };
        k.nodes.push(id);
        let (nest, nodes) = k.into_loop(vec![store]);
        self.push_node_kernel(id, "copy", nodes, KernelBody::Loop(nest));
        Ok(buffer)
    }

    /// Like [`Self::dense`], for a call that reads its operand's shape from its output (an
    /// E4M3 rounding): a temporary holding exactly the operand's elements in row-major order
    /// is read as it is, whatever its own shape (attention's `[b, t, heads, v]` output read as
    /// `[b, t, heads·v]` by the output projection's rounding), instead of copied.
    pub(super) fn dense_any_shape(&mut self, id: NodeId) -> Result<BufferId, LowerError> {
        let view = self.operand_view(id)?;
        let buffer = self.program.buffer(view.buffer);
        let whole = view.offset == 0 && buffer.ty.numel() == self.ty(id).numel();
        if whole && view.is_contiguous() && buffer.role == BufferRole::Temporary {
            return Ok(view.buffer);
        }
        self.dense(id)
    }

    /// The buffer a library call writes and the view of its result in it. Layout choice: a
    /// matmul read only through one permute that keeps either of its matrix axes last writes
    /// its result in the permuted order, so the permute is a contiguous view and a reshape
    /// after it needs no copy: attention's `[batch, heads, seq, v]` output, read as
    /// `[batch·seq, heads·v]` by the output projection; a weight gradient `xᵀ·dy` transposed
    /// into the weight's `[out, in]` (computed as `dyᵀ·x`, see `emit_matmul`); also when a
    /// folded round trip to bf16 (a view) lies between them. Every other result is contiguous
    /// in its own order.
    pub(super) fn library_output(&mut self, id: NodeId) -> (BufferId, StridedView) {
        let node = self.graph.node(id);
        let dims = node.ty.dims();
        let rank = dims.len();
        let mut reader = id;
        while let [user] = self.users[reader.index()].as_slice()
            && self.folded[user.index()]
        {
            reader = *user;
        }
        if let Op::MatMul { .. } = node.op
            && let [user] = self.users[reader.index()].as_slice()
            && let Op::Permute { perm } = &self.graph.node(*user).op
            && (perm.last() == Some(&(rank - 1)) || perm.last() == Some(&(rank - 2)))
            && !self.graph.is_output(id)
        {
            let permuted = &self.graph.node(*user).ty;
            let buffer = new_buffer(&mut self.program, temporary(permuted));
            let view = StridedView::contiguous(buffer, permuted.dims())
                .permute(&inverse_permutation(perm));
            return (buffer, view);
        }
        let buffer = new_buffer(&mut self.program, temporary(&node.ty));
        (buffer, StridedView::contiguous(buffer, dims))
    }

    /// A matmul: its result written through a strided view, which may be its place in an
    /// assembled buffer unless an operand is read from that buffer (see `decide_places`).
    fn emit_matmul(
        &mut self,
        id: NodeId,
        accumulation: Accumulation,
        triangular: Option<Triangular>,
    ) -> Result<(), LowerError> {
        let own = self.place[id.index()]
            .is_none()
            .then(|| self.library_output(id).1);
        let node = self.graph.node(id);
        let dims = node.ty.dims().to_vec();
        let rank = dims.len();
        let (m, n) = (dims[rank - 2], dims[rank - 1]);
        let k = *self.dims(node.inputs[0]).last().expect("rank >= 2");
        let batch = dims[..rank - 2].to_vec();
        let a = self.operand_view(node.inputs[0])?;
        let b = self.operand_view(node.inputs[1])?;
        let out_view = match own {
            Some(view) => view,
            None => match self.place_view(id) {
                Some(place) if place.buffer != a.buffer && place.buffer != b.buffer => {
                    self.placed[id.index()] = true;
                    place
                }
                _ => self.library_output(id).1,
            },
        };
        // Broadcast each operand's batch axes to the output's.
        let a = a.expand(&[batch.clone(), vec![m, k]].concat());
        let b = b.expand(&[batch.clone(), vec![k, n]].concat());
        // A result laid out column by column (read through a permute that transposes it: a
        // weight gradient computed as xᵀ·dy and stored as the weight's [out, in]) is the
        // transposed product laid out row by row, outᵀ = bᵀ·aᵀ: every backend's GEMM then
        // writes contiguous rows.
        let column_major = out_view.strides[rank - 1] != 1 && out_view.strides[rank - 2] == 1;
        let (m, n, a, b, out, triangular) = if column_major {
            let swap: Vec<usize> = (0..rank - 2).chain([rank - 1, rank - 2]).collect();
            (
                n,
                m,
                b.permute(&swap),
                a.permute(&swap),
                out_view.permute(&swap),
                triangular.map(Triangular::transposed),
            )
        } else {
            (m, n, a, b, out_view.clone(), triangular)
        };
        let identity = Affine::identity(rank);
        let exact_in = exact_operands(self.graph, node.inputs[0], node.inputs[1]);
        let call = Library::MatMul {
            batch,
            m,
            n,
            k,
            a: a.compose(&identity),
            b: b.compose(&identity),
            out: out.compose(&identity),
            accumulation,
            exact_in,
            rounds: self.rounds(exact_in),
            triangular,
        };
        self.push_node_kernel(id, what(&node.op), vec![id], KernelBody::Library(call));
        self.views[id.index()] = Some(out_view);
        Ok(())
    }

    pub(super) fn emit_library(&mut self, id: NodeId) -> Result<(), LowerError> {
        let node = self.graph.node(id);
        if let Op::MatMul {
            accumulation,
            triangular,
        } = node.op
        {
            return self.emit_matmul(id, accumulation, triangular);
        }
        if let Some(parts) = self.gradient_parts[id.index()].clone() {
            return self.emit_weight_grad_in_parts(id, parts);
        }
        if node.op.attention_config().is_some() {
            return self.emit_attention(id);
        }
        let (out, out_view) = self.library_output(id);
        let inputs = node.inputs.clone();
        let call = match &node.op {
            Op::GroupedMatMul { accumulation } => {
                let exact_in = exact_operands(self.graph, inputs[0], inputs[1]);
                Library::GroupedMatMul {
                    x: self.rows(inputs[0])?,
                    weights: self.expert_weights(inputs[1])?,
                    expert_ids: self.dense(inputs[2])?,
                    out,
                    accumulation: *accumulation,
                    exact_in,
                    rounds: self.rounds(exact_in),
                }
            }
            Op::GroupedMatMulWeightGrad { .. } => {
                self.weight_grad_call(id, ExpertOutputs::Stacked(out))?
            }
            Op::Gather => Library::Gather {
                table: self.dense(inputs[0])?,
                indices: self.dense(inputs[1])?,
                out,
            },
            Op::IndexAdd { .. } => Library::IndexAdd {
                values: self.dense(inputs[0])?,
                indices: self.dense(inputs[1])?,
                out,
            },
            Op::TakeAlong { axis } => Library::TakeAlong {
                axis: *axis,
                x: self.dense(inputs[0])?,
                indices: self.dense(inputs[1])?,
                out,
            },
            Op::TopK { k } => Library::TopK {
                k: *k,
                x: self.dense(inputs[0])?,
                out,
            },
            Op::OneHot { depth, .. } => Library::OneHot {
                depth: *depth,
                indices: self.dense(inputs[0])?,
                out,
            },
            Op::QuantizeDequantize {
                format,
                tile_rows,
                tile_cols,
                pow2_scales,
            } => Library::QuantizeDequantize {
                format: *format,
                tile_rows: *tile_rows,
                tile_cols: *tile_cols,
                pow2_scales: *pow2_scales,
                x: self.dense_any_shape(inputs[0])?,
                out,
            },
            _ => unreachable!("library class"),
        };
        let node = self.graph.node(id);
        self.push_node_kernel(id, what(&node.op), vec![id], KernelBody::Library(call));
        self.views[id.index()] = Some(out_view);
        Ok(())
    }
}
