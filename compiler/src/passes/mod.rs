//! Graph-to-graph passes, each a function from a graph to a smaller or equal one that computes
//! the same outputs. They renumber nodes densely and keep every node's origin.

mod attention;
mod cse;
mod dce;
mod fold;
mod recompute;

pub use attention::expand_attention;
pub use cse::common_subexpressions;
pub use dce::dead_code;
pub use fold::{FOLD_LIMIT, fold_constants};
pub use recompute::{RECOMPUTE_PREFIX, RecomputePolicy, recompute};

use crate::graph::{Graph, Node, NodeId, Output};

/// Rebuilds `graph` keeping the nodes `keep` says, with every input redirected through
/// `replace` (a node may stand for another, identical one). Ids are renumbered in order.
fn rebuild(graph: &Graph, keep: &[bool], replace: &[NodeId]) -> Graph {
    let mut new_id = vec![None; graph.nodes.len()];
    let mut nodes = Vec::new();
    for (i, node) in graph.nodes.iter().enumerate() {
        if !keep[i] {
            continue;
        }
        let inputs = node
            .inputs
            .iter()
            .map(|input| new_id[replace[input.index()].index()].expect("inputs come first"))
            .collect();
        new_id[i] = Some(NodeId(nodes.len() as u32));
        nodes.push(Node {
            op: node.op.clone(),
            inputs,
            ty: node.ty.clone(),
            origin: node.origin.clone(),
        });
    }
    let outputs = graph
        .outputs
        .iter()
        .map(|o| Output {
            name: o.name.clone(),
            node: new_id[replace[o.node.index()].index()].expect("outputs are kept"),
        })
        .collect();
    Graph {
        name: graph.name.clone(),
        nodes,
        outputs,
    }
}
