//! Leaf nodes: `Input` and `Parameter` (fed tensors, checked) and `Constant`.

use fathom_compiler::graph::ConstantData;
use fathom_compiler::{DType, TensorType};

use super::TensorSource;
use super::error::InterpError;
use super::eval::At;
use super::numeric::{int_in_range, is_representable, round_f64};
use crate::tensor::{Data, HostTensor};

/// The tensor fed for the `Input` or `Parameter` node `at`, after checking that its type is
/// exactly the declared one and that its data fits that type.
pub(super) fn fed<'f>(
    at: At<'_>,
    kind: &'static str,
    name: &str,
    source: &'f dyn TensorSource,
) -> Result<&'f HostTensor, InterpError> {
    let declared = &at.node.ty;
    let tensor = source.tensor(name).ok_or_else(|| InterpError::Missing {
        kind,
        name: name.to_owned(),
        node: at.id,
        declared: declared.clone(),
    })?;
    if tensor.ty != *declared {
        return Err(InterpError::TypeMismatch {
            kind,
            name: name.to_owned(),
            declared: declared.clone(),
            fed: tensor.ty.clone(),
        });
    }
    check_data(&tensor.ty, &tensor.data).map_err(|detail| InterpError::MalformedFeed {
        kind,
        name: name.to_owned(),
        ty: tensor.ty.clone(),
        detail,
    })?;
    Ok(tensor)
}

/// Checks that `data` is a valid value of type `ty`: the right storage for the dtype, one
/// element per position, and every element a value of the dtype.
pub(super) fn check_data(ty: &TensorType, data: &Data) -> Result<(), String> {
    let dtype = ty.dtype;
    let len = match data {
        Data::Float(v) if dtype == DType::F32 => v.len(), // every f32 is an f32 value
        Data::Float(v) if dtype.is_float() => {
            if let Some((i, x)) = v
                .iter()
                .enumerate()
                .find(|&(_, &x)| !is_representable(dtype, x))
            {
                let x = f64::from(*x);
                return Err(format!("element {i} is {x}, which is not a {dtype} value"));
            }
            v.len()
        }
        Data::Int(v) if dtype.is_integer() => {
            if let Some((i, x)) = v
                .iter()
                .enumerate()
                .find(|&(_, &x)| !int_in_range(dtype, x))
            {
                return Err(format!(
                    "element {i} is {x}, which is out of the {dtype} range"
                ));
            }
            v.len()
        }
        Data::Bool(v) if dtype == DType::Bool => v.len(),
        _ => {
            return Err(format!(
                "{} storage for {dtype} elements",
                storage_name(data)
            ));
        }
    };
    if len != ty.numel() {
        return Err(format!("holds {len} elements instead of {}", ty.numel()));
    }
    Ok(())
}

fn storage_name(data: &Data) -> &'static str {
    match data {
        Data::Float(_) => "float",
        Data::Int(_) => "integer",
        Data::Bool(_) => "bool",
    }
}

/// The constant's values in the node's dtype: floats rounded (through f32) to the dtype,
/// integers truncated toward zero (saturating at the type's bounds), bools `!= 0`.
pub(super) fn constant(at: At<'_>, data: &ConstantData) -> HostTensor {
    let dtype = at.out_dtype();
    let values = data.values.iter().copied();
    let data = match dtype {
        DType::Bool => Data::Bool(values.map(|v| v != 0.0).collect()),
        DType::I32 => Data::Int(values.map(|v| i64::from(v as i32)).collect()),
        DType::I64 => Data::Int(values.map(|v| v as i64).collect()),
        _ => Data::Float(values.map(|v| round_f64(dtype, v)).collect()),
    };
    at.tensor(data)
}
