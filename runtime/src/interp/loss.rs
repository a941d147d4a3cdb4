//! `CrossEntropy` and its gradient, row by row in f64 (rounded once to the result's type): the
//! oracle the compiled loop nests are checked against. A negative label marks a row that does
//! not count (loss and gradient 0); a label at or beyond the vocabulary is an error.

use super::error::InterpError;
use super::eval::At;
use super::numeric::round_f64;
use crate::tensor::{Data, HostTensor};

/// Per row: `log Σ_v exp(x_v − m) − (x_label − m)`.
pub(super) fn cross_entropy(
    at: At<'_>,
    logits: &HostTensor,
    labels: &HostTensor,
) -> Result<HostTensor, InterpError> {
    let rows = Rows::of(at, logits, labels)?;
    let dtype = at.out_dtype();
    let mut out = Vec::with_capacity(rows.labels.len());
    for (r, &label) in rows.labels.iter().enumerate() {
        let loss = match rows.label(at, label)? {
            None => 0.0,
            Some(label) => {
                let x = rows.row(r);
                let (max, sum) = max_and_sum(x);
                sum.ln() - (f64::from(x[label]) - max)
            }
        };
        out.push(round_f64(dtype, loss));
    }
    Ok(at.tensor(Data::Float(out)))
}

/// Per row: `(softmax(x) − onehot(label)) · g`.
pub(super) fn cross_entropy_grad(
    at: At<'_>,
    logits: &HostTensor,
    labels: &HostTensor,
    cotangent: &HostTensor,
) -> Result<HostTensor, InterpError> {
    let rows = Rows::of(at, logits, labels)?;
    let g = at.floats(cotangent)?;
    let dtype = at.out_dtype();
    let mut out = Vec::with_capacity(rows.x.len());
    for (r, &label) in rows.labels.iter().enumerate() {
        let x = rows.row(r);
        match rows.label(at, label)? {
            None => out.extend(std::iter::repeat_n(0.0, x.len())),
            Some(label) => {
                let (max, sum) = max_and_sum(x);
                let g = f64::from(g[r]);
                out.extend(x.iter().enumerate().map(|(v, &xv)| {
                    let p = (f64::from(xv) - max).exp() / sum;
                    let hot = if v == label { 1.0 } else { 0.0 };
                    round_f64(dtype, (p - hot) * g)
                }));
            }
        }
    }
    Ok(at.tensor(Data::Float(out)))
}

/// The logits as rows of the vocabulary's length, with one label per row.
struct Rows<'t> {
    x: &'t [f32],
    labels: &'t [i64],
    vocab: usize,
}

impl<'t> Rows<'t> {
    fn of(at: At<'_>, logits: &'t HostTensor, labels: &'t HostTensor) -> Result<Self, InterpError> {
        let vocab = logits.dims().last().copied().unwrap_or(1);
        Ok(Rows {
            x: at.floats(logits)?,
            labels: at.ints(labels)?,
            vocab,
        })
    }

    fn row(&self, r: usize) -> &'t [f32] {
        &self.x[r * self.vocab..][..self.vocab]
    }

    /// The label's position, or `None` for an ignored (negative) label.
    fn label(&self, at: At<'_>, label: i64) -> Result<Option<usize>, InterpError> {
        if label < 0 {
            return Ok(None);
        }
        at.index(label, self.vocab).map(Some)
    }
}

/// The row's max and `Σ exp(x − max)`, in f64.
fn max_and_sum(x: &[f32]) -> (f64, f64) {
    let max = x
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
    let sum = x.iter().map(|&v| (f64::from(v) - max).exp()).sum();
    (max, sum)
}
