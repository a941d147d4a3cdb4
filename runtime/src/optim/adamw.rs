//! AdamW with decoupled weight decay (Loshchilov & Hutter), computed as `torch.optim.AdamW`
//! computes it, over FP32 master weights with FP32 or BF16 moments (DeepSeek-V3 keeps them in
//! BF16, SPEC §2).
//!
//! An optimizer may hold the state of only a contiguous range of a parameter's elements: a
//! shard of a ZeRO-1 optimizer ([`super::ShardedAdamW`]). The update is element-wise, so the
//! shards together compute exactly what one whole optimizer computes.

use std::collections::BTreeMap;
use std::ops::Range;

use fathom_compiler::DType;
use half::bf16;
use rayon::prelude::*;

use super::{AdamWConfig, Grads, MomentPrecision, OptimError, ParamStore, decays, non_negative};
use crate::tensor::{Data, HostTensor};

/// Name of the step-count state tensor (an i64 scalar).
const STEP: &str = "adamw.step";
/// Prefix of the first-moment state tensors, followed by the parameter name.
const M_PREFIX: &str = "adamw.m.";
/// Prefix of the second-moment state tensors.
const V_PREFIX: &str = "adamw.v.";

/// A moment element type: loads to f32, stores from f32.
trait Moment: Copy {
    fn load(self) -> f32;
    fn store(x: f32) -> Self;
}

impl Moment for f32 {
    fn load(self) -> f32 {
        self
    }
    fn store(x: f32) -> Self {
        x
    }
}

impl Moment for bf16 {
    fn load(self) -> f32 {
        self.to_f32()
    }
    /// Round to nearest, ties to even (NaN stays NaN).
    fn store(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Moments {
    F32 { m: Vec<f32>, v: Vec<f32> },
    Bf16 { m: Vec<bf16>, v: Vec<bf16> },
}

impl Moments {
    fn new(precision: MomentPrecision, m: Vec<f32>, v: Vec<f32>) -> Self {
        match precision {
            MomentPrecision::F32 => Moments::F32 { m, v },
            MomentPrecision::Bf16 => Moments::Bf16 {
                m: m.into_iter().map(bf16::from_f32).collect(),
                v: v.into_iter().map(bf16::from_f32).collect(),
            },
        }
    }

    /// The moments as exact f32 values.
    fn to_f32(&self) -> (Vec<f32>, Vec<f32>) {
        match self {
            Moments::F32 { m, v } => (m.clone(), v.clone()),
            Moments::Bf16 { m, v } => (
                m.iter().map(|x| x.to_f32()).collect(),
                v.iter().map(|x| x.to_f32()).collect(),
            ),
        }
    }
}

/// One trainable parameter's state, for the elements `range` of it (all of them, unless the
/// optimizer is a shard).
#[derive(Clone, Debug, PartialEq)]
struct Slot {
    dims: Vec<usize>,
    range: Range<usize>,
    moments: Moments,
}

impl Slot {
    /// The state of the elements `start..start + m.len()` of a parameter of shape `dims`.
    fn new(
        dims: Vec<usize>,
        start: usize,
        precision: MomentPrecision,
        m: Vec<f32>,
        v: Vec<f32>,
    ) -> Self {
        Slot {
            dims,
            range: start..start + m.len(),
            moments: Moments::new(precision, m, v),
        }
    }

    fn numel(&self) -> usize {
        self.dims.iter().product()
    }
}

/// The moments of a range of one parameter's elements, exact in f32: what a shard of a
/// sharded optimizer holds, sends and receives.
#[derive(Clone, Debug, PartialEq)]
pub struct MomentPart {
    pub param: String,
    /// The whole parameter's shape.
    pub dims: Vec<usize>,
    /// The elements (of the flattened parameter) the moments are of.
    pub range: Range<usize>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// The per-step f32 scalars of an update, rounded from f64 as PyTorch rounds its Python-float
/// scalars: what the host's loop reads and what a device kernel must be given to compute the
/// same bits (`fathom_kernels::optimizer`, its `ADAMW_SCALARS` in this order).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UpdateScalars {
    /// `1 - lr * wd`, for the parameters that decay.
    pub decay: f32,
    /// `1 - beta1`, the weight of `lerp(m, g, 1 - beta1)`.
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bc2_sqrt: f32,
    pub eps: f32,
    /// `-lr / (1 - beta1^t)`.
    pub neg_step_size: f32,
}

impl UpdateScalars {
    /// The scalars of step `t` (counted from 1) at learning rate `lr`.
    pub fn for_step(c: &AdamWConfig, t: u64, lr: f64) -> Self {
        let t = t as f64;
        UpdateScalars {
            decay: (1.0 - lr * c.weight_decay) as f32,
            one_minus_beta1: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            one_minus_beta2: (1.0 - c.beta2) as f32,
            bc2_sqrt: (1.0 - c.beta2.powf(t)).sqrt() as f32,
            eps: c.eps as f32,
            neg_step_size: (-(lr / (1.0 - c.beta1.powf(t)))) as f32,
        }
    }

    /// In the device kernel's order (`fathom_kernels::optimizer::ADAMW_SCALARS`).
    pub fn in_kernel_order(&self) -> [f32; 7] {
        [
            self.decay,
            self.one_minus_beta1,
            self.beta2,
            self.one_minus_beta2,
            self.bc2_sqrt,
            self.eps,
            self.neg_step_size,
        ]
    }
}

/// One element-wise AdamW update, with the f32 operations of PyTorch's single-tensor AdamW on
/// CPU (which it matches bit for bit):
/// `p *= 1 - lr·wd; m = lerp(m, g, 1 - β1); v = v·β2 + (1 - β2)·g·g;
/// p += (-lr/(1 - β1^t) · m) / (sqrt(v)/sqrt(1 - β2^t) + eps)`, where `lerp` is ATen's
/// `fma(w, g - m, m)`. Mathematically this is `p -= lr·wd·p; p -= lr·m̂/(sqrt(v̂) + eps)`.
/// The parameter update uses the f32 moments before they are stored (rounded, for bf16), as a
/// fused kernel holding them in registers does.
///
/// Elements are independent, so chunks of them run on rayon's threads (the result does not
/// depend on how they are split).
fn update<M: Moment + Send>(
    p: &mut [f32],
    g: &[f32],
    m: &mut [M],
    v: &mut [M],
    s: &UpdateScalars,
    decay: bool,
) {
    const CHUNK: usize = 1 << 14;
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| update_serial(p, g, m, v, s, decay));
}

/// The update [`AdamW::step`] makes of elements with f32 moments: what the device's
/// `adamw_update_f32` kernels are held to (an emulator of the device optimizer runs it).
pub fn update_with_f32_moments(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    s: &UpdateScalars,
    decay: bool,
) {
    update(p, g, m, v, s, decay);
}

/// [`update_with_f32_moments`] with bf16 moments (`adamw_update_bf16` on the device).
pub fn update_with_bf16_moments(
    p: &mut [f32],
    g: &[f32],
    m: &mut [bf16],
    v: &mut [bf16],
    s: &UpdateScalars,
    decay: bool,
) {
    update(p, g, m, v, s, decay);
}

/// [`update_elements`] with the CPU's fused multiply-add instruction where it has one
/// (`crate::fma`: the same bits as the `fmaf` call `mul_add` is otherwise, which also kept the
/// loop from being vectorised).
fn update_serial<M: Moment>(
    p: &mut [f32],
    g: &[f32],
    m: &mut [M],
    v: &mut [M],
    s: &UpdateScalars,
    decay: bool,
) {
    crate::fma::with_fma(
        #[inline(always)]
        || update_elements(p, g, m, v, s, decay),
    )
}

#[inline(always)]
fn update_elements<M: Moment>(
    p: &mut [f32],
    g: &[f32],
    m: &mut [M],
    v: &mut [M],
    s: &UpdateScalars,
    decay: bool,
) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        if decay {
            *p *= s.decay;
        }
        let m0 = m.load();
        let m1 = s.one_minus_beta1.mul_add(g - m0, m0);
        let v1 = v.load() * s.beta2 + s.one_minus_beta2 * g * g;
        let denom = v1.sqrt() / s.bc2_sqrt + s.eps;
        *p += (s.neg_step_size * m1) / denom;
        *m = M::store(m1);
        *v = M::store(v1);
    }
}

/// AdamW over a fixed set of trainable parameters, with a global step count: every trainable
/// parameter must get a gradient at every step (a zero one when it took no part, e.g. an
/// expert no token chose, which still decays its weight and moments, as in PyTorch with a zero
/// gradient). Parameters left out at construction (buffers, the balancing bias) are never
/// touched.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    config: AdamWConfig,
    step: u64,
    slots: BTreeMap<String, Slot>,
}

impl AdamW {
    /// An optimiser at step 0 for the given trainable parameters (f32 tensors; their shapes
    /// fix the moments'), with zero moments. Pass e.g.
    /// `weights.iter().filter(|(n, _)| !is_balancing_bias(n))`.
    pub fn new<'a>(
        config: AdamWConfig,
        params: impl IntoIterator<Item = (&'a str, &'a HostTensor)>,
    ) -> Result<Self, OptimError> {
        config.validate()?;
        let mut slots = BTreeMap::new();
        for (name, tensor) in params {
            let n = f32_values(name, tensor)?.len();
            let slot = Slot::new(
                tensor.dims().to_vec(),
                0,
                config.moments,
                vec![0.0; n],
                vec![0.0; n],
            );
            if slots.insert(name.to_owned(), slot).is_some() {
                return Err(OptimError::DuplicateParameter {
                    param: name.to_owned(),
                });
            }
        }
        Ok(AdamW {
            config,
            step: 0,
            slots,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The number of steps taken (the `t` of the last bias correction).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The trainable parameters, in name order.
    pub fn trainable(&self) -> impl Iterator<Item = &str> + '_ {
        self.slots.keys().map(String::as_str)
    }

    /// Checks that every trainable parameter is in `params`, f32, with the shape of its state
    /// (e.g. after [`AdamW::from_state`]). [`AdamW::step`] checks this too.
    pub fn check_params(&self, params: &impl ParamStore) -> Result<(), OptimError> {
        for (name, slot) in &self.slots {
            let tensor = params
                .param(name)
                .ok_or_else(|| OptimError::MissingParameter {
                    param: name.clone(),
                })?;
            f32_values(name, tensor)?;
            if tensor.dims() != slot.dims.as_slice() {
                return Err(OptimError::BadParameter {
                    param: name.clone(),
                    detail: format!(
                        "shape {:?} differs from its optimizer state's {:?}",
                        tensor.dims(),
                        slot.dims
                    ),
                });
            }
        }
        Ok(())
    }

    /// One AdamW step at learning rate `lr` (finite, `>= 0`) for every trainable parameter,
    /// in name order. `grads` must hold exactly the trainable parameters, each with as many
    /// values as the parameter. Everything is checked before anything changes, so on error the
    /// parameters and the state are as they were.
    pub fn step(
        &mut self,
        params: &mut impl ParamStore,
        grads: &Grads,
        lr: f64,
    ) -> Result<(), OptimError> {
        if let Some(name) = grads.keys().find(|n| !self.slots.contains_key(*n)) {
            return Err(OptimError::UnexpectedGradient {
                param: name.clone(),
            });
        }
        self.step_held(params, grads, lr)
    }

    /// [`AdamW::step`] for the elements this optimizer holds, where `grads` may also hold
    /// gradients of parameters it has no state for (those of other shards), which it leaves
    /// alone. Each gradient still has as many values as its whole parameter.
    pub fn step_held(
        &mut self,
        params: &mut impl ParamStore,
        grads: &Grads,
        lr: f64,
    ) -> Result<(), OptimError> {
        non_negative("lr", lr)?;
        self.check_params(params)?;
        for (name, slot) in &self.slots {
            let grad = grads.get(name).ok_or_else(|| OptimError::MissingGradient {
                param: name.clone(),
            })?;
            if grad.len() != slot.numel() {
                return Err(OptimError::GradientLength {
                    param: name.clone(),
                    expected: slot.numel(),
                    found: grad.len(),
                });
            }
        }

        let scalars = self.update_scalars(lr);
        for (name, slot) in &mut self.slots {
            let grad = &grads[name][slot.range.clone()];
            let decay = decays(name, &slot.dims);
            let range = slot.range.clone();
            params.update_param(name, |tensor| {
                if let Data::Float(p) = &mut tensor.data {
                    let p = &mut p[range];
                    match &mut slot.moments {
                        Moments::F32 { m, v } => update(p, grad, m, v, &scalars, decay),
                        Moments::Bf16 { m, v } => update(p, grad, m, v, &scalars, decay),
                    }
                }
            });
        }
        self.step += 1;
        Ok(())
    }

    /// The scalars the next step computes with at learning rate `lr` (what a device kernel
    /// must be given to update as [`AdamW::step`] does).
    pub fn update_scalars(&self, lr: f64) -> UpdateScalars {
        UpdateScalars::for_step(&self.config, self.step + 1, lr)
    }

    /// Bytes of moments held (both of them, at their precision).
    pub fn state_bytes(&self) -> u64 {
        let per_element = 2 * self.config.moments.bytes();
        self.slots
            .values()
            .map(|s| (s.range.len() * per_element) as u64)
            .sum()
    }

    /// Whether every slot holds its whole parameter (not a shard's range of it).
    pub fn is_whole(&self) -> bool {
        self.slots.values().all(|s| s.range == (0..s.numel()))
    }

    /// The moments held, one part per parameter, in name order.
    pub fn parts(&self) -> Vec<MomentPart> {
        self.slots
            .iter()
            .map(|(name, slot)| {
                let (m, v) = slot.moments.to_f32();
                MomentPart {
                    param: name.clone(),
                    dims: slot.dims.clone(),
                    range: slot.range.clone(),
                    m,
                    v,
                }
            })
            .collect()
    }

    /// An optimizer at step `step` holding `parts`: the parts of one parameter (in any order)
    /// must be adjacent ranges of it, which are joined; a parameter may be covered only in
    /// part (a shard). Refuses, naming the parameter, parts of different shapes, overlapping
    /// or gapped ranges, ranges outside the parameter, and moments of the wrong length.
    pub fn from_parts(
        config: AdamWConfig,
        step: u64,
        parts: impl IntoIterator<Item = MomentPart>,
    ) -> Result<Self, OptimError> {
        config.validate()?;
        let mut by_param: BTreeMap<String, Vec<MomentPart>> = BTreeMap::new();
        for part in parts {
            by_param.entry(part.param.clone()).or_default().push(part);
        }
        let mut slots = BTreeMap::new();
        for (param, mut parts) in by_param {
            parts.sort_by_key(|p| p.range.start);
            let bad = |detail: String| OptimError::BadState {
                tensor: format!("{M_PREFIX}{param}"),
                detail,
            };
            let dims = parts[0].dims.clone();
            let numel: usize = dims.iter().product();
            let start = parts[0].range.start;
            let (mut m, mut v) = (Vec::new(), Vec::new());
            for part in parts {
                let expected_start = start + m.len();
                if part.dims != dims
                    || part.range.start != expected_start
                    || part.range.end > numel
                    || part.m.len() != part.range.len()
                    || part.v.len() != part.range.len()
                {
                    return Err(bad(format!(
                        "the part of elements {:?} (shape {:?}, {} and {} moments) does not \
                         continue elements {start}..{expected_start} of shape {dims:?}",
                        part.range,
                        part.dims,
                        part.m.len(),
                        part.v.len()
                    )));
                }
                m.extend(part.m);
                v.extend(part.v);
            }
            slots.insert(param, Slot::new(dims, start, config.moments, m, v));
        }
        Ok(AdamW {
            config,
            step,
            slots,
        })
    }

    /// The state to checkpoint, in name order: `adamw.m.<param>` and `adamw.v.<param>` (f32
    /// tensors of the parameter's shape; bf16 moments are exact in f32) and `adamw.step` (an
    /// i64 scalar). [`AdamW::from_state`] restores it bit-exactly. Meant for a whole optimizer
    /// ([`AdamW::is_whole`]; join shards with [`AdamW::from_parts`] first): a shard's moments
    /// would not fill the parameter's shape.
    pub fn state_tensors(&self) -> Vec<(String, HostTensor)> {
        let mut ms = Vec::with_capacity(self.slots.len());
        let mut vs = Vec::with_capacity(self.slots.len());
        for (name, slot) in &self.slots {
            let (m, v) = slot.moments.to_f32();
            ms.push((
                format!("{M_PREFIX}{name}"),
                HostTensor::f32(slot.dims.clone(), m),
            ));
            vs.push((
                format!("{V_PREFIX}{name}"),
                HostTensor::f32(slot.dims.clone(), v),
            ));
        }
        let step = i64::try_from(self.step).unwrap_or(i64::MAX);
        ms.push((STEP.to_owned(), HostTensor::i64(Vec::new(), vec![step])));
        ms.extend(vs);
        ms
    }

    /// Restores an optimiser from [`AdamW::state_tensors`] (in any order, e.g. as loaded from a
    /// checkpoint). The trainable parameters are those with moments. Refuses, naming the
    /// tensor: a missing `adamw.step` or a moment without its partner; a tensor of another
    /// name; a step that is not a non-negative i64 scalar; moments that are not f32, disagree
    /// in shape, or (with bf16 `config.moments`) are not exactly representable in bf16.
    pub fn from_state(
        config: AdamWConfig,
        tensors: impl IntoIterator<Item = (String, HostTensor)>,
    ) -> Result<Self, OptimError> {
        config.validate()?;
        let mut step = None;
        let mut pairs: BTreeMap<String, [Option<Loaded>; 2]> = BTreeMap::new();
        for (name, tensor) in tensors {
            let bad = |detail: &str| OptimError::BadState {
                tensor: name.clone(),
                detail: detail.to_owned(),
            };
            let (param, which) = if name == STEP {
                if step.is_some() {
                    return Err(bad("given twice"));
                }
                match (tensor.dims(), tensor.as_i64()) {
                    ([], Some(&[s])) if s >= 0 => step = Some(s.unsigned_abs()),
                    _ => return Err(bad("must be a non-negative i64 scalar")),
                }
                continue;
            } else if let Some(param) = name.strip_prefix(M_PREFIX) {
                (param, 0)
            } else if let Some(param) = name.strip_prefix(V_PREFIX) {
                (param, 1)
            } else {
                return Err(bad("not an AdamW state tensor"));
            };
            let values = f32_values(&name, &tensor).map_err(|_| bad("must be an f32 tensor"))?;
            if config.moments == MomentPrecision::Bf16
                && values
                    .iter()
                    .any(|&x| !x.is_nan() && bf16::from_f32(x).to_f32().to_bits() != x.to_bits())
            {
                return Err(bad("holds values not representable in bf16"));
            }
            let dims = tensor.dims().to_vec();
            let Data::Float(values) = tensor.data else {
                return Err(bad("must be an f32 tensor"));
            };
            let slot = &mut pairs.entry(param.to_owned()).or_default()[which];
            if slot.replace((dims, values)).is_some() {
                return Err(bad("given twice"));
            }
        }
        let step = step.ok_or_else(|| OptimError::MissingState {
            tensor: STEP.to_owned(),
        })?;
        let mut slots = BTreeMap::new();
        for (param, [m, v]) in pairs {
            let missing = |prefix: &str| OptimError::MissingState {
                tensor: format!("{prefix}{param}"),
            };
            let (dims, m) = m.ok_or_else(|| missing(M_PREFIX))?;
            let (v_dims, v) = v.ok_or_else(|| missing(V_PREFIX))?;
            if dims != v_dims {
                return Err(OptimError::BadState {
                    tensor: format!("{V_PREFIX}{param}"),
                    detail: format!("shape {v_dims:?} differs from the first moment's {dims:?}"),
                });
            }
            slots.insert(param, Slot::new(dims, 0, config.moments, m, v));
        }
        Ok(AdamW {
            config,
            step,
            slots,
        })
    }
}

/// A loaded moment: its shape and values.
type Loaded = (Vec<usize>, Vec<f32>);

/// The values of an f32 tensor whose data fills its type, or an error naming the parameter.
fn f32_values<'t>(name: &str, tensor: &'t HostTensor) -> Result<&'t [f32], OptimError> {
    let detail = match &tensor.data {
        Data::Float(v) if tensor.ty.dtype == DType::F32 && v.len() == tensor.ty.numel() => {
            return Ok(v);
        }
        Data::Float(v) if tensor.ty.dtype == DType::F32 => {
            format!("holds {} values for {}", v.len(), tensor.ty)
        }
        _ => format!("is {}; master weights must be f32", tensor.ty),
    };
    Err(OptimError::BadParameter {
        param: name.to_owned(),
        detail,
    })
}

#[cfg(test)]
#[path = "adamw_tests.rs"]
mod tests;
