//! `CausalAttention`, its softmax statistic and its gradients, head by head in f64 from the
//! definition in `graph::Op` (the oracle for a backend's fused attention and for the
//! compiler's expansion of it into primitives). Dot products and sums accumulate in f64 in
//! index order; each result rounds once to f32 and then to its dtype. With `products_in`, an
//! operand of a product is rounded to that type (through f32, as a graph's cast of an f32
//! value does) before it is multiplied: `q`, `k` and `v`, the probabilities before they weigh
//! the values, and in the gradient `d_out` and the scores' gradient.

use fathom_compiler::DType;
use fathom_compiler::graph::{AttentionConfig, AttentionOperand};

use super::error::InterpError;
use super::eval::At;
use super::numeric::round_f64;
use crate::tensor::{Data, HostTensor};

/// One (batch, head) pair's operands as f64 rows: `q` and `k` `[t][nope + rope]`, `v`
/// `[t][dv]`, rounded for the products when the config says so.
struct Head {
    q: Vec<Vec<f64>>,
    k: Vec<Vec<f64>>,
    v: Vec<Vec<f64>>,
}

/// The operands' extents and values.
struct Operands<'t> {
    batch: usize,
    tokens: usize,
    heads: usize,
    nope: usize,
    rope: usize,
    dv: usize,
    q: &'t [f32],
    k_nope: &'t [f32],
    k_rope: &'t [f32],
    v: &'t [f32],
    round: Option<DType>,
}

impl<'t> Operands<'t> {
    fn of(at: At<'_>, config: &AttentionConfig, x: &[&'t HostTensor]) -> Result<Self, InterpError> {
        let (qd, nd, vd) = (x[0].dims(), x[1].dims(), x[3].dims());
        Ok(Operands {
            batch: qd[0],
            tokens: qd[1],
            heads: qd[2],
            nope: nd[3],
            rope: qd[3] - nd[3],
            dv: vd[3],
            q: at.floats(x[0])?,
            k_nope: at.floats(x[1])?,
            k_rope: at.floats(x[2])?,
            v: at.floats(x[3])?,
            round: config.products_in,
        })
    }

    fn qk(&self) -> usize {
        self.nope + self.rope
    }

    /// `x` as a product reads it.
    fn rounded(&self, x: f64) -> f64 {
        match self.round {
            Some(dtype) => f64::from(round_f64(dtype, x)),
            None => x,
        }
    }

    /// Offset of token `t`, head `h` in a `[b, t, h, width]` array.
    fn at(&self, b: usize, t: usize, h: usize, width: usize) -> usize {
        ((b * self.tokens + t) * self.heads + h) * width
    }

    fn head(&self, b: usize, h: usize) -> Head {
        let (qk, nope, rope, dv) = (self.qk(), self.nope, self.rope, self.dv);
        let row = |data: &[f32], start: usize, len: usize| -> Vec<f64> {
            data[start..start + len]
                .iter()
                .map(|&x| self.rounded(f64::from(x)))
                .collect()
        };
        let mut head = Head {
            q: Vec::with_capacity(self.tokens),
            k: Vec::with_capacity(self.tokens),
            v: Vec::with_capacity(self.tokens),
        };
        for t in 0..self.tokens {
            head.q.push(row(self.q, self.at(b, t, h, qk), qk));
            let mut k = row(self.k_nope, self.at(b, t, h, nope), nope);
            k.extend(row(self.k_rope, (b * self.tokens + t) * rope, rope));
            head.k.push(k);
            head.v.push(row(self.v, self.at(b, t, h, dv), dv));
        }
        head
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Query `i`'s probabilities over keys `0..=i` and its `log Σ exp(scale · q · k)`.
fn softmax_row(head: &Head, scale: f64, i: usize) -> (Vec<f64>, f64) {
    let z: Vec<f64> = (0..=i)
        .map(|j| scale * dot(&head.q[i], &head.k[j]))
        .collect();
    let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = z.iter().map(|s| (s - max).exp()).sum();
    let p = z.iter().map(|s| (s - max).exp() / sum).collect();
    (p, max + sum.ln())
}

/// `[b, t, h, dv]`: each query's probability-weighted sum of the values at or before it.
pub(super) fn causal_attention(
    at: At<'_>,
    config: &AttentionConfig,
    x: &[&HostTensor],
) -> Result<HostTensor, InterpError> {
    let ops = Operands::of(at, config, x)?;
    let dtype = at.out_dtype();
    let mut out = vec![0.0f32; ops.batch * ops.tokens * ops.heads * ops.dv];
    for b in 0..ops.batch {
        for h in 0..ops.heads {
            let head = ops.head(b, h);
            for i in 0..ops.tokens {
                let (p, _) = softmax_row(&head, config.scale, i);
                let o = &mut out[ops.at(b, i, h, ops.dv)..][..ops.dv];
                for (c, o) in o.iter_mut().enumerate() {
                    let sum: f64 = (0..=i).map(|j| ops.rounded(p[j]) * head.v[j][c]).sum();
                    *o = round_f64(dtype, sum);
                }
            }
        }
    }
    Ok(at.tensor(Data::Float(out)))
}

/// `[b, h, t]`: each query's `log Σ_{j ≤ i} exp(scale · q · k)`.
pub(super) fn causal_attention_lse(
    at: At<'_>,
    config: &AttentionConfig,
    x: &[&HostTensor],
) -> Result<HostTensor, InterpError> {
    let ops = Operands::of(at, config, x)?;
    let dtype = at.out_dtype();
    let mut out = Vec::with_capacity(ops.batch * ops.heads * ops.tokens);
    for b in 0..ops.batch {
        for h in 0..ops.heads {
            let head = ops.head(b, h);
            out.extend(
                (0..ops.tokens).map(|i| round_f64(dtype, softmax_row(&head, config.scale, i).1)),
            );
        }
    }
    Ok(at.tensor(Data::Float(out)))
}

/// The gradient with respect to `operand` for the cotangent `x[6]` (`out` and `lse`, `x[4]`
/// and `x[5]`, are not needed by the definition).
pub(super) fn causal_attention_grad(
    at: At<'_>,
    config: &AttentionConfig,
    operand: AttentionOperand,
    x: &[&HostTensor],
) -> Result<HostTensor, InterpError> {
    let ops = Operands::of(at, config, x)?;
    let d_out = at.floats(x[6])?;
    let dtype = at.out_dtype();
    let (tokens, qk, nope, dv) = (ops.tokens, ops.qk(), ops.nope, ops.dv);
    let mut grad = vec![0.0f64; x[operand.index()].ty.numel()];
    for b in 0..ops.batch {
        for h in 0..ops.heads {
            let head = ops.head(b, h);
            let d_o: Vec<Vec<f64>> = (0..tokens)
                .map(|t| {
                    d_out[ops.at(b, t, h, dv)..][..dv]
                        .iter()
                        .map(|&g| ops.rounded(f64::from(g)))
                        .collect()
                })
                .collect();
            // dS[i][j] = scale · P (dP − Σ P dP), rounded for the products that read it.
            let mut probs = Vec::with_capacity(tokens);
            let mut d_scores = Vec::with_capacity(tokens);
            for (i, d_o) in d_o.iter().enumerate() {
                let (p, _) = softmax_row(&head, config.scale, i);
                let dp: Vec<f64> = (0..=i).map(|j| dot(d_o, &head.v[j])).collect();
                let centre = dot(&p, &dp);
                let ds: Vec<f64> = (0..=i)
                    .map(|j| ops.rounded(config.scale * p[j] * (dp[j] - centre)))
                    .collect();
                probs.push(p);
                d_scores.push(ds);
            }
            match operand {
                AttentionOperand::Query => {
                    for i in 0..tokens {
                        let row = &mut grad[ops.at(b, i, h, qk)..][..qk];
                        for (c, g) in row.iter_mut().enumerate() {
                            *g = (0..=i).map(|j| d_scores[i][j] * head.k[j][c]).sum();
                        }
                    }
                }
                AttentionOperand::KeyNope | AttentionOperand::KeyRope => {
                    for j in 0..tokens {
                        let dk: Vec<f64> = (0..qk)
                            .map(|c| (j..tokens).map(|i| d_scores[i][j] * head.q[i][c]).sum())
                            .collect();
                        if operand == AttentionOperand::KeyNope {
                            grad[ops.at(b, j, h, nope)..][..nope].copy_from_slice(&dk[..nope]);
                        } else {
                            // The rope key is shared: its gradient sums over heads, in order.
                            let rope = &mut grad[(b * tokens + j) * ops.rope..][..ops.rope];
                            for (g, d) in rope.iter_mut().zip(&dk[nope..]) {
                                *g += d;
                            }
                        }
                    }
                }
                AttentionOperand::Value => {
                    for j in 0..tokens {
                        let row = &mut grad[ops.at(b, j, h, dv)..][..dv];
                        for (c, g) in row.iter_mut().enumerate() {
                            *g = (j..tokens)
                                .map(|i| ops.rounded(probs[i][j]) * d_o[i][c])
                                .sum();
                        }
                    }
                }
            }
        }
    }
    Ok(at.tensor(Data::Float(
        grad.into_iter().map(|g| round_f64(dtype, g)).collect(),
    )))
}
