//! Expressions of the kernel IR as CUDA C++, one function per [`Expr`] variant, and the IR
//! itself in comments (views named by parameter).

use crate::dtype::DType;
use crate::graph::op::Scalar;
use crate::graph::{BinaryOp, CompareOp, ReduceOp, UnaryOp};
use crate::kernel::{Expr, View};

use super::cuda::Emitter;
use super::helpers::{Helper, Helpers};

impl Emitter<'_> {
    // ---- expressions: one function per variant ----

    pub(super) fn expr(&mut self, expr: &Expr) -> String {
        match expr {
            Expr::Load(view) => self.load(view),
            Expr::Constant(c) => constant(*c),
            Expr::Row(r) => row_value(*r),
            Expr::Unary(op, a) => {
                let a = self.expr(a);
                self.unary(*op, a)
            }
            Expr::Binary(op, a, b) => {
                let (a, b) = (self.expr(a), self.expr(b));
                self.binary(*op, a, b)
            }
            Expr::Compare(op, a, b) => {
                let (a, b) = (self.expr(a), self.expr(b));
                compare(*op, a, b)
            }
            Expr::Select(c, a, b) => {
                let (c, a, b) = (self.expr(c), self.expr(a), self.expr(b));
                select(c, a, b)
            }
            Expr::Cast(to, a) => {
                let a = self.expr(a);
                self.cast(*to, a)
            }
        }
    }

    /// `param[address]`: the view's element at the current indices.
    pub(super) fn load(&self, view: &View) -> String {
        let name = &self.canon.params[view.buffer.index()].name;
        let mut address = String::new();
        if view.offset != 0 {
            address = view.offset.to_string();
        }
        let last = self.domain().len().saturating_sub(1);
        for (d, &stride) in view.strides.iter().enumerate() {
            let pinned = self.inner_is_zero && d == last;
            if stride == 0 || pinned || self.domain().get(d).is_none_or(|&n| n <= 1) {
                continue;
            }
            let term = match stride.unsigned_abs() {
                1 => format!("i{d}"),
                s => format!("i{d} * {s}"),
            };
            address = match (address.is_empty(), stride < 0) {
                (true, false) => term,
                (true, true) => format!("-{term}"),
                (false, false) => format!("{address} + {term}"),
                (false, true) => format!("{address} - {term}"),
            };
        }
        if address.is_empty() {
            address.push('0');
        }
        format!("{name}[{address}]")
    }

    fn unary(&mut self, op: UnaryOp, a: String) -> String {
        match op {
            UnaryOp::Neg => format!("(-{a})"),
            UnaryOp::Exp => format!("expf({a})"),
            UnaryOp::Log => format!("logf({a})"),
            UnaryOp::Sqrt => format!("sqrtf({a})"),
            // Correctly rounded like the CPU's 1 / sqrt (rsqrtf is approximate).
            UnaryOp::Rsqrt => format!("(1.0f / sqrtf({a}))"),
            UnaryOp::Recip => format!("(1.0f / {a})"),
            UnaryOp::Abs => format!("fabsf({a})"),
            UnaryOp::Sigmoid => {
                self.helpers.add(Helper::Sigmoid);
                format!("fathom_sigmoid({a})")
            }
        }
    }

    fn binary(&mut self, op: BinaryOp, a: String, b: String) -> String {
        let symbol = match op {
            BinaryOp::Add => "+",
            BinaryOp::Sub => "-",
            BinaryOp::Mul => "*",
            BinaryOp::Div => "/",
            BinaryOp::Max => {
                self.helpers.add(Helper::Max);
                return format!("fathom_max({a}, {b})");
            }
            BinaryOp::Min => {
                self.helpers.add(Helper::Min);
                return format!("fathom_min({a}, {b})");
            }
        };
        format!("({a} {symbol} {b})")
    }

    fn cast(&mut self, to: DType, a: String) -> String {
        let round = |helpers: &mut Helpers, helper, name: &str| {
            helpers.add(helper);
            format!("fathom_round_{name}({a})")
        };
        match to {
            DType::F32 => a,
            DType::I32 | DType::I64 => format!("truncf({a})"),
            DType::Bool => format!("(({a} != 0.0f) ? 1.0f : 0.0f)"),
            DType::BF16 => round(&mut self.helpers, Helper::RoundBf16, "bf16"),
            DType::F16 => round(&mut self.helpers, Helper::RoundF16, "f16"),
            DType::F8E4M3 => round(&mut self.helpers, Helper::RoundE4m3, "e4m3"),
            DType::F8E5M2 => round(&mut self.helpers, Helper::RoundE5m2, "e5m2"),
        }
    }

    // ---- the IR in comments, with parameter names ----

    pub(super) fn describe_view(&self, view: &View) -> String {
        let name = &self.canon.params[view.buffer.index()].name;
        let strides: Vec<String> = view.strides.iter().map(|s| s.to_string()).collect();
        format!("{name}[{}; {}]", view.offset, strides.join(","))
    }

    pub(super) fn describe_store(&self, view: &View, value: &Expr) -> String {
        format!("{} = {}", self.describe_view(view), self.describe(value))
    }

    pub(super) fn describe(&self, expr: &Expr) -> String {
        match expr {
            Expr::Load(view) => self.describe_view(view),
            Expr::Constant(c) => Scalar(*c).to_string(),
            Expr::Row(r) => format!("r{r}"),
            Expr::Unary(op, a) => format!("{}({})", unary_name(*op), self.describe(a)),
            Expr::Binary(op, a, b) => {
                let (a, b) = (self.describe(a), self.describe(b));
                match op {
                    BinaryOp::Add => format!("({a} + {b})"),
                    BinaryOp::Sub => format!("({a} - {b})"),
                    BinaryOp::Mul => format!("({a} * {b})"),
                    BinaryOp::Div => format!("({a} / {b})"),
                    BinaryOp::Max => format!("max({a}, {b})"),
                    BinaryOp::Min => format!("min({a}, {b})"),
                }
            }
            Expr::Compare(op, a, b) => {
                format!(
                    "({} {} {})",
                    self.describe(a),
                    compare_symbol(*op),
                    self.describe(b)
                )
            }
            Expr::Select(c, a, b) => format!(
                "select({}, {}, {})",
                self.describe(c),
                self.describe(a),
                self.describe(b)
            ),
            Expr::Cast(to, a) => format!("cast<{to}>({})", self.describe(a)),
        }
    }
}

fn constant(c: f64) -> String {
    float_literal(c as f32)
}

fn row_value(r: usize) -> String {
    format!("r{r}")
}

fn compare(op: CompareOp, a: String, b: String) -> String {
    format!("(({a} {} {b}) ? 1.0f : 0.0f)", compare_symbol(op))
}

fn select(c: String, a: String, b: String) -> String {
    format!("(({c} != 0.0f) ? {a} : {b})")
}

/// An f32 literal that reads back to exactly `x` (shortest round-trip digits).
pub(super) fn float_literal(x: f32) -> String {
    if x.is_nan() {
        "__uint_as_float(0x7fc00000u)".to_owned()
    } else if x.is_infinite() {
        let sign = if x < 0.0 { "-" } else { "" };
        format!("{sign}__uint_as_float(0x7f800000u)")
    } else {
        format!("{x:?}f")
    }
}

fn compare_symbol(op: CompareOp) -> &'static str {
    match op {
        CompareOp::Eq => "==",
        CompareOp::Lt => "<",
        CompareOp::Le => "<=",
        CompareOp::Gt => ">",
        CompareOp::Ge => ">=",
    }
}

fn unary_name(op: UnaryOp) -> &'static str {
    crate::graph::Op::Unary(op).name()
}

pub(super) fn reduce_name(op: ReduceOp) -> &'static str {
    match op {
        ReduceOp::Sum => "sum",
        ReduceOp::Mean => "mean",
        ReduceOp::Max => "max",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_literals_round_trip() {
        assert_eq!(float_literal(1.0), "1.0f");
        assert_eq!(float_literal(1e-6), "1e-6f");
        assert_eq!(float_literal(-f32::MAX), "-3.4028235e38f");
        assert_eq!(
            float_literal(f32::NEG_INFINITY),
            "-__uint_as_float(0x7f800000u)"
        );
        assert_eq!(float_literal(f32::NAN), "__uint_as_float(0x7fc00000u)");
    }
}
