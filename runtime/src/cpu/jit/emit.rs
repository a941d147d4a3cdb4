//! Expressions of the kernel IR as cranelift instructions, on one f32 or on four lanes.
//!
//! Each operation is the reference's (`loops::unary`, `binary`, `compare`, the casts of
//! `loops::eval`) as an IEEE instruction with the same rounding, so results agree bit for bit;
//! what has no instruction calls the reference's own Rust function, lane by lane.

use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{Endianness, InstBuilder, MemFlagsData, Value, types};
use fathom_compiler::DType;
use fathom_compiler::graph::{BinaryOp, CompareOp, UnaryOp};
use fathom_compiler::kernel::{Expr, View};

use super::codegen::{Emitter, Index, Lanes, memflags};
use super::intrinsics::Intrinsic;
use crate::cpu::expf;

impl<'n> Emitter<'_, 'n> {
    /// `expr` at inner index `j` (lanes `j..j + 4` for four lanes).
    pub(super) fn expr(&mut self, expr: &'n Expr, lanes: Lanes, j: Index) -> Value {
        if let Some(&(scalar, splat)) = self.hoisted.get(&(expr as *const Expr)) {
            return match (lanes, splat) {
                (Lanes::One, _) => scalar,
                (Lanes::Four, Some(splat)) => splat,
                (Lanes::Four, None) => self.b.ins().splat(types::F32X4, scalar),
            };
        }
        match expr {
            Expr::Load(view) => self.load(view, lanes, j),
            Expr::Constant(c) => self.constant(*c as f32, lanes),
            Expr::Row(r) => {
                let value = *self
                    .rows
                    .get(r)
                    .expect("`plan` checked rows are reduced before use");
                self.widen(value, lanes)
            }
            Expr::Unary(op, a) => {
                let x = self.expr(a, lanes, j);
                self.unary(*op, x, lanes)
            }
            Expr::Binary(op, a, b) => {
                let x = self.expr(a, lanes, j);
                let y = self.expr(b, lanes, j);
                self.binary(*op, x, y, lanes)
            }
            Expr::Compare(op, a, b) => {
                let x = self.expr(a, lanes, j);
                let y = self.expr(b, lanes, j);
                let holds = self.b.ins().fcmp(float_cc(*op), x, y);
                self.unit(holds, lanes)
            }
            Expr::Select(c, a, b) => {
                let c = self.expr(c, lanes, j);
                let x = self.expr(a, lanes, j);
                let y = self.expr(b, lanes, j);
                // `c != 0`, true for NaN as in the reference (`if c == 0.0 { y } else { x }`).
                let zero = self.constant(0.0, lanes);
                let nonzero = self.b.ins().fcmp(FloatCC::NotEqual, c, zero);
                match lanes {
                    Lanes::One => self.b.ins().select(nonzero, x, y),
                    Lanes::Four => {
                        let mask = self.b.ins().bitcast(types::F32X4, little_endian(), nonzero);
                        self.b.ins().bitselect(mask, x, y)
                    }
                }
            }
            Expr::Cast(to, a) => {
                let x = self.expr(a, lanes, j);
                self.cast(*to, x, lanes)
            }
        }
    }

    fn load(&mut self, view: &'n View, lanes: Lanes, j: Index) -> Value {
        if let Some(&v) = self.loads.get(view) {
            return v;
        }
        let stride = self.plan.inner_stride(view);
        let v = if lanes == Lanes::Four && stride == 0 {
            // Normally hoisted before the loop; kept correct if it is not.
            let (address, offset) = self.address(view, Index::Fixed(0));
            let x = self
                .b
                .ins()
                .load(types::F32, memflags(Lanes::One), address, offset);
            self.b.ins().splat(types::F32X4, x)
        } else {
            debug_assert!(
                lanes == Lanes::One || stride == 1,
                "four lanes need contiguous loads"
            );
            let (address, offset) = self.address(view, j);
            let ty = Self::float_type(lanes);
            self.b.ins().load(ty, memflags(lanes), address, offset)
        };
        self.loads.insert(view, v);
        v
    }

    fn constant(&mut self, c: f32, lanes: Lanes) -> Value {
        let x = self.b.ins().f32const(c);
        self.widen(x, lanes)
    }

    /// A 32-bit integer constant (bits to operate on), splat for four lanes.
    fn int_constant(&mut self, c: u32, lanes: Lanes) -> Value {
        let x = self.b.ins().iconst(types::I32, i64::from(c));
        match lanes {
            Lanes::One => x,
            Lanes::Four => self.b.ins().splat(types::I32X4, x),
        }
    }

    /// A scalar as the value of one evaluation (splat for four lanes).
    fn widen(&mut self, x: Value, lanes: Lanes) -> Value {
        match lanes {
            Lanes::One => x,
            Lanes::Four => self.b.ins().splat(types::F32X4, x),
        }
    }

    fn unary(&mut self, op: UnaryOp, x: Value, lanes: Lanes) -> Value {
        // Four lanes of exp (and of the sigmoid built on it) run inline; one lane calls the
        // same function through the intrinsic (the scalar tails are short).
        match (op, lanes) {
            (UnaryOp::Exp, Lanes::Four) => return self.exp4(x),
            (UnaryOp::Sigmoid, Lanes::Four) => return self.sigmoid4(x),
            _ => {}
        }
        if let Some(intrinsic) = Intrinsic::for_unary(op) {
            return self.call(intrinsic, x, lanes);
        }
        match op {
            UnaryOp::Neg => self.b.ins().fneg(x),
            UnaryOp::Abs => self.b.ins().fabs(x),
            UnaryOp::Sqrt => self.b.ins().sqrt(x),
            UnaryOp::Rsqrt => {
                // 1 / sqrt(x), two roundings like the reference (not an approximate rsqrt).
                let root = self.b.ins().sqrt(x);
                let one = self.constant(1.0, lanes);
                self.b.ins().fdiv(one, root)
            }
            UnaryOp::Recip => {
                let one = self.constant(1.0, lanes);
                self.b.ins().fdiv(one, x)
            }
            UnaryOp::Exp | UnaryOp::Log | UnaryOp::Sigmoid => unreachable!("an intrinsic"),
        }
    }

    fn binary(&mut self, op: BinaryOp, x: Value, y: Value, lanes: Lanes) -> Value {
        match op {
            BinaryOp::Add => self.b.ins().fadd(x, y),
            BinaryOp::Sub => self.b.ins().fsub(x, y),
            BinaryOp::Mul => self.b.ins().fmul(x, y),
            BinaryOp::Div => self.b.ins().fdiv(x, y),
            BinaryOp::Max | BinaryOp::Min => {
                // The reference: NaN if either is NaN, else `x.max(y)` / `x.min(y)`, which
                // keep `x` when the two compare equal (so max(-0, +0) is -0).
                let cc = if op == BinaryOp::Max {
                    FloatCC::LessThan
                } else {
                    FloatCC::GreaterThan
                };
                let take_y = self.b.ins().fcmp(cc, x, y);
                let either_nan = self.b.ins().fcmp(FloatCC::Unordered, x, y);
                let nan = self.constant(f32::NAN, lanes);
                match lanes {
                    Lanes::One => {
                        let ordered = self.b.ins().select(take_y, y, x);
                        self.b.ins().select(either_nan, nan, ordered)
                    }
                    Lanes::Four => {
                        let take_y = self.b.ins().bitcast(types::F32X4, little_endian(), take_y);
                        let either_nan =
                            self.b
                                .ins()
                                .bitcast(types::F32X4, little_endian(), either_nan);
                        let ordered = self.b.ins().bitselect(take_y, y, x);
                        self.b.ins().bitselect(either_nan, nan, ordered)
                    }
                }
            }
        }
    }

    fn cast(&mut self, to: DType, x: Value, lanes: Lanes) -> Value {
        match to {
            DType::F32 => x,
            DType::I32 | DType::I64 => self.b.ins().trunc(x),
            DType::Bool => {
                // `x != 0`, true for NaN as in the reference.
                let zero = self.constant(0.0, lanes);
                let nonzero = self.b.ins().fcmp(FloatCC::NotEqual, x, zero);
                self.unit(nonzero, lanes)
            }
            DType::BF16 => self.round_bf16(x, lanes),
            DType::F16 | DType::F8E4M3 | DType::F8E5M2 => self.call(Intrinsic::Round(to), x, lanes),
        }
    }

    /// Rounds to bf16 (nearest, ties to even) and back to f32 on the bits, as
    /// `half::bf16::from_f32(x).to_f32()` does: add `0x7FFF` plus the lowest kept bit and clear
    /// the 16 dropped bits (a carry out of the mantissa lands on the next binade, or on
    /// infinity from the largest finite values); a NaN keeps its sign and upper payload and is
    /// made quiet. Inline rather than a call per lane: under the bf16 policy every matmul
    /// operand passes through such a cast.
    fn round_bf16(&mut self, x: Value, lanes: Lanes) -> Value {
        let (int, flags) = match lanes {
            Lanes::One => (types::I32, MemFlagsData::new()),
            Lanes::Four => (types::I32X4, little_endian()),
        };
        let bits = self.b.ins().bitcast(int, flags, x);
        let sixteen = self.b.ins().iconst(types::I32, 16);
        let kept_lsb = self.b.ins().ushr(bits, sixteen);
        let one = self.int_constant(1, lanes);
        let kept_lsb = self.b.ins().band(kept_lsb, one);
        let half_minus_one = self.int_constant(0x7FFF, lanes);
        let biased = self.b.ins().iadd(bits, half_minus_one);
        let biased = self.b.ins().iadd(biased, kept_lsb);
        let upper = self.int_constant(0xFFFF_0000, lanes);
        let rounded = self.b.ins().band(biased, upper);
        let quiet_bit = self.int_constant(0x0040_0000, lanes);
        let quiet = self.b.ins().bor(bits, quiet_bit);
        let quiet = self.b.ins().band(quiet, upper);
        let nan = self.b.ins().fcmp(FloatCC::Unordered, x, x);
        let result = match lanes {
            Lanes::One => self.b.ins().select(nan, quiet, rounded),
            Lanes::Four => self.b.ins().bitselect(nan, quiet, rounded),
        };
        let float = Self::float_type(lanes);
        self.b.ins().bitcast(float, flags, result)
    }

    /// A comparison's result as 1.0 / 0.0.
    fn unit(&mut self, holds: Value, lanes: Lanes) -> Value {
        match lanes {
            Lanes::One => {
                let one = self.b.ins().f32const(1.0);
                let zero = self.b.ins().f32const(0.0);
                self.b.ins().select(holds, one, zero)
            }
            Lanes::Four => {
                // The all-ones lanes of the mask ANDed with the bits of 1.0.
                let ones = self.int_constant(1.0f32.to_bits(), lanes);
                let masked = self.b.ins().band(holds, ones);
                self.b.ins().bitcast(types::F32X4, little_endian(), masked)
            }
        }
    }

    /// `e^x` on four lanes: [`expf::exp`]'s operations in its order, so the lanes agree bit
    /// for bit with the reference (which calls `expf::exp`).
    fn exp4(&mut self, x: Value) -> Value {
        let four = Lanes::Four;
        // Lanes below ZERO_BELOW give 0 at the end and compute from 0 meanwhile (computing
        // from them would underflow, which is slow); x > high ? high : x; NaN compares false
        // and runs through as NaN.
        let low = self.constant(expf::ZERO_BELOW, four);
        let zero = self.constant(0.0, four);
        let below = self.b.ins().fcmp(FloatCC::LessThan, x, low);
        // Four lanes all below (the masked half of a causal softmax row, in long runs) skip
        // the polynomial.
        let all_below = self.b.ins().vall_true(below);
        let compute = self.b.create_block();
        let done = self.b.create_block();
        let result = self.b.append_block_param(done, types::F32X4);
        self.b
            .ins()
            .brif(all_below, done, &[zero.into()], compute, &[]);
        self.b.switch_to_block(compute);
        let high = self.constant(expf::CLAMP_HIGH, four);
        let below = self.b.ins().bitcast(types::F32X4, little_endian(), below);
        let x = self.b.ins().bitselect(below, zero, x);
        let above = self.b.ins().fcmp(FloatCC::GreaterThan, x, high);
        let above = self.b.ins().bitcast(types::F32X4, little_endian(), above);
        let x = self.b.ins().bitselect(above, high, x);
        let log2e = self.constant(expf::LOG2E, four);
        let t = self.b.ins().fmul(x, log2e);
        let rounder = self.constant(expf::ROUNDER, four);
        let shifted = self.b.ins().fadd(t, rounder);
        let n = self.b.ins().fsub(shifted, rounder);
        let c1 = self.constant(expf::C1, four);
        let c2 = self.constant(expf::C2, four);
        let minus_n = self.b.ins().fneg(n);
        let a = self.b.ins().fma(minus_n, c1, x);
        let r = self.b.ins().fma(minus_n, c2, a);
        let z = self.b.ins().fmul(r, r);
        let mut y = self.constant(expf::P[0], four);
        for &p in &expf::P[1..] {
            let p = self.constant(p, four);
            y = self.b.ins().fma(y, r, p);
        }
        let yz_r = self.b.ins().fma(y, z, r);
        let one = self.constant(1.0, four);
        let y = self.b.ins().fadd(yz_r, one);
        // 2^n as 2^⌊n/2⌋ · 2^(n-⌊n/2⌋), each built from its exponent bits; n is the low bits
        // of `shifted` less those of the rounder.
        let bits = self.b.ins().bitcast(types::I32X4, little_endian(), shifted);
        let rounder_bits = self.int_constant(expf::ROUNDER.to_bits(), Lanes::Four);
        let n = self.b.ins().isub(bits, rounder_bits);
        let one_bit = self.b.ins().iconst(types::I32, 1);
        let half = self.b.ins().sshr(n, one_bit);
        let rest = self.b.ins().isub(n, half);
        let s1 = self.pow2x4(half);
        let s2 = self.pow2x4(rest);
        let y = self.b.ins().fmul(y, s1);
        let y = self.b.ins().fmul(y, s2);
        let y = self.b.ins().bitselect(below, zero, y);
        self.b.ins().jump(done, &[y.into()]);
        self.b.switch_to_block(done);
        result
    }

    /// 2^e for four normal exponents (I32X4) as an F32X4.
    fn pow2x4(&mut self, e: Value) -> Value {
        let bias = self.int_constant(127, Lanes::Four);
        let biased = self.b.ins().iadd(e, bias);
        let shift = self.b.ins().iconst(types::I32, 23);
        let bits = self.b.ins().ishl(biased, shift);
        self.b.ins().bitcast(types::F32X4, little_endian(), bits)
    }

    /// The reference's sigmoid on four lanes: `1 / (1 + e^-x)` where `x >= 0`, else
    /// `e^x / (1 + e^x)`; both from `t = e^-|x|` (which is `e^-x`, resp. `e^x`).
    fn sigmoid4(&mut self, x: Value) -> Value {
        let four = Lanes::Four;
        let abs = self.b.ins().fabs(x);
        let minus = self.b.ins().fneg(abs);
        let t = self.exp4(minus);
        let one = self.constant(1.0, four);
        let d = self.b.ins().fadd(one, t);
        let positive = self.b.ins().fdiv(one, d);
        let negative = self.b.ins().fdiv(t, d);
        let zero = self.constant(0.0, four);
        let ge = self.b.ins().fcmp(FloatCC::GreaterThanOrEqual, x, zero);
        let ge = self.b.ins().bitcast(types::F32X4, little_endian(), ge);
        self.b.ins().bitselect(ge, positive, negative)
    }

    /// Calls a Rust `f32 -> f32` function, lane by lane for four lanes.
    fn call(&mut self, intrinsic: Intrinsic, x: Value, lanes: Lanes) -> Value {
        let function = self.intrinsics[&intrinsic];
        let one = |e: &mut Self, x: Value| {
            let call = e.b.ins().call(function, &[x]);
            e.b.inst_results(call)[0]
        };
        match lanes {
            Lanes::One => one(self, x),
            Lanes::Four => {
                let first = self.b.ins().extractlane(x, 0);
                let first = one(self, first);
                let mut out = self.b.ins().splat(types::F32X4, first);
                for lane in 1..4u8 {
                    let xi = self.b.ins().extractlane(x, lane);
                    let yi = one(self, xi);
                    out = self.b.ins().insertlane(out, yi, lane);
                }
                out
            }
        }
    }
}

fn float_cc(op: CompareOp) -> FloatCC {
    // Ordered comparisons: false when either side is NaN, like Rust's operators.
    match op {
        CompareOp::Eq => FloatCC::Equal,
        CompareOp::Lt => FloatCC::LessThan,
        CompareOp::Le => FloatCC::LessThanOrEqual,
        CompareOp::Gt => FloatCC::GreaterThan,
        CompareOp::Ge => FloatCC::GreaterThanOrEqual,
    }
}

/// Flags of a bitcast between vector types (their lane order must be stated).
pub(super) fn little_endian() -> MemFlagsData {
    MemFlagsData::new().with_endianness(Endianness::Little)
}
