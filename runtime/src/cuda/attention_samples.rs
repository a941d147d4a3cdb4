//! Causal MLA attention on the host, in the layouts of the attention templates
//! (`fathom_kernels::attention`): bf16 inputs, and the exact (f64) forward and backward that
//! `fathom gpu-check` compares the templates with.
//!
//! Layouts (as `mla_attention_fwd.cuh`): `q [B][T][H][nope + rope]`, `k_nope [B][T][H][nope]`,
//! `k_rope [B][T][rope]` (one key shared by the heads), `v`, `o`, `d_o` `[B][T][H][v]`;
//! `lse` and `delta` `[B][H][T]`; the gradients f32 in their inputs' layouts.

use std::collections::HashMap;

use fathom_compiler::graph::{AttentionConfig, AttentionOperand, Op};
use fathom_compiler::{DType, Graph, GraphBuilder, GraphError, TensorType};
use fathom_kernels::MlaHeadDims;

use crate::fp8::{bf16_to_f32, f32_to_bf16};
use crate::tensor::HostTensor;

/// One attention problem: its inputs (bf16 bits) and the exact results.
#[derive(Clone, Debug)]
pub struct AttentionSample {
    pub dims: MlaHeadDims,
    pub batch: usize,
    pub seq_len: usize,
    pub heads: usize,
    pub softmax_scale: f32,
    pub q: Vec<u16>,
    pub k_nope: Vec<u16>,
    pub k_rope: Vec<u16>,
    pub v: Vec<u16>,
    pub d_o: Vec<u16>,
    /// The exact results, rounded to f32.
    pub exact: Results<f32>,
}

/// Attention's results, in the templates' layouts.
#[derive(Clone, Debug)]
pub struct Results<T> {
    /// `softmax(scale · q kᵀ, causal) v`.
    pub o: Vec<T>,
    /// ln Σ exp(scale · q kᵀ) per query.
    pub lse: Vec<T>,
    /// Σ o · dO per query, of the exact `o` (what the backward kernel is given).
    pub delta: Vec<T>,
    pub dq: Vec<T>,
    pub dk_nope: Vec<T>,
    pub dk_rope: Vec<T>,
    pub dv: Vec<T>,
}

/// Deterministic values in [-1, 1) rounded to bf16.
fn bf16_values(len: usize, seed: u64) -> Vec<u16> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            f32_to_bf16(((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        })
        .collect()
}

fn widen(bits: &[u16]) -> Vec<f64> {
    bits.iter().map(|&b| f64::from(bf16_to_f32(b))).collect()
}

impl AttentionSample {
    /// `batch` sequences of `seq_len` tokens and `heads` heads with random inputs, and their
    /// exact attention.
    pub fn new(dims: MlaHeadDims, batch: usize, seq_len: usize, heads: usize) -> Self {
        let (nope, rope, dv) = (dims.nope as usize, dims.rope as usize, dims.v as usize);
        let qk = nope + rope;
        let tokens = batch * seq_len;
        let softmax_scale = 1.0 / (qk as f32).sqrt();
        let mut sample = AttentionSample {
            dims,
            batch,
            seq_len,
            heads,
            softmax_scale,
            q: bf16_values(tokens * heads * qk, 1),
            k_nope: bf16_values(tokens * heads * nope, 2),
            k_rope: bf16_values(tokens * rope, 3),
            v: bf16_values(tokens * heads * dv, 4),
            d_o: bf16_values(tokens * heads * dv, 5),
            exact: Results {
                o: Vec::new(),
                lse: Vec::new(),
                delta: Vec::new(),
                dq: Vec::new(),
                dk_nope: Vec::new(),
                dk_rope: Vec::new(),
                dv: Vec::new(),
            },
        };
        sample.compute();
        sample
    }

    /// The forward and backward of the inputs, rounded to f32.
    fn compute(&mut self) {
        let inputs = Inputs {
            q: widen(&self.q),
            k_nope: widen(&self.k_nope),
            k_rope: widen(&self.k_rope),
            v: widen(&self.v),
            d_o: widen(&self.d_o),
        };
        let sizes = (self.batch, self.seq_len, self.heads);
        let exact = attention(self.dims, sizes, f64::from(self.softmax_scale), &inputs);
        let narrow = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
        self.exact = Results {
            o: narrow(exact.o),
            lse: narrow(exact.lse),
            delta: narrow(exact.delta),
            dq: narrow(exact.dq),
            dk_nope: narrow(exact.dk_nope),
            dk_rope: narrow(exact.dk_rope),
            dv: narrow(exact.dv),
        };
    }

    /// The exact output rounded to bf16: what the forward template stores, and what the `delta`
    /// template reads.
    pub fn o_bf16(&self) -> Vec<u16> {
        self.exact.o.iter().map(|&x| f32_to_bf16(x)).collect()
    }

    /// Σ o·dO per query over the bf16 output: what the `delta` template must compute from
    /// [`o_bf16`](Self::o_bf16).
    pub fn delta_of_bf16_o(&self) -> Vec<f32> {
        let dv = self.dims.v as usize;
        let (o, d_o) = (widen(&self.o_bf16()), widen(&self.d_o));
        let (t_count, h_count) = (self.seq_len, self.heads);
        let mut delta = vec![0f32; self.batch * h_count * t_count];
        for (row, chunk) in o.chunks(dv).enumerate() {
            let (bt, h) = (row / h_count, row % h_count);
            let (b, t) = (bt / t_count, bt % t_count);
            let sum: f64 = chunk
                .iter()
                .zip(&d_o[row * dv..][..dv])
                .map(|(x, y)| x * y)
                .sum();
            delta[(b * h_count + h) * t_count + t] = sum as f32;
        }
        delta
    }
}

/// Attention's inputs in f64, in the templates' layouts.
#[derive(Clone, Debug)]
struct Inputs {
    q: Vec<f64>,
    k_nope: Vec<f64>,
    k_rope: Vec<f64>,
    v: Vec<f64>,
    d_o: Vec<f64>,
}

/// The causal forward and backward in f64, query by query: scores against keys `0..=t`, their
/// softmax, `o = P v`; then `dP = dO vᵀ`, `dS = P ∘ (dP − delta)` with `delta = Σ o·dO`,
/// `dq = scale·dS k`, `dk = scale·dSᵀ q` (the rope key's summed over heads), `dv = Pᵀ dO`.
fn attention(
    dims: MlaHeadDims,
    (b_count, t_count, h_count): (usize, usize, usize),
    scale: f64,
    inputs: &Inputs,
) -> Results<f64> {
    let (nope, rope, dv) = (dims.nope as usize, dims.rope as usize, dims.v as usize);
    let qk = nope + rope;
    let Inputs {
        q,
        k_nope,
        k_rope,
        v,
        d_o,
    } = inputs;
    let tokens = b_count * t_count;
    let mut o = vec![0f64; tokens * h_count * dv];
    let mut lse = vec![0f64; b_count * h_count * t_count];
    let mut delta = vec![0f64; b_count * h_count * t_count];
    let mut dq = vec![0f64; tokens * h_count * qk];
    let mut dk_nope = vec![0f64; tokens * h_count * nope];
    let mut dk_rope = vec![0f64; tokens * rope];
    let mut d_v = vec![0f64; tokens * h_count * dv];
    // Row offsets of token (b, t), head h.
    let at = |b: usize, t: usize, h: usize, width: usize| ((b * t_count + t) * h_count + h) * width;
    let rope_at = |b: usize, t: usize| (b * t_count + t) * rope;
    for b in 0..b_count {
        for h in 0..h_count {
            for t in 0..t_count {
                let q_row = &q[at(b, t, h, qk)..][..qk];
                // Scores against keys 0..=t, then the softmax.
                let scores: Vec<f64> = (0..=t)
                    .map(|j| {
                        let kn = &k_nope[at(b, j, h, nope)..][..nope];
                        let kr = &k_rope[rope_at(b, j)..][..rope];
                        let dot: f64 = q_row[..nope]
                            .iter()
                            .zip(kn)
                            .map(|(x, y)| x * y)
                            .sum::<f64>()
                            + q_row[nope..]
                                .iter()
                                .zip(kr)
                                .map(|(x, y)| x * y)
                                .sum::<f64>();
                        scale * dot
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                let row_lse = max + sum.ln();
                lse[(b * h_count + h) * t_count + t] = row_lse;
                let p: Vec<f64> = scores.iter().map(|s| (s - row_lse).exp()).collect();
                let o_row = at(b, t, h, dv);
                for (j, pj) in p.iter().enumerate() {
                    let v_row = &v[at(b, j, h, dv)..][..dv];
                    for c in 0..dv {
                        o[o_row + c] += pj * v_row[c];
                    }
                }
                let do_row = &d_o[o_row..][..dv];
                let row_delta: f64 = o[o_row..][..dv]
                    .iter()
                    .zip(do_row)
                    .map(|(x, y)| x * y)
                    .sum();
                delta[(b * h_count + h) * t_count + t] = row_delta;
                for (j, pj) in p.iter().enumerate() {
                    let v_row = &v[at(b, j, h, dv)..][..dv];
                    let dp: f64 = do_row.iter().zip(v_row).map(|(x, y)| x * y).sum();
                    let ds = pj * (dp - row_delta) * scale;
                    let kn = &k_nope[at(b, j, h, nope)..][..nope];
                    let kr = &k_rope[rope_at(b, j)..][..rope];
                    let dq_row = at(b, t, h, qk);
                    for c in 0..nope {
                        dq[dq_row + c] += ds * kn[c];
                        dk_nope[at(b, j, h, nope) + c] += ds * q_row[c];
                    }
                    for c in 0..rope {
                        dq[dq_row + nope + c] += ds * kr[c];
                        dk_rope[rope_at(b, j) + c] += ds * q_row[nope + c];
                    }
                    for c in 0..dv {
                        d_v[at(b, j, h, dv) + c] += pj * do_row[c];
                    }
                }
            }
        }
    }
    Results {
        o,
        lse,
        delta,
        dq,
        dk_nope,
        dk_rope,
        dv: d_v,
    }
}

/// The largest |got − expected| over the largest |expected|: how the GPU's results are judged.
/// The templates round P (and dS) to bf16 before their products and sum in f32, so each output is
/// off by a few bf16 steps (2⁻⁸) of the largest terms it sums; 1e-2 of the largest output leaves
/// room for that, while a wrong index, mask or scale is off by order 1.
pub fn error_of_max(got: &[f32], expected: &[f32]) -> f64 {
    let max = expected
        .iter()
        .map(|x| f64::from(x.abs()))
        .fold(0.0, f64::max);
    let worst = got
        .iter()
        .zip(expected)
        .map(|(g, e)| (f64::from(*g) - f64::from(*e)).abs())
        .fold(
            0.0,
            |a: f64, d| if d.is_nan() { f64::INFINITY } else { a.max(d) },
        );
    if got.len() != expected.len() {
        f64::INFINITY
    } else if max == 0.0 {
        worst
    } else {
        worst / max
    }
}

/// A program's view of attention: one `CausalAttention` with bf16 products of the inputs `q`
/// and `k_rope` and of `k_nope` and `v` sliced from the input `kv [b, t, h, nope + v]` (as MLA
/// slices its key-value projection: rows a stride apart, which the GPU's conversions read where
/// they lie), its statistic, and its four gradients for the input `d_out`, all outputs (`out`,
/// `lse`, `grad.q`, `grad.k_nope`, `grad.k_rope`, `grad.v`). Compiled with
/// `cuda::lower_options` it is two library calls, which the plan's tests emulate and `fathom
/// gpu-check` runs, both against the interpreter.
pub fn attention_call_graph(
    dims: MlaHeadDims,
    (batch, tokens, heads): (usize, usize, usize),
    scale: f64,
) -> Result<Graph, GraphError> {
    let (nope, rope, v) = (dims.nope as usize, dims.rope as usize, dims.v as usize);
    let mut g = GraphBuilder::new("attention");
    let mut input = |name: &str, dims: Vec<usize>| g.input(name, TensorType::new(DType::F32, dims));
    let q = input("q", vec![batch, tokens, heads, nope + rope])?;
    let kv = input("kv", vec![batch, tokens, heads, nope + v])?;
    let k_rope = input("k_rope", vec![batch, tokens, rope])?;
    let d_out = input("d_out", vec![batch, tokens, heads, v])?;
    let k_nope = g.slice(kv, 3, 0, nope)?;
    let value = g.slice(kv, 3, nope, nope + v)?;
    let config = AttentionConfig {
        scale,
        products_in: Some(DType::BF16),
    };
    let operands = [q, k_nope, k_rope, value];
    let out = g.push(Op::CausalAttention(config), &operands, None)?;
    let lse = g.push(Op::CausalAttentionLse(config), &operands, None)?;
    g.output("out", out)?;
    g.output("lse", lse)?;
    let mut read = operands.to_vec();
    read.extend([out, lse, d_out]);
    for operand in AttentionOperand::ALL {
        let op = Op::CausalAttentionGrad { config, operand };
        let grad = g.push(op, &read, None)?;
        g.output(&format!("grad.{}", operand.name()), grad)?;
    }
    Ok(g.finish())
}

/// Deterministic values in [-1, 1) for every input of [`attention_call_graph`].
pub fn attention_call_feeds(graph: &Graph) -> HashMap<String, HostTensor> {
    graph
        .nodes
        .iter()
        .filter_map(|node| match &node.op {
            Op::Input { name } => Some((name.clone(), node.ty.dims().to_vec())),
            _ => None,
        })
        .enumerate()
        .map(|(i, (name, dims))| {
            let n = dims.iter().product();
            let values = widen(&bf16_values(n, 11 + i as u64))
                .into_iter()
                // Off the bf16 grid, so that the conversion to bf16 rounds.
                .map(|x| (x * 1.001) as f32)
                .collect();
            (name, HostTensor::f32(dims, values))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const SMALL: MlaHeadDims = MlaHeadDims {
        nope: 4,
        rope: 2,
        v: 3,
    };

    #[test]
    fn the_first_query_sees_only_the_first_key() {
        let s = AttentionSample::new(SMALL, 2, 5, 2);
        // Token 0 of sequence 1, head 1: o = v, lse = its one score.
        let (qk, dv) = (6, 3);
        let row = 5 * 2 + 1; // token (1, 0), head 1
        let v: Vec<f32> = s.v[row * dv..][..dv]
            .iter()
            .map(|&b| bf16_to_f32(b))
            .collect();
        assert_eq!(&s.exact.o[row * dv..][..dv], &v[..]);
        let q = widen(&s.q[row * qk..][..qk]);
        let k: Vec<f64> = widen(&s.k_nope[row * 4..][..4])
            .into_iter()
            .chain(widen(&s.k_rope[5 * 2..][..2]))
            .collect();
        let score: f64 =
            q.iter().zip(&k).map(|(a, b)| a * b).sum::<f64>() * f64::from(s.softmax_scale);
        assert!((f64::from(s.exact.lse[(2 + 1) * 5]) - score).abs() < 1e-6);
    }

    /// L = Σ o·dO: its derivative by central differences against the backward, for every
    /// input element (the rope key's shared by the heads).
    #[test]
    fn the_backward_is_the_forwards_derivative() {
        let s = AttentionSample::new(SMALL, 1, 4, 2);
        let inputs = Inputs {
            q: widen(&s.q),
            k_nope: widen(&s.k_nope),
            k_rope: widen(&s.k_rope),
            v: widen(&s.v),
            d_o: widen(&s.d_o),
        };
        let sizes = (1, 4, 2);
        let scale = f64::from(s.softmax_scale);
        let exact = attention(SMALL, sizes, scale, &inputs);
        let loss = |inputs: &Inputs| -> f64 {
            let o = attention(SMALL, sizes, scale, inputs).o;
            o.iter().zip(&inputs.d_o).map(|(o, d)| o * d).sum()
        };
        let h = 1e-5;
        let check = |pick: fn(&mut Inputs) -> &mut Vec<f64>, grad: &[f64], what: &str| {
            for (i, &analytic) in grad.iter().enumerate() {
                let (mut plus, mut minus) = (inputs.clone(), inputs.clone());
                pick(&mut plus)[i] += h;
                pick(&mut minus)[i] -= h;
                let numeric = (loss(&plus) - loss(&minus)) / (2.0 * h);
                assert!(
                    (numeric - analytic).abs() <= 1e-6 * (1.0 + analytic.abs()),
                    "{what}[{i}]: finite difference {numeric}, backward {analytic}"
                );
            }
        };
        check(|x| &mut x.q, &exact.dq, "dq");
        check(|x| &mut x.k_nope, &exact.dk_nope, "dk_nope");
        check(|x| &mut x.k_rope, &exact.dk_rope, "dk_rope");
        check(|x| &mut x.v, &exact.dv, "dv");
        assert_eq!(exact.dk_rope.len(), 4 * 2, "one rope key per token");
    }

    #[test]
    fn delta_of_the_bf16_output_and_the_error_measure() {
        let s = AttentionSample::new(SMALL, 1, 3, 2);
        let from_bf16 = s.delta_of_bf16_o();
        assert!(error_of_max(&from_bf16, &s.exact.delta) < 1e-2);
        assert_eq!(error_of_max(&s.exact.dq, &s.exact.dq), 0.0);
        let mut wrong = s.exact.dq.clone();
        wrong[0] += 1.0;
        assert!(error_of_max(&wrong, &s.exact.dq) > 1e-2);
        assert_eq!(error_of_max(&[f32::NAN], &[1.0]), f64::INFINITY);
    }
}
