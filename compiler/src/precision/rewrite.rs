//! The rewrite: a copy of the graph with each chosen GEMM's operands rounded just before it.

use std::collections::{HashMap, HashSet};

use crate::dtype::DType;
use crate::error::GraphError;
use crate::graph::{
    Accumulation, ExpertTiles, Graph, GraphBuilder, NodeId, Op, QuantFormat, Tensor,
};
use crate::spec::Fp8Spec;

use super::identify::{
    GemmRole, LinearGemm, OperandLayout, activation_products, linear_gemms, precision_floor,
};
use super::{Fp8Scaling, Precision, PrecisionError, PrecisionPolicy};

/// `graph` with the operands of every Linear GEMM that `policy` puts in BF16 or FP8, and of
/// every product of two activations it puts below FP32 (in BF16), rounded as the module docs
/// describe; FP8 tiles come from `tiling` (`ModelSpec::fp8`, DeepSeek-V3's
/// 128/128 when the model has none). Node order, origins, outputs and every other node are kept;
/// the rounding nodes carry the GEMM's origin; each FP8 GEMM sums its products as the policy's
/// `accumulation` says. A policy that is all FP32 returns the graph
/// unchanged. An operand shared by several GEMMs with the same rounding is rounded once (as a
/// run quantizes an activation once for all the projections that read it).
pub fn apply_precision(
    graph: &Graph,
    policy: &PrecisionPolicy,
    tiling: &Fp8Spec,
) -> Result<Graph, PrecisionError> {
    policy.validate()?;
    for (value, field) in [
        (tiling.activation_tile, "activation_tile"),
        (tiling.weight_block, "weight_block"),
    ] {
        if value == 0 {
            return Err(PrecisionError::EmptyTile { field });
        }
    }
    let plan: HashMap<NodeId, (Precision, LinearGemm)> = linear_gemms(graph)
        .into_iter()
        .map(|gemm| {
            let precision = policy.precision_of(&gemm.path);
            (
                gemm.node,
                (precision.at_least(precision_floor(&gemm.path)), gemm),
            )
        })
        .filter(|(_, (precision, _))| *precision != Precision::Fp32)
        .collect();
    // Attention's products: BF16 at most, never FP8 (SPEC §2).
    let bf16_activation_products: HashSet<NodeId> = activation_products(graph)
        .into_iter()
        .filter(|product| {
            policy.precision_of(&product.path).at_least(Precision::Bf16) == Precision::Bf16
        })
        .map(|product| product.node)
        .collect();
    if plan.is_empty() && bf16_activation_products.is_empty() {
        return Ok(graph.clone());
    }

    let mut g = GraphBuilder::new(graph.name.clone());
    let mut new_ids: Vec<Tensor> = Vec::with_capacity(graph.nodes.len());
    let mut rounded: HashMap<(Tensor, Rounding), Tensor> = HashMap::new();
    // Each activation an FP8 forward GEMM read, and its FP8 rounding: what a run saves for the
    // backward pass in place of the activation.
    let mut saved: HashMap<Tensor, Tensor> = HashMap::new();
    // Weight-gradient operands rebuilt on a saved activation (shared by the GEMMs that read one).
    let mut from_saved: HashMap<NodeId, Tensor> = HashMap::new();
    for (id, node) in graph.node_ids().zip(&graph.nodes) {
        let mut inputs: Vec<Tensor> = node.inputs.iter().map(|i| new_ids[i.index()]).collect();
        let declared = node.inputs.is_empty().then(|| node.ty.clone());
        let mut op = node.op.clone();
        let t = g.within(&node.origin, |g| {
            if let Some((precision, gemm)) = plan.get(&id) {
                let fp8 = *precision == Precision::Fp8;
                if fp8 {
                    set_accumulation(&mut op, policy.accumulation);
                }
                // The grouped weight gradient's fine-grained tiles run along each expert's
                // token-slots: the op rounds its operands itself (`ExpertTiles`).
                let rounds_itself = fp8
                    && policy.scaling == Fp8Scaling::FineGrained
                    && set_expert_tiles(&mut op, tiling.activation_tile);
                for (k, layout) in gemm.operands.iter().enumerate() {
                    if fp8 && Some(k) == saved_activation_operand(gemm) {
                        let operand = node.inputs[k];
                        inputs[k] = cached(&mut from_saved, operand, || {
                            as_saved(g, graph, operand, &new_ids, &saved)
                        })?;
                    }
                    if rounds_itself {
                        continue;
                    }
                    let pow2 = k == 0 && has_pow2_input(graph, gemm);
                    let source = inputs[k];
                    // A weight's FP8 blocks are rounded as it is stored, below the transposes
                    // the GEMM reads it through (square blocks: the same values). So is a
                    // matrix read transposed (the weight gradient's `xᵀ`), in tiles transposed
                    // too: the same values, and the rounding reads the stored matrix in place
                    // where rounding the transpose would first copy it out.
                    let rounding_of = |dims: &[usize]| {
                        Rounding::of(*precision, *layout, policy.scaling, tiling, dims, pow2)
                    };
                    let (value, movements, rounding) = match (fp8, layout) {
                        (true, OperandLayout::Weight) => {
                            let (value, movements) = below_transposes(g.graph(), source.id());
                            (value, movements, rounding_of(g.dims(Tensor(value))))
                        }
                        (true, OperandLayout::KLast | OperandLayout::KRows)
                            if g.dims(source).len() == 2 =>
                        {
                            let rounding = rounding_of(g.dims(source));
                            let (value, movements) = below_transposes(g.graph(), source.id());
                            let swaps = (movements.iter())
                                .filter(
                                    |op| matches!(op, Op::Permute { perm } if perm[..] == [1, 0]),
                                )
                                .count();
                            match (swaps % 2, rounding.transposed()) {
                                (0, _) => (value, movements, rounding),
                                (_, Some(transposed)) => (value, movements, transposed),
                                (_, None) => (source.id(), Vec::new(), rounding),
                            }
                        }
                        _ => (source.id(), Vec::new(), rounding_of(g.dims(source))),
                    };
                    let value = Tensor(value);
                    inputs[k] = match rounding {
                        Rounding::Bf16 => in_bf16(g, source, &mut rounded)?,
                        Rounding::Fp8 { .. } => {
                            let r = cached(&mut rounded, (value, rounding), || {
                                round(g, value, rounding)
                            })?;
                            movements
                                .into_iter()
                                .rev()
                                .try_fold(r, |t, op| g.push(op, &[t], None))?
                        }
                    };
                    if fp8 && k == 0 && gemm.role == GemmRole::Forward {
                        saved.entry(source).or_insert(inputs[k]);
                    }
                }
            } else if bf16_activation_products.contains(&id) {
                // An attention op rounds its products' operands itself (the probabilities
                // and the scores' gradient are inside it).
                match op.attention_config_mut() {
                    Some(config) => config.products_in = Some(DType::BF16),
                    None => {
                        for input in &mut inputs {
                            *input = in_bf16(g, *input, &mut rounded)?;
                        }
                    }
                }
            }
            g.push(op, &inputs, declared)
        })?;
        new_ids.push(t);
    }
    for output in &graph.outputs {
        g.output(&output.name, new_ids[output.node.index()])?;
    }
    Ok(g.finish())
}

/// `graph` with both operands of each of the `products` (matmuls) rounded to bf16 and back,
/// as [`apply_precision`] rounds attention's products under a BF16 policy: what an expansion
/// of a fused op whose products read bf16 operands (`AttentionConfig::products_in`) makes of
/// the primitives it writes.
pub(crate) fn round_products_in_bf16(
    graph: &Graph,
    products: &HashSet<NodeId>,
) -> Result<Graph, GraphError> {
    let mut g = GraphBuilder::new(graph.name.clone());
    let mut new_ids: Vec<Tensor> = Vec::with_capacity(graph.nodes.len());
    let mut rounded: HashMap<(Tensor, Rounding), Tensor> = HashMap::new();
    for (id, node) in graph.node_ids().zip(&graph.nodes) {
        let mut inputs: Vec<Tensor> = node.inputs.iter().map(|i| new_ids[i.index()]).collect();
        let declared = node.inputs.is_empty().then(|| node.ty.clone());
        let t = g.within(&node.origin, |g| {
            if products.contains(&id) {
                for input in &mut inputs {
                    *input = in_bf16(g, *input, &mut rounded)?;
                }
            }
            g.push(node.op.clone(), &inputs, declared)
        })?;
        new_ids.push(t);
    }
    for output in &graph.outputs {
        g.output(&output.name, new_ids[output.node.index()])?;
    }
    Ok(g.finish())
}

/// `source` rounded to bf16 and back. Elementwise, so the value below the movements is rounded
/// (once for all the GEMMs that read it, whatever the movements), then moved.
fn in_bf16(
    g: &mut GraphBuilder,
    source: Tensor,
    rounded: &mut HashMap<(Tensor, Rounding), Tensor>,
) -> Result<Tensor, GraphError> {
    let (value, movements) = below_movements(g.graph(), source.id());
    let value = Tensor(value);
    let r = cached(rounded, (value, Rounding::Bf16), || {
        round(g, value, Rounding::Bf16)
    })?;
    movements
        .into_iter()
        .rev()
        .try_fold(r, |t, op| g.push(op, &[t], None))
}

/// The value `id` shows through permutes and reshapes, and those movements, outermost first.
/// A bf16 rounding (elementwise) is applied to that value and the movements to the rounding:
/// a weight read transposed (`x · Wᵀ`) is then rounded as it is stored, row by row, rather
/// than by a transposing copy (4× slower per element), and the GEMMs reading one value through
/// different movements share its rounding.
fn below_movements(graph: &Graph, mut id: NodeId) -> (NodeId, Vec<Op>) {
    let mut movements = Vec::new();
    while let op @ (Op::Permute { .. } | Op::Reshape { .. }) = &graph.node(id).op {
        movements.push(op.clone());
        id = graph.node(id).inputs[0];
    }
    (id, movements)
}

/// The value `id` shows through permutes that keep its leading axes in place (transposes of
/// its matrices), and those permutes, outermost first. A weight's square blocks, or its one
/// per-tensor tile, are the same values whichever way its matrices are read, so the weight is
/// rounded as stored: the forward GEMM (`x · Wᵀ`) and the input gradient's (`dy · W`) share one
/// rounding, which reads the parameter itself rather than a transposed copy.
fn below_transposes(graph: &Graph, mut id: NodeId) -> (NodeId, Vec<Op>) {
    let mut movements = Vec::new();
    while let op @ Op::Permute { perm } = &graph.node(id).op {
        let leading = perm.len().saturating_sub(2);
        if perm[..leading].iter().enumerate().any(|(i, &p)| p != i) {
            break;
        }
        movements.push(op.clone());
        id = graph.node(id).inputs[0];
    }
    (id, movements)
}

/// `cache[key]`, made by `make` the first time it is asked for.
fn cached<K: std::hash::Hash + Eq>(
    cache: &mut HashMap<K, Tensor>,
    key: K,
    make: impl FnOnce() -> Result<Tensor, GraphError>,
) -> Result<Tensor, GraphError> {
    if let Some(&done) = cache.get(&key) {
        return Ok(done);
    }
    let done = make()?;
    cache.insert(key, done);
    Ok(done)
}

/// Which operand of a weight-gradient GEMM is the forward's activation (the other is the output
/// gradient, computed in the backward pass): `xᵀ` of a dense one, `x` of a grouped one.
fn saved_activation_operand(gemm: &LinearGemm) -> Option<usize> {
    match (gemm.role, gemm.grouped) {
        (GemmRole::WeightGradient, false) => Some(0),
        (GemmRole::WeightGradient, true) => Some(1),
        _ => None,
    }
}

/// SPEC §2: activations are saved for the backward pass in FP8. A weight-gradient GEMM's
/// activation operand is therefore the forward GEMM's FP8 rounding of it (1×128 tiles along
/// the channels), seen through the same permutes and reshapes, which the caller then re-tiles
/// along the tokens: DeepGEMM's weight gradient dequantizes, transposes and re-quantizes the
/// saved activation. An activation no FP8 forward GEMM read is left as it is.
fn as_saved(
    g: &mut GraphBuilder,
    graph: &Graph,
    operand: NodeId,
    new_ids: &[Tensor],
    saved: &HashMap<Tensor, Tensor>,
) -> Result<Tensor, GraphError> {
    // Down the permutes and reshapes to the first node a forward GEMM rounded.
    let mut movements = Vec::new();
    let mut at = operand;
    let stored = loop {
        if let Some(&stored) = saved.get(&new_ids[at.index()]) {
            break stored;
        }
        match &graph.node(at).op {
            op @ (Op::Permute { .. } | Op::Reshape { .. }) => {
                movements.push(op.clone());
                at = graph.node(at).inputs[0];
            }
            _ => return Ok(new_ids[operand.index()]),
        }
    };
    movements
        .into_iter()
        .rev()
        .try_fold(stored, |t, op| g.push(op, &[t], None))
}

/// Sets how a GEMM op sums its products.
fn set_accumulation(op: &mut Op, to: Accumulation) {
    if let Op::MatMul { accumulation, .. }
    | Op::GroupedMatMul { accumulation }
    | Op::GroupedMatMulWeightGrad { accumulation, .. } = op
    {
        *accumulation = to;
    }
}

/// Makes a grouped weight gradient round its operands in FP8 tiles of `tile_rows` token-slots
/// along each expert's K; false (and nothing changed) for any other op.
fn set_expert_tiles(op: &mut Op, tile_rows: usize) -> bool {
    let Op::GroupedMatMulWeightGrad { rounding, .. } = op else {
        return false;
    };
    *rounding = Some(ExpertTiles {
        format: QuantFormat::E4M3,
        tile_rows,
        pow2_scales: false,
    });
    true
}

/// SPEC §2: the scales of two inputs are rounded up to powers of two — the MoE dispatch (the
/// tokens sent to the routed experts: the forward grouped GEMM whose `x` has one slot per
/// token, `[tokens, 1, hidden]`) and the linear after attention (`self_attn.o_proj`), forward.
fn has_pow2_input(graph: &Graph, gemm: &LinearGemm) -> bool {
    if gemm.role != GemmRole::Forward {
        return false;
    }
    let node = graph.node(gemm.node);
    if gemm.grouped {
        graph.ty(node.inputs[0]).dims().get(1) == Some(&1)
    } else {
        gemm.path.ends_with("self_attn.o_proj")
    }
}

/// How one operand is rounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Rounding {
    /// To bf16 and back.
    Bf16,
    /// `QuantizeDequantize` with these tiles; `flatten` first views the operand as
    /// `[rows, last axis]` (and back afterwards), so tiles run across its leading axes.
    Fp8 {
        tile: (usize, usize),
        flatten: bool,
        pow2: bool,
    },
}

impl Rounding {
    fn of(
        precision: Precision,
        layout: OperandLayout,
        scaling: Fp8Scaling,
        tiling: &Fp8Spec,
        dims: &[usize],
        pow2: bool,
    ) -> Rounding {
        if precision == Precision::Bf16 {
            return Rounding::Bf16;
        }
        let (t, b) = (tiling.activation_tile, tiling.weight_block);
        let rank = dims.len();
        let (rows, cols) = (dims[rank - 2], dims[rank - 1]);
        let all_rows = dims[..rank - 1].iter().product::<usize>();
        let (tile, flatten) = match (scaling, layout) {
            (Fp8Scaling::FineGrained, OperandLayout::KLast) => ((1, t), false),
            (Fp8Scaling::FineGrained, OperandLayout::KRows) => ((t, 1), false),
            (Fp8Scaling::FineGrained, OperandLayout::Weight) => ((b, b), false),
            // The op's own `ExpertTiles` in the graph; this is what they amount to with one
            // expert (`apply_precision` never asks).
            (Fp8Scaling::FineGrained, OperandLayout::TokenSlots) => ((t, 1), true),
            // Per-tensor: one tile over everything but a weight stack's expert axis.
            (Fp8Scaling::PerTensor, OperandLayout::Weight) => ((rows, cols), false),
            (Fp8Scaling::PerTensor, _) => ((all_rows, cols), rank > 2),
        };
        Rounding::Fp8 {
            tile,
            flatten: flatten && rank > 2,
            pow2,
        }
    }
}

impl Rounding {
    /// The rounding of a matrix's transpose that gives the same values as this one of the
    /// matrix: tiles of `r`×`c` elements become `c`×`r`; bf16 is elementwise. None where the
    /// operand is first flattened (tiles across several matrices).
    fn transposed(self) -> Option<Rounding> {
        match self {
            Rounding::Bf16 => Some(Rounding::Bf16),
            Rounding::Fp8 {
                tile: (rows, cols),
                flatten: false,
                pow2,
            } => Some(Rounding::Fp8 {
                tile: (cols, rows),
                flatten: false,
                pow2,
            }),
            Rounding::Fp8 { flatten: true, .. } => None,
        }
    }
}

fn round(g: &mut GraphBuilder, x: Tensor, rounding: Rounding) -> Result<Tensor, GraphError> {
    match rounding {
        Rounding::Bf16 => {
            let dtype = g.dtype(x);
            let narrow = g.cast(x, DType::BF16)?;
            g.cast(narrow, dtype)
        }
        Rounding::Fp8 {
            tile,
            flatten,
            pow2,
        } => {
            let dims = g.dims(x).to_vec();
            let (lead, cols) = dims.split_at(dims.len() - 1);
            let source = if flatten {
                g.reshape(x, &[lead.iter().product(), cols[0]])?
            } else {
                x
            };
            let q = g.quantize_dequantize(source, QuantFormat::E4M3, tile, pow2)?;
            if flatten { g.reshape(q, &dims) } else { Ok(q) }
        }
    }
}
