//! Host tensors: the values the reference interpreter computes with and that weights load into.

use fathom_compiler::{DType, Shape, TensorType};

/// Element storage. Every floating type is held as f32 values that are exactly representable in
/// the tensor's dtype (a bf16 tensor holds bf16-rounded f32s), so one arithmetic path serves all
/// float types; `i32` and `i64` are held as i64.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    Float(Vec<f32>),
    Int(Vec<i64>),
    Bool(Vec<bool>),
}

/// A dense, row-major tensor in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub ty: TensorType,
    pub data: Data,
}

impl HostTensor {
    /// An f32 tensor. Panics if `values` does not fill `shape`: callers build both together.
    pub fn f32(shape: impl Into<Shape>, values: Vec<f32>) -> Self {
        let ty = TensorType::new(DType::F32, shape);
        assert_eq!(ty.numel(), values.len(), "values do not fill {ty}");
        HostTensor {
            ty,
            data: Data::Float(values),
        }
    }

    /// An i64 tensor. Panics if `values` does not fill `shape`.
    pub fn i64(shape: impl Into<Shape>, values: Vec<i64>) -> Self {
        let ty = TensorType::new(DType::I64, shape);
        assert_eq!(ty.numel(), values.len(), "values do not fill {ty}");
        HostTensor {
            ty,
            data: Data::Int(values),
        }
    }

    pub fn dims(&self) -> &[usize] {
        self.ty.dims()
    }

    /// The float values, or `None` for integer and bool tensors.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::Float(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            Data::Int(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<&[bool]> {
        match &self.data {
            Data::Bool(v) => Some(v),
            _ => None,
        }
    }
}
