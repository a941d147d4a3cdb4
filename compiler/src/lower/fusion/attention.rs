//! Causal attention kept whole (`LowerOptions::attention_calls`) as library calls: the forward
//! with the statistic of the same operands in one call, and the gradients of one attention
//! for one cotangent in another, as a flash-attention forward and backward compute them.

use crate::graph::{AttentionConfig, NodeId, Op};
use crate::kernel::{AttentionRows, AttentionShape, BufferId, KernelBody, Library};

use super::super::{LowerError, StridedView};
use super::Lowering;

impl Lowering<'_> {
    /// Emits the call that computes `id` and the attention ops computed with it (its
    /// siblings), unless an earlier sibling's call did.
    pub(super) fn emit_attention(&mut self, id: NodeId) -> Result<(), LowerError> {
        if self.views[id.index()].is_some() {
            return Ok(());
        }
        let node = self.graph.node(id);
        let config = *node.op.attention_config().expect("an attention op");
        let inputs = node.inputs.clone();
        let grad = matches!(node.op, Op::CausalAttentionGrad { .. });
        // Siblings read the same operands (and for gradients, the same forward results and
        // cotangent) with the same configuration.
        let shared = if grad { 7 } else { 4 };
        let siblings: Vec<NodeId> = self.users[inputs[0].index()]
            .iter()
            .copied()
            .filter(|&user| {
                let other = self.graph.node(user);
                self.live[user.index()]
                    && other.op.attention_config() == Some(&config)
                    && matches!(other.op, Op::CausalAttentionGrad { .. }) == grad
                    && other.inputs[..shared] == inputs[..shared]
            })
            .collect();
        let mut nodes = siblings.clone();
        nodes.sort();
        nodes.dedup();
        let shape = self.attention_shape(&inputs);
        let mut operands = [AttentionRows {
            buffer: BufferId(0),
            offset: 0,
            row_stride: 0,
        }; 4];
        for (slot, &input) in operands.iter_mut().zip(&inputs[..4]) {
            *slot = self.attention_rows(input)?;
        }
        let call = if grad {
            let mut grads = [None; 4];
            for &sibling in &nodes {
                let Op::CausalAttentionGrad { operand, .. } = self.graph.node(sibling).op else {
                    unreachable!("siblings of a gradient are gradients")
                };
                grads[operand.index()] = Some(self.attention_output(sibling));
            }
            Library::CausalAttentionGrad {
                operands,
                shape,
                out: self.dense(inputs[4])?,
                lse: self.dense(inputs[5])?,
                d_out: self.dense(inputs[6])?,
                grads,
                config,
            }
        } else {
            self.forward_call(&nodes, operands, shape, config)
        };
        let what = self.graph.node(id).op.name();
        self.push_node_kernel(id, what, nodes, KernelBody::Library(call));
        Ok(())
    }

    fn forward_call(
        &mut self,
        nodes: &[NodeId],
        operands: [AttentionRows; 4],
        shape: AttentionShape,
        config: AttentionConfig,
    ) -> Library {
        let (mut out, mut lse) = (None, None);
        for &node in nodes {
            let buffer = Some(self.attention_output(node));
            match self.graph.node(node).op {
                Op::CausalAttention(_) => out = buffer,
                _ => lse = buffer,
            }
        }
        Library::CausalAttention {
            operands,
            shape,
            out,
            lse,
            config,
        }
    }

    /// The extents of `[q, k_nope, k_rope, v]`.
    fn attention_shape(&self, inputs: &[NodeId]) -> AttentionShape {
        let (q, k_nope, v) = (
            self.dims(inputs[0]),
            self.dims(inputs[1]),
            self.dims(inputs[3]),
        );
        AttentionShape {
            batch: q[0],
            tokens: q[1],
            heads: q[2],
            nope: k_nope[3],
            rope: q[3] - k_nope[3],
            v: v[3],
        }
    }

    /// Operand `id` as rows of its last axis where it lies (a slice of a wider last axis, or
    /// the whole of its buffer), else a dense copy.
    fn attention_rows(&mut self, id: NodeId) -> Result<AttentionRows, LowerError> {
        let view = self.operand_view(id)?;
        if let Some(rows) = as_rows(&view) {
            return Ok(rows);
        }
        Ok(AttentionRows {
            buffer: self.dense(id)?,
            offset: 0,
            row_stride: *self
                .dims(id)
                .last()
                .expect("attention operands have a width"),
        })
    }

    /// A dense buffer for an attention op's result, recorded as its view.
    fn attention_output(&mut self, id: NodeId) -> BufferId {
        let (buffer, view) = self.library_output(id);
        self.views[id.index()] = Some(view);
        buffer
    }
}

/// `view` as rows of its last axis: contiguous along it, and its other axes one row-major run
/// of rows a constant stride apart, at least a row wide (axes of extent 1 are free).
fn as_rows(view: &StridedView) -> Option<AttentionRows> {
    let (&width, outer) = view.shape.split_last()?;
    let (&unit, outer_strides) = view.strides.split_last()?;
    if width > 1 && unit != 1 {
        return None;
    }
    // The stride of one row, and the rows' count so far, walking the outer axes inward.
    let row_stride = outer
        .iter()
        .zip(outer_strides)
        .rev()
        .filter(|(extent, _)| **extent > 1)
        .map(|(_, stride)| *stride)
        .next()
        .unwrap_or(width as isize);
    let mut expected = row_stride;
    for (&extent, &stride) in outer.iter().zip(outer_strides).rev() {
        if extent == 1 {
            continue;
        }
        if stride != expected {
            return None;
        }
        expected = stride * extent as isize;
    }
    let (offset, row_stride) = (
        usize::try_from(view.offset).ok()?,
        usize::try_from(row_stride).ok()?,
    );
    (row_stride >= width).then_some(AttentionRows {
        buffer: view.buffer,
        offset,
        row_stride,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(offset: isize, shape: &[usize], strides: &[isize]) -> StridedView {
        StridedView {
            buffer: BufferId(7),
            offset,
            shape: shape.to_vec(),
            strides: strides.to_vec(),
        }
    }

    fn rows(offset: usize, row_stride: usize) -> Option<AttentionRows> {
        Some(AttentionRows {
            buffer: BufferId(7),
            offset,
            row_stride,
        })
    }

    #[test]
    fn views_read_as_rows_where_they_lie() {
        // A whole buffer, and the second half of each row of [2, 3, 2, 8] (MLA's v of kv).
        assert_eq!(as_rows(&view(0, &[2, 3, 4], &[12, 4, 1])), rows(0, 4));
        assert_eq!(
            as_rows(&view(4, &[2, 3, 2, 4], &[48, 16, 8, 1])),
            rows(4, 8)
        );
        // Axes of extent 1 are free, whatever their stride.
        assert_eq!(as_rows(&view(0, &[1, 3, 4], &[99, 8, 1])), rows(0, 8));
        assert_eq!(as_rows(&view(0, &[1, 1, 4], &[9, 9, 1])), rows(0, 4));
    }

    #[test]
    fn views_that_are_not_one_run_of_rows_are_copied() {
        // Transposed last axis; broadcast rows; a slice of a middle axis (a gap every 3 rows);
        // rows overlapping.
        assert_eq!(as_rows(&view(0, &[3, 4], &[1, 3])), None);
        assert_eq!(as_rows(&view(0, &[2, 3, 4], &[12, 0, 1])), None);
        assert_eq!(as_rows(&view(0, &[2, 3, 4], &[20, 4, 1])), None);
        assert_eq!(as_rows(&view(0, &[3, 4], &[2, 1])), None);
    }
}
