//! Grouped expert GEMMs without copies of the experts' matrices.
//!
//! The model stacks the experts' `[n, k]` weights into `[experts, n, k]` for its grouped
//! matmuls, and autodiff takes each expert's gradient out of the grouped weight gradient with a
//! slice and a reshape. Lowered as written, both are copies of every expert weight on every
//! run (on the medium benchmark model, 288 stacking kernels and 288 slices, 100 ms a step; at
//! DeepSeek-V3's size 45 312 of each, about 5 TB moved per micro-batch). Two forms avoid them:
//!
//! - Under `LowerOptions::grouped_weights_in_place` (the CPU's form) the stack and the permutes
//!   the calls read it through are not lowered at all: each call gets one view per expert
//!   (`ExpertWeights::Parts`); and a weight gradient whose every user is such a slice writes
//!   each expert's block straight into that output's buffer (`ExpertOutputs::Parts`).
//! - Otherwise (the CUDA plan's form: its grouped GEMMs read and write one stacked buffer) a
//!   stack of parameters read by nothing else is one buffer the caller feeds with them end to
//!   end (`BufferRole::StackedParameters`: uploaded in place, with the weights; on the CPU too
//!   when the calls read the stack through an FP8 rounding), and those experts' gradients are
//!   windows of the stacked gradient (`BufferRole::Window`), read where the call wrote them.

use crate::graph::{NodeId, Op};
use crate::kernel::{Buffer, BufferRole, ExpertOutputs, ExpertWeights, KernelBody, Library, View};

use super::super::exact::exact_operands;
use super::super::{Affine, Class, LowerError, StridedView, new_buffer, temporary, what};
use super::Lowering;

impl Lowering<'_> {
    /// In the CPU's form, which stacks grouped matmuls read as one matrix per expert, where
    /// each lies: a stack of leaves (the experts' weight parameters, each a buffer of its own)
    /// that no kernel needs whole, because every user reads it as a grouped matmul's weights,
    /// directly or through permutes that keep the expert axis first (the input gradient's
    /// transposed weights). In either form, which other stacks of parameters are fed where
    /// they lie (see `fed_in_its_stack`: the CUDA plan's, and the CPU's read through an FP8
    /// rounding).
    ///
    /// And which weight gradients are written as one matrix per expert (in the CUDA plan's
    /// form, held as windows of the stacked gradient): those whose every user takes one
    /// expert's gradient out (autodiff's adjoint of the stack, a slice and a reshape per
    /// expert) as a graph output.
    pub(super) fn decide_weight_parts(&mut self) {
        let in_place = self.options.grouped_weights_in_place;
        for id in self.graph.node_ids() {
            if !self.live[id.index()] {
                continue;
            }
            let node = self.graph.node(id);
            let parts_are_leaves = matches!(node.op, Op::Stack)
                && node
                    .inputs
                    .iter()
                    .all(|&p| self.classes[p.index()] == Class::Leaf && self.dims(p).len() == 2);
            if in_place && parts_are_leaves && self.only_weights_of_grouped(id) {
                self.mark_read_by_parts(id);
            }
            if parts_are_leaves && !self.in_parts[id.index()] && self.fed_in_its_stack(id) {
                for &part in &node.inputs {
                    self.fed_in_stack[part.index()] = true;
                }
                self.fed_in_stack[id.index()] = true;
            }
            if matches!(node.op, Op::GroupedMatMulWeightGrad { .. })
                && let Some(parts) = self.gradient_parts(id)
            {
                for &part in &parts {
                    self.in_parts[part.index()] = true;
                    self.in_parts[self.graph.node(part).inputs[0].index()] = true;
                }
                self.gradient_parts[id.index()] = Some(parts);
            }
        }
    }

    /// Whether stack `id` of leaves may be one buffer the caller feeds: its parts are
    /// parameters read by nothing else, and it is no output nor part of another assembly.
    fn fed_in_its_stack(&self, id: NodeId) -> bool {
        let node = self.graph.node(id);
        !self.graph.is_output(id)
            && self.place[id.index()].is_none()
            && node.inputs.iter().all(|&part| {
                matches!(self.graph.node(part).op, Op::Parameter { .. })
                    && self.users[part.index()] == [id]
                    && !self.graph.is_output(part)
            })
    }

    /// Lowers a node fed inside a stack (see `fed_in_its_stack`): the stack is one buffer of
    /// its parameters end to end, fed by the caller; its parameters get no buffer of their
    /// own.
    pub(super) fn feed_in_stack(&mut self, id: NodeId) {
        let node = self.graph.node(id);
        if !matches!(node.op, Op::Stack) {
            return;
        }
        let names = (node.inputs.iter())
            .map(|&part| match &self.graph.node(part).op {
                Op::Parameter { name, .. } => name.clone(),
                _ => unreachable!("stacks fed in place hold parameters (`fed_in_its_stack`)"),
            })
            .collect();
        let buffer = new_buffer(
            &mut self.program,
            Buffer {
                ty: node.ty.clone(),
                role: BufferRole::StackedParameters(names),
            },
        );
        let view = StridedView::contiguous(buffer, node.ty.dims());
        self.assembled[id.index()] = Some(view.clone());
        self.views[id.index()] = Some(view);
    }

    /// The experts' gradients of weight gradient `id`, in expert order, when every user of it
    /// is a slice of one expert (`e..e + 1` of axis 0, each once) read only by a reshape to
    /// that expert's matrix which is a graph output and not placed in an assembly.
    fn gradient_parts(&self, id: NodeId) -> Option<Vec<NodeId>> {
        let dims = self.dims(id);
        let mut parts = vec![None; dims[0]];
        if self.graph.is_output(id) {
            return None;
        }
        for &slice in &self.users[id.index()] {
            let Op::Slice {
                axis: 0,
                start,
                end,
            } = self.graph.node(slice).op
            else {
                return None;
            };
            let [reshape] = self.users[slice.index()][..] else {
                return None;
            };
            let whole_matrix = matches!(
                &self.graph.node(reshape).op,
                Op::Reshape { shape } if shape[..] == dims[1..]
            );
            // A window (the CUDA plan's form) is no kernel's operand: read by nothing else.
            let unread =
                self.options.grouped_weights_in_place || self.users[reshape.index()].is_empty();
            let alone = end == start + 1
                && !self.graph.is_output(slice)
                && self.graph.is_output(reshape)
                && unread
                && self.place[reshape.index()].is_none();
            if !(whole_matrix && alone) || parts[start].replace(reshape).is_some() {
                return None;
            }
        }
        parts.into_iter().collect()
    }

    /// Whether every user of `id` reads it as the weights of a grouped matmul, directly or
    /// through permutes keeping axis 0 and folded round trips to bf16 (which the matmul
    /// rounds), and none of them is an output.
    fn only_weights_of_grouped(&self, id: NodeId) -> bool {
        !self.graph.is_output(id)
            && self.users[id.index()].iter().all(|&u| {
                let user = self.graph.node(u);
                match &user.op {
                    Op::GroupedMatMul { .. } => {
                        user.inputs[1] == id && user.inputs[0] != id && user.inputs[2] != id
                    }
                    Op::Permute { perm } => perm[0] == 0 && self.only_weights_of_grouped(u),
                    Op::Cast { .. } => self.folded[u.index()] && self.only_weights_of_grouped(u),
                    _ => false,
                }
            })
    }

    fn mark_read_by_parts(&mut self, id: NodeId) {
        self.in_parts[id.index()] = true;
        for u in self.users[id.index()].clone() {
            if matches!(self.graph.node(u).op, Op::Permute { .. }) || self.folded[u.index()] {
                self.mark_read_by_parts(u);
            }
        }
    }

    /// The experts' matrices of `id` (a stack read by parts, or a permute of one), each where
    /// its parameter lies, seen through the permutes.
    fn weight_parts(&self, id: NodeId) -> Vec<View> {
        let mut perms: Vec<Vec<usize>> = Vec::new();
        let mut stack = id;
        loop {
            match &self.graph.node(stack).op {
                // Axis 0 stays (`only_weights_of_grouped`): the matrix axes move among
                // themselves.
                Op::Permute { perm } => perms.push(perm[1..].iter().map(|&a| a - 1).collect()),
                // A folded round trip: the matmul rounds the parameters as it reads them.
                Op::Cast { .. } if self.folded[stack.index()] => {}
                _ => break,
            }
            stack = self.graph.node(stack).inputs[0];
        }
        let identity = Affine::identity(2);
        self.graph
            .node(stack)
            .inputs
            .iter()
            .map(|&part| {
                let leaf = self.views[part.index()]
                    .clone()
                    .expect("leaves have buffers");
                let view = perms
                    .iter()
                    .rev()
                    .fold(leaf, |view, perm| view.permute(perm));
                view.compose(&identity)
            })
            .collect()
    }

    /// A grouped GEMM's `[experts, n, k]` weights: each expert's parameter where it lies when
    /// the stack is read in parts; else one view of them, where they lie when the buffer
    /// holds one `n·k` block per expert in order, whatever the order inside a block (the
    /// transposed weights of the input gradient are the stacked weights read across: a copy
    /// transposing them cost a 32-expert model's training step 7 ms per MoE layer); else a
    /// dense copy.
    pub(super) fn expert_weights(&mut self, id: NodeId) -> Result<ExpertWeights, LowerError> {
        if self.in_parts[id.index()] {
            return Ok(ExpertWeights::Parts(self.weight_parts(id)));
        }
        let view = self.operand_view(id)?;
        let &[experts, n, k] = self.dims(id) else {
            unreachable!("grouped weights are [experts, n, k] (type inference)")
        };
        let whole = self.program.buffer(view.buffer).ty.numel() == experts * n * k;
        let (row, block) = (k as isize, (n * k) as isize);
        let blocks = whole
            && view.offset == 0
            && view.strides[0] == block
            && [(row, 1), (1, n as isize)].contains(&(view.strides[1], view.strides[2]));
        let identity = Affine::identity(3);
        if blocks {
            return Ok(ExpertWeights::Stacked(view.compose(&identity)));
        }
        let buffer = self.dense(id)?;
        let dense = StridedView::contiguous(buffer, &[experts, n, k]);
        Ok(ExpertWeights::Stacked(dense.compose(&identity)))
    }

    /// A grouped matmul's weight gradient written straight into the experts' gradients (see
    /// `gradient_parts`): each `parts[e]` gets a buffer of its own, which the call writes; or,
    /// in the CUDA plan's form, the call writes one stacked buffer and each `parts[e]` is a
    /// window of it.
    pub(super) fn emit_weight_grad_in_parts(
        &mut self,
        id: NodeId,
        parts: Vec<NodeId>,
    ) -> Result<(), LowerError> {
        let stacked = (!self.options.grouped_weights_in_place)
            .then(|| new_buffer(&mut self.program, temporary(self.graph.ty(id))));
        let mut nodes = vec![id];
        let mut buffers = Vec::with_capacity(parts.len());
        for (expert, part) in parts.into_iter().enumerate() {
            let ty = self.graph.ty(part);
            let buffer = match stacked {
                Some(of) => Buffer {
                    ty: ty.clone(),
                    role: BufferRole::Window {
                        of,
                        offset: expert * ty.numel(),
                    },
                },
                None => temporary(ty),
            };
            let buffer = new_buffer(&mut self.program, buffer);
            self.views[part.index()] = Some(StridedView::contiguous(buffer, self.dims(part)));
            buffers.push(buffer);
            // The slice it reshapes, then itself.
            nodes.extend([self.graph.node(part).inputs[0], part]);
        }
        let out = match stacked {
            Some(stacked) => ExpertOutputs::Stacked(stacked),
            None => ExpertOutputs::Parts(buffers),
        };
        let call = self.weight_grad_call(id, out)?;
        let what = what(&self.graph.node(id).op);
        self.push_node_kernel(id, what, nodes, KernelBody::Library(call));
        Ok(())
    }

    /// The library call of grouped weight gradient `id`, written to `out`.
    pub(super) fn weight_grad_call(
        &mut self,
        id: NodeId,
        out: ExpertOutputs,
    ) -> Result<Library, LowerError> {
        let node = self.graph.node(id);
        let Op::GroupedMatMulWeightGrad {
            accumulation,
            rounding,
            ..
        } = node.op
        else {
            unreachable!("a grouped weight gradient")
        };
        let inputs = &node.inputs;
        let exact_in = exact_operands(self.graph, inputs[0], inputs[1]);
        Ok(Library::GroupedMatMulWeightGrad {
            cotangent: self.dense(inputs[0])?,
            x: self.rows(inputs[1])?,
            expert_ids: self.dense(inputs[2])?,
            out,
            accumulation,
            exact_in,
            rounds: self.rounds(exact_in),
            rounding,
        })
    }
}
