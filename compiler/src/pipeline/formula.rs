//! Table 2 of the DeepSeek-V3 report: bubble, parameters and activations per method.

use super::schedule::Method;
use super::simulate::Costs;

/// One row of Table 2, evaluated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Table2 {
    /// Pipeline bubble, in the units of the costs.
    pub bubble: f64,
    /// Parameter copies per device, in units of one stage's parameters.
    pub parameter_copies: usize,
    /// Peak activations per device, in units of one micro-batch's activations on one stage.
    pub activations: usize,
}

/// The Table 2 row of `method` with `pp` pipeline stages. F is `costs.f`, B the full backward
/// `costs.b`, W its weight part `costs.w`, F&B the overlapped pair `costs.f_and_b`.
pub fn table2(method: Method, pp: usize, costs: &Costs) -> Table2 {
    let stages = pp as f64;
    let Costs {
        f, b, w, f_and_b, ..
    } = *costs;
    match method {
        Method::OneFOneB => Table2 {
            bubble: (stages - 1.0) * (f + b),
            parameter_copies: 1,
            activations: pp,
        },
        Method::Zb1p => Table2 {
            bubble: (stages - 1.0) * (f + b - 2.0 * w),
            parameter_copies: 1,
            activations: pp,
        },
        Method::DualPipe | Method::DualPipeV => Table2 {
            bubble: (stages / 2.0 - 1.0) * (f_and_b + b - 3.0 * w),
            parameter_copies: 2,
            activations: pp + 1,
        },
    }
}

/// The formula as text, for printing beside its value.
pub fn bubble_formula(method: Method) -> &'static str {
    match method {
        Method::OneFOneB => "(PP-1)(F+B)",
        Method::Zb1p => "(PP-1)(F+B-2W)",
        Method::DualPipe | Method::DualPipeV => "(PP/2-1)(F&B+B-3W)",
    }
}

/// The activations entry as text.
pub fn activations_formula(method: Method) -> &'static str {
    match method {
        Method::OneFOneB | Method::Zb1p => "PP",
        Method::DualPipe | Method::DualPipeV => "PP+1",
    }
}
