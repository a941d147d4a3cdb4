//! Causal attention kept whole (`LowerOptions::attention_calls`) as library calls: the forward
//! with the statistic of the same operands in one call, and the gradients of one attention
//! for one cotangent in another, as a flash-attention forward and backward compute them.

use crate::graph::{AttentionConfig, NodeId, Op};
use crate::kernel::{BufferId, KernelBody, Library};

use super::super::LowerError;
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
        let mut operands = [BufferId(0); 4];
        for (slot, &input) in operands.iter_mut().zip(&inputs[..4]) {
            *slot = self.dense(input)?;
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
                out: self.dense(inputs[4])?,
                lse: self.dense(inputs[5])?,
                d_out: self.dense(inputs[6])?,
                grads,
                config,
            }
        } else {
            self.forward_call(&nodes, operands, config)
        };
        let what = self.graph.node(id).op.name();
        self.push_node_kernel(id, what, nodes, KernelBody::Library(call));
        Ok(())
    }

    fn forward_call(
        &mut self,
        nodes: &[NodeId],
        operands: [BufferId; 4],
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
            out,
            lse,
            config,
        }
    }

    /// A dense buffer for an attention op's result, recorded as its view.
    fn attention_output(&mut self, id: NodeId) -> BufferId {
        let (buffer, view) = self.library_output(id);
        self.views[id.index()] = Some(view);
        buffer
    }
}
