//! Common-subexpression elimination: a node identical to an earlier one (same op with the same
//! attributes, same inputs after merging) is replaced by it. Leaves are never merged (two
//! parameters are different tensors even with equal types), scalar constants are (the builder
//! makes one per use). A `stop_gradient(x)` is replaced by `x`: the compiler sees differentiated
//! graphs, where the node has done its work, and fusion then sees the value's real producer.

use std::collections::HashMap;

use crate::graph::{Graph, NodeId, Op};

use super::rebuild;

pub fn common_subexpressions(graph: &Graph) -> Graph {
    let mut replace: Vec<NodeId> = graph.node_ids().collect();
    let mut keep = vec![true; graph.nodes.len()];
    // Key: the op's serialised form, the inputs after replacement, and the type.
    let mut seen: HashMap<(String, Vec<NodeId>, String), NodeId> = HashMap::new();
    for id in graph.node_ids() {
        let node = graph.node(id);
        if matches!(node.op, Op::Input { .. } | Op::Parameter { .. }) {
            continue;
        }
        let inputs: Vec<NodeId> = node.inputs.iter().map(|i| replace[i.index()]).collect();
        if matches!(node.op, Op::StopGradient) {
            replace[id.index()] = inputs[0];
            keep[id.index()] = false;
            continue;
        }
        let op = serde_json::to_string(&node.op).expect("ops serialise");
        let key = (op, inputs, node.ty.to_string());
        match seen.get(&key) {
            Some(&earlier) => {
                replace[id.index()] = earlier;
                keep[id.index()] = false;
            }
            None => {
                seen.insert(key, id);
            }
        }
    }
    rebuild(graph, &keep, &replace)
}

#[cfg(test)]
mod tests {
    use crate::dtype::{DType, TensorType};
    use crate::graph::GraphBuilder;

    #[test]
    fn repeated_computations_merge_and_leaves_do_not() {
        let mut g = GraphBuilder::new("t");
        let x = g.input("x", TensorType::new(DType::F32, [2])).unwrap();
        let a = g.parameter("a", TensorType::new(DType::F32, [2])).unwrap();
        let b = g.parameter("b", TensorType::new(DType::F32, [2])).unwrap();
        let one = g.scale(x, 2.0).unwrap();
        let two = g.scale(x, 2.0).unwrap();
        let sum = g.add(one, two).unwrap();
        let ab = g.add(a, b).unwrap();
        let out = g.add(sum, ab).unwrap();
        g.output("y", out).unwrap();
        let graph = g.finish();
        let merged = super::common_subexpressions(&graph);
        merged.validate().unwrap();
        // One scalar, one scale: 3 leaves + constant + mul + add(mul, mul) + add(a,b) + add.
        assert_eq!(merged.nodes.len(), graph.nodes.len() - 2, "{merged}");
        assert!(merged.to_string().contains("add(%4, %4)"), "{merged}");
    }

    #[test]
    fn stop_gradients_become_their_operand() {
        let mut g = GraphBuilder::new("t");
        let x = g.input("x", TensorType::new(DType::F32, [2, 3])).unwrap();
        let probs = g.softmax(x).unwrap();
        let out = g.stop_gradient(probs).unwrap();
        g.output("y", out).unwrap();
        let graph = g.finish();
        assert_eq!(graph.to_string().matches("stop_gradient").count(), 2);
        let merged = super::common_subexpressions(&graph);
        merged.validate().unwrap();
        assert_eq!(merged.nodes.len(), graph.nodes.len() - 2, "{merged}");
        let text = merged.to_string();
        assert!(!text.contains("stop_gradient"), "{text}");
        // The shift reads the max itself; the output is the softmax's division.
        assert!(text.contains("sub(%0, %1)"), "{text}");
        assert_eq!(
            merged.outputs[0].node,
            merged.node_ids().last().unwrap(),
            "{text}"
        );
    }
}
