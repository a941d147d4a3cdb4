//! Dead-code elimination: only what the outputs depend on survives. Parameters and inputs the
//! outputs do not read are dropped too (a forward-only graph of a model with MTP modules does
//! not need their weights).

use crate::graph::{Graph, NodeId};

use super::rebuild;

pub fn dead_code(graph: &Graph) -> Graph {
    let mut live = vec![false; graph.nodes.len()];
    for output in &graph.outputs {
        live[output.node.index()] = true;
    }
    for id in graph.node_ids().rev() {
        if live[id.index()] {
            for input in &graph.node(id).inputs {
                live[input.index()] = true;
            }
        }
    }
    let identity: Vec<NodeId> = graph.node_ids().collect();
    rebuild(graph, &live, &identity)
}

#[cfg(test)]
mod tests {
    use crate::dtype::{DType, TensorType};
    use crate::graph::GraphBuilder;

    #[test]
    fn unused_nodes_and_leaves_go() {
        let mut g = GraphBuilder::new("t");
        let x = g.input("x", TensorType::new(DType::F32, [2])).unwrap();
        let unused = g.parameter("w", TensorType::new(DType::F32, [2])).unwrap();
        let _dead = g.mul(unused, unused).unwrap();
        let y = g.exp(x).unwrap();
        g.output("y", y).unwrap();
        let out = super::dead_code(&g.finish());
        assert_eq!(
            out.to_string(),
            "graph t {\n  %0: f32[2] = input \"x\"\n  %1: f32[2] = exp(%0)\n  output \"y\" = %1\n}\n"
        );
        out.validate().unwrap();
    }
}
