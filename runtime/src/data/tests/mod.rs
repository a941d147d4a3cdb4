//! Unit tests of the data layer: the byte tokenizer, text windows (contents, wrap-around,
//! resuming, errors) and the synthetic tasks (determinism, rules, loss floors).

#![allow(clippy::unwrap_used)]

mod synthetic;
mod text;
mod tokenizer;

use crate::tensor::HostTensor;

/// The rows of an `i64 [batch, seq]` batch.
fn rows(t: &HostTensor) -> Vec<Vec<i64>> {
    let seq = t.dims()[1];
    t.as_i64()
        .unwrap()
        .chunks(seq)
        .map(<[i64]>::to_vec)
        .collect()
}
