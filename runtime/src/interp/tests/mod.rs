//! Unit tests of the reference interpreter: every op on small hand-computed examples, the
//! error cases, and a tiny model end to end.

// Exact binary fractions (1 + 2^-8 = 1.00390625) are written in full: clearer than the shortest
// f32 spelling (1.0039063) when the test is about rounding.
#![allow(clippy::excessive_precision)]

mod api;
mod attention;
mod elementwise;
mod errors;
mod indexing;
mod linalg;
mod movement;
mod quantize;
mod tiny_model;

use std::collections::HashMap;
use std::error::Error;

use fathom_compiler::{DType, GraphBuilder, GraphError, Tensor, TensorType};

use super::{Feeds, evaluate};
use crate::tensor::{Data, HostTensor};

pub(super) type TestResult<T = ()> = Result<T, Box<dyn Error>>;

pub(super) fn ty(dtype: DType, dims: &[usize]) -> TensorType {
    TensorType::new(dtype, dims)
}

pub(super) fn f32s(dims: &[usize], values: &[f32]) -> HostTensor {
    HostTensor::f32(dims, values.to_vec())
}

/// A float tensor of `dtype`; the values must already be values of that dtype.
pub(super) fn floats(dtype: DType, dims: &[usize], values: &[f32]) -> HostTensor {
    HostTensor {
        ty: ty(dtype, dims),
        data: Data::Float(values.to_vec()),
    }
}

pub(super) fn i64s(dims: &[usize], values: &[i64]) -> HostTensor {
    HostTensor::i64(dims, values.to_vec())
}

pub(super) fn ints(dtype: DType, dims: &[usize], values: &[i64]) -> HostTensor {
    HostTensor {
        ty: ty(dtype, dims),
        data: Data::Int(values.to_vec()),
    }
}

pub(super) fn bools(dims: &[usize], values: &[bool]) -> HostTensor {
    HostTensor {
        ty: ty(DType::Bool, dims),
        data: Data::Bool(values.to_vec()),
    }
}

/// Builds a graph with one input per feed (named and typed as the feed), applies `build` to
/// the input handles, and evaluates the result.
pub(super) fn eval_one(
    feeds: &[(&str, HostTensor)],
    build: impl FnOnce(&mut GraphBuilder, &[Tensor]) -> Result<Tensor, GraphError>,
) -> TestResult<HostTensor> {
    let mut b = GraphBuilder::new("test");
    let inputs = feeds
        .iter()
        .map(|(name, t)| b.input(name, t.ty.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let out = build(&mut b, &inputs)?;
    b.output("out", out)?;
    let graph = b.finish();
    let inputs: HashMap<&str, &HostTensor> = feeds.iter().map(|(n, t)| (*n, t)).collect();
    let mut outputs = evaluate(&graph, &Feeds::new(&inputs, &()))?;
    Ok(outputs.remove("out").ok_or("no output")?)
}

/// `eval_one` with a single input named `x`.
pub(super) fn eval_x(
    x: HostTensor,
    build: impl FnOnce(&mut GraphBuilder, Tensor) -> Result<Tensor, GraphError>,
) -> TestResult<HostTensor> {
    eval_one(&[("x", x)], |b, inputs| build(b, inputs[0]))
}

/// Exact comparison of a float result (NaN equals NaN).
#[track_caller]
pub(super) fn assert_floats(t: &HostTensor, dtype: DType, dims: &[usize], expected: &[f32]) {
    assert_eq!(t.ty, ty(dtype, dims), "type");
    let got = t.as_f32().expect("float data");
    let same = got.len() == expected.len()
        && got
            .iter()
            .zip(expected)
            .all(|(g, e)| g == e || (g.is_nan() && e.is_nan()));
    assert!(same, "got {got:?}, expected {expected:?}");
}

#[track_caller]
pub(super) fn assert_f32(t: &HostTensor, dims: &[usize], expected: &[f32]) {
    assert_floats(t, DType::F32, dims, expected);
}

#[track_caller]
pub(super) fn assert_close(t: &HostTensor, dims: &[usize], expected: &[f64], tolerance: f64) {
    assert_eq!(t.dims(), dims, "shape");
    let got = t.as_f32().expect("float data");
    assert_eq!(got.len(), expected.len());
    for (i, (&g, &e)) in got.iter().zip(expected).enumerate() {
        assert!(
            (f64::from(g) - e).abs() <= tolerance,
            "element {i}: got {g}, expected {e}"
        );
    }
}

#[track_caller]
pub(super) fn assert_ints(t: &HostTensor, dtype: DType, dims: &[usize], expected: &[i64]) {
    assert_eq!(t.ty, ty(dtype, dims), "type");
    assert_eq!(t.as_i64().expect("int data"), expected);
}

#[track_caller]
pub(super) fn assert_bools(t: &HostTensor, dims: &[usize], expected: &[bool]) {
    assert_eq!(t.ty, ty(DType::Bool, dims), "type");
    assert_eq!(t.as_bool().expect("bool data"), expected);
}

/// `0, 1, 2, ...` as an f32 tensor of extents `dims`.
pub(super) fn iota(dims: &[usize]) -> HostTensor {
    let n: usize = dims.iter().product();
    f32s(dims, &(0..n).map(|i| i as f32).collect::<Vec<_>>())
}
