//! The stable text form of a graph: one node per line, in id order, with a comment line
//! wherever the module that created the nodes changes. Used by snapshots and by `fathom graph`.

use std::fmt::{self, Write as _};

use super::Graph;

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "graph {} {{", self.name)?;
        let mut origin = "";
        for (id, node) in self.node_ids().zip(&self.nodes) {
            if node.origin != origin {
                origin = &node.origin;
                writeln!(
                    f,
                    "  // {}",
                    if origin.is_empty() { "(top)" } else { origin }
                )?;
            }
            let mut line = String::new();
            write!(line, "  {id}: {} = {}", node.ty, node.op)?;
            if !node.inputs.is_empty() {
                line.push('(');
                for (i, input) in node.inputs.iter().enumerate() {
                    if i > 0 {
                        line.push_str(", ");
                    }
                    write!(line, "{input}")?;
                }
                line.push(')');
            }
            writeln!(f, "{line}")?;
        }
        for output in &self.outputs {
            writeln!(f, "  output \"{}\" = {}", output.name, output.node)?;
        }
        writeln!(f, "}}")
    }
}
