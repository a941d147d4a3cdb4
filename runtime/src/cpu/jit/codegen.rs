//! A loop nest as one cranelift function: the loop over a range of rows, the row's base
//! addresses, and each statement's loop over the innermost axis.
//!
//! ```text
//! fn(table, begin, end):
//!   base pointers of the slots (loaded once)
//!   for row in begin..end:
//!     outer multi-index of `row` (div/mod by the constant extents, once per row)
//!     row base address of every view
//!     for each statement:
//!       row-invariant subexpressions (broadcast loads, row values), once
//!       inner loop: 4 lanes at a time then a scalar tail, or one element at a time
//! ```
//!
//! Reductions follow the reference's fixed order (`loops::fold_row`: four interleaved lane
//! accumulators, then the tail), so their results are the reference's bit for bit.

use std::collections::HashMap;

use cranelift_codegen::Context;
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{
    AbiParam, BlockArg, FuncRef, InstBuilder, MemFlagsData, Type, Value, types,
};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::JITModule;
use cranelift_module::{FuncId, Linkage, Module};
use fathom_compiler::graph::ReduceOp;
use fathom_compiler::kernel::{BufferId, Expr, LoopNest, Stmt, View};

use super::JitError;
use super::emit::little_endian;
use super::intrinsics::Intrinsic;
use super::plan::{self, NestPlan};
use crate::cpu::loops::{FOLD_LANES, LANE_SPLIT_MIN};

/// Below this inner extent a statement runs one element at a time: four lanes save little
/// there and the scalar tail would be most of the work.
const VECTOR_MIN_INNER: usize = 8;

/// Inner loops of at most this many scalar iterations are unrolled into straight-line code.
const UNROLL_MAX: usize = 4;

/// Defines one function per loop nest in a JIT module.
pub(super) struct Builder<'m> {
    module: &'m mut JITModule,
    /// In `Intrinsic::ALL` order, so every build declares them alike.
    imports: Vec<(Intrinsic, FuncId)>,
    ctx: Context,
    function_ctx: FunctionBuilderContext,
    /// Where each function's cranelift IR and machine code go, if anywhere.
    dump: Option<std::path::PathBuf>,
}

impl<'m> Builder<'m> {
    /// A builder defining functions in `module`; with `dump`, each function's IR and machine
    /// code are also written to that directory.
    pub fn new(
        module: &'m mut JITModule,
        imports: Vec<(Intrinsic, FuncId)>,
        dump: Option<std::path::PathBuf>,
    ) -> Self {
        let ctx = module.make_context();
        Builder {
            module,
            imports,
            ctx,
            function_ctx: FunctionBuilderContext::new(),
            dump,
        }
    }

    /// Builds and compiles `nest` as function `name`.
    pub fn define(
        &mut self,
        name: &str,
        nest: &LoopNest,
        plan: &NestPlan,
    ) -> Result<FuncId, JitError> {
        self.module.clear_context(&mut self.ctx);
        let mut signature = self.module.make_signature();
        for _ in 0..3 {
            signature.params.push(AbiParam::new(types::I64));
        }
        self.ctx.func.signature = signature.clone();
        let b = FunctionBuilder::new(&mut self.ctx.func, &mut self.function_ctx);
        let intrinsics = self
            .imports
            .iter()
            .map(|&(which, id)| (which, self.module.declare_func_in_func(id, b.func)))
            .collect();
        let mut emitter = Emitter {
            b,
            plan,
            intrinsics,
            bases: HashMap::new(),
            rows: HashMap::new(),
            hoisted: HashMap::new(),
            loads: HashMap::new(),
        };
        emitter.function(nest);
        let Emitter { mut b, .. } = emitter;
        b.seal_all_blocks();
        b.finalize(self.module.target_config());
        let id = self
            .module
            .declare_function(name, Linkage::Local, &signature)?;
        self.ctx.set_disasm(self.dump.is_some());
        self.module.define_function(id, &mut self.ctx)?;
        if let Some(dir) = &self.dump {
            self.write_dump(dir, name);
        }
        Ok(id)
    }

    /// Writes the function just defined as `<dir>/<name>.clif` (cranelift IR) and `.s` (the
    /// machine code as cranelift printed it). A failure to write costs only the dump.
    fn write_dump(&self, dir: &std::path::Path, name: &str) {
        let ir = self.ctx.func.display().to_string();
        let code = self
            .ctx
            .compiled_code()
            .and_then(|c| c.vcode.clone())
            .unwrap_or_default();
        let written = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(dir.join(format!("{name}.clif")), ir))
            .and_then(|()| std::fs::write(dir.join(format!("{name}.s")), code));
        if let Err(error) = written {
            eprintln!("{}: {}: {error}", super::DUMP_ENV, dir.display());
        }
    }
}

/// How many elements one evaluation computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Lanes {
    One,
    /// Four consecutive inner indices in an F32X4.
    Four,
}

/// The inner index (of the first lane) an evaluation is at.
#[derive(Clone, Copy, Debug)]
pub(super) enum Index {
    Fixed(i64),
    At(Value),
}

/// A view's row base address depends on its buffer, offset and outer strides only.
type BaseKey<'n> = (BufferId, usize, &'n [isize]);

/// The state of building one function.
pub(super) struct Emitter<'f, 'n> {
    pub b: FunctionBuilder<'f>,
    pub plan: &'n NestPlan,
    pub intrinsics: HashMap<Intrinsic, FuncRef>,
    /// The current row's base address of every view.
    pub bases: HashMap<BaseKey<'n>, Value>,
    /// The current row's reduced values.
    pub rows: HashMap<usize, Value>,
    /// Row-invariant subexpressions of the current statement, computed before its inner loop:
    /// the scalar and, for a four-lane loop, its splat.
    pub hoisted: HashMap<*const Expr, (Value, Option<Value>)>,
    /// Loads already emitted at the current index (views repeat in fused expressions).
    pub loads: HashMap<&'n View, Value>,
}

impl<'n> Emitter<'_, 'n> {
    fn function(&mut self, nest: &'n LoopNest) {
        let entry = self.b.create_block();
        self.b.append_block_params_for_function_params(entry);
        self.b.switch_to_block(entry);
        let &[table, begin, end] = self.b.block_params(entry) else {
            unreachable!("the signature has three parameters")
        };
        if self.plan.rows == 0 {
            // An empty outer axis: nothing to do (and no extent to divide by).
            self.b.ins().return_(&[]);
            return;
        }
        let pointers: Vec<Value> = (0..self.plan.slots.len())
            .map(|s| {
                let flags = MemFlagsData::trusted().with_readonly();
                self.b.ins().load(types::I64, flags, table, (8 * s) as i32)
            })
            .collect();
        let row_block = self.b.create_block();
        let row = self.b.append_block_param(row_block, types::I64);
        let exit = self.b.create_block();
        let any = self.b.ins().icmp(IntCC::UnsignedLessThan, begin, end);
        self.b
            .ins()
            .brif(any, row_block, &[begin.into()], exit, &[]);

        self.b.switch_to_block(row_block);
        self.row_bases(nest, row, &pointers);
        for stmt in &nest.body {
            self.stmt(stmt);
        }
        let next = self.b.ins().iadd_imm_s(row, 1);
        let more = self.b.ins().icmp(IntCC::UnsignedLessThan, next, end);
        self.b
            .ins()
            .brif(more, row_block, &[next.into()], exit, &[]);

        self.b.switch_to_block(exit);
        self.b.ins().return_(&[]);
    }

    /// The outer multi-index of `row`, then the base address of every view at it.
    fn row_bases(&mut self, nest: &'n LoopNest, row: Value, pointers: &[Value]) {
        let outer = &self.plan.outer;
        let mut index = vec![None; outer.len()];
        let mut rest = row;
        for d in (0..outer.len()).rev() {
            if outer[d] == 1 {
                continue; // index 0
            }
            if d == 0 {
                index[d] = Some(rest); // row < rows, so the quotient is the index itself
            } else {
                index[d] = Some(self.b.ins().urem_imm_s(rest, outer[d] as i64));
                rest = self.b.ins().udiv_imm_s(rest, outer[d] as i64);
            }
        }
        self.bases.clear();
        for stmt in &nest.body {
            for (view, _) in plan::views(stmt) {
                let key = base_key(view, outer.len());
                if self.bases.contains_key(&key) {
                    continue;
                }
                let mut offset = self.b.ins().iconst(types::I64, 4 * view.offset as i64);
                for (d, i) in index.iter().enumerate() {
                    if let Some(i) = *i
                        && view.strides[d] != 0
                    {
                        let step = self.b.ins().imul_imm_s(i, 4 * view.strides[d] as i64);
                        offset = self.b.ins().iadd(offset, step);
                    }
                }
                let base = self
                    .b
                    .ins()
                    .iadd(pointers[self.plan.slot(view.buffer)], offset);
                self.bases.insert(key, base);
            }
        }
        self.rows.clear();
    }

    fn stmt(&mut self, stmt: &'n Stmt) {
        match stmt {
            Stmt::Reduce { row, op, value } => {
                let lanes = self.lanes_for(value, None);
                self.hoist(value, lanes);
                let acc = if self.plan.inner >= LANE_SPLIT_MIN {
                    self.reduce_in_lanes(*op, value, lanes)
                } else {
                    let init = self.reduce_init(*op);
                    let acc = self.inner_loop(lanes, Some(init), |e, lanes, j, acc| {
                        let v = e.expr(value, lanes, j);
                        let acc = acc.expect("a reduction carries its accumulator");
                        Some(e.fold(*op, acc, v, lanes))
                    });
                    acc.expect("a reduction carries its accumulator")
                };
                let result = match op {
                    ReduceOp::Sum => self.b.ins().fdemote(types::F32, acc),
                    ReduceOp::Mean => {
                        let count = self.b.ins().f64const(self.plan.inner as f64);
                        let mean = self.b.ins().fdiv(acc, count);
                        self.b.ins().fdemote(types::F32, mean)
                    }
                    ReduceOp::Max => acc,
                };
                self.rows.insert(*row, result);
            }
            Stmt::Store { view, value } => {
                let lanes = self.lanes_for(value, Some(view));
                self.hoist(value, lanes);
                self.inner_loop(lanes, None, |e, lanes, j, _| {
                    let v = e.expr(value, lanes, j);
                    let (address, offset) = e.address(view, j);
                    e.b.ins().store(memflags(lanes), v, address, offset);
                    None
                });
            }
            Stmt::StoreRow { view, value } => {
                // Once per row, at inner index 0 (the value must not depend on it).
                self.loads.clear();
                let v = self.expr(value, Lanes::One, Index::Fixed(0));
                let base = self.bases[&base_key(view, self.plan.outer.len())];
                self.b.ins().store(memflags(Lanes::One), v, base, 0);
            }
        }
        self.hoisted.clear();
    }

    /// Four lanes when the inner extent is long enough and every access of the statement is
    /// contiguous (stride 1) or, for loads, broadcast (stride 0) along the innermost axis.
    fn lanes_for(&self, value: &Expr, store: Option<&View>) -> Lanes {
        if self.plan.inner < VECTOR_MIN_INNER {
            return Lanes::One;
        }
        let mut ok = store.is_none_or(|v| self.plan.inner_stride(v) == 1);
        value.for_each_load(&mut |v| ok &= matches!(self.plan.inner_stride(v), 0 | 1));
        if ok { Lanes::Four } else { Lanes::One }
    }

    /// Computes the row-invariant subexpressions of `expr` (largest first) at the current
    /// point, before the inner loop, so the loop only looks them up.
    fn hoist(&mut self, expr: &'n Expr, lanes: Lanes) {
        self.loads.clear();
        self.hoist_rec(expr, lanes);
    }

    fn hoist_rec(&mut self, expr: &'n Expr, lanes: Lanes) {
        if self.invariant(expr) {
            if !matches!(expr, Expr::Constant(_)) {
                let scalar = self.expr(expr, Lanes::One, Index::Fixed(0));
                let splat =
                    (lanes == Lanes::Four).then(|| self.b.ins().splat(types::F32X4, scalar));
                self.hoisted.insert(expr, (scalar, splat));
            }
            return;
        }
        match expr {
            Expr::Load(_) | Expr::Constant(_) | Expr::Row(_) => {}
            Expr::Unary(_, a) | Expr::Cast(_, a) => self.hoist_rec(a, lanes),
            Expr::Binary(_, a, b) | Expr::Compare(_, a, b) => {
                self.hoist_rec(a, lanes);
                self.hoist_rec(b, lanes);
            }
            Expr::Select(c, a, b) => {
                self.hoist_rec(c, lanes);
                self.hoist_rec(a, lanes);
                self.hoist_rec(b, lanes);
            }
        }
    }

    /// Whether `expr` has the same value at every inner index of a row.
    fn invariant(&self, expr: &Expr) -> bool {
        let mut invariant = true;
        expr.for_each_load(&mut |v| invariant &= self.plan.inner_stride(v) == 0);
        invariant
    }

    /// Emits the inner loop of a statement: `body` computes the element(s) at an index and
    /// returns the updated accumulator, if the statement has one.
    fn inner_loop(
        &mut self,
        lanes: Lanes,
        mut acc: Option<Value>,
        mut body: impl FnMut(&mut Self, Lanes, Index, Option<Value>) -> Option<Value>,
    ) -> Option<Value> {
        let n = self.plan.inner as i64;
        let (looped, step) = match lanes {
            Lanes::Four => (n / 4 * 4, 4),
            Lanes::One if n as usize > UNROLL_MAX => (n, 1),
            Lanes::One => (0, 1),
        };
        if looped > 0 {
            let accs: Vec<Value> = acc.into_iter().collect();
            let out = self.counted_loop(looped, step, accs, |e, j, accs| {
                e.loads.clear();
                body(e, lanes, Index::At(j), accs.first().copied())
                    .into_iter()
                    .collect()
            });
            acc = out.first().copied();
        }
        for k in looped..n {
            self.loads.clear();
            acc = body(self, Lanes::One, Index::Fixed(k), acc);
        }
        acc
    }

    /// Emits `for j in (0..end).step_by(step)` (`end` a positive multiple of `step`), threading
    /// the accumulators `accs` through `body`; returns their values after the loop.
    fn counted_loop(
        &mut self,
        end: i64,
        step: i64,
        accs: Vec<Value>,
        mut body: impl FnMut(&mut Self, Value, &[Value]) -> Vec<Value>,
    ) -> Vec<Value> {
        // A loop with its test at the bottom: the trip count is known to be at least one.
        let acc_types: Vec<Type> = accs
            .iter()
            .map(|&a| self.b.func.dfg.value_type(a))
            .collect();
        let body_block = self.b.create_block();
        let j = self.b.append_block_param(body_block, types::I64);
        let acc_in: Vec<Value> = acc_types
            .iter()
            .map(|&t| self.b.append_block_param(body_block, t))
            .collect();
        let exit = self.b.create_block();
        let acc_out: Vec<Value> = acc_types
            .iter()
            .map(|&t| self.b.append_block_param(exit, t))
            .collect();
        let zero = self.b.ins().iconst(types::I64, 0);
        self.b.ins().jump(body_block, &args(zero, &accs));

        self.b.switch_to_block(body_block);
        let next_accs = body(self, j, &acc_in);
        let next = self.b.ins().iadd_imm_s(j, step);
        let more = self.b.ins().icmp_imm_s(IntCC::SignedLessThan, next, end);
        let exit_args: Vec<BlockArg> = next_accs.iter().map(|&a| a.into()).collect();
        self.b
            .ins()
            .brif(more, body_block, &args(next, &next_accs), exit, &exit_args);

        self.b.switch_to_block(exit);
        acc_out
    }

    /// A reduction's starting value: −0.0 in f64 for sums (so an all −0.0 row sums to −0.0),
    /// −∞ in f32 for a max.
    fn reduce_init(&mut self, op: ReduceOp) -> Value {
        match op {
            ReduceOp::Sum | ReduceOp::Mean => self.b.ins().f64const(-0.0),
            ReduceOp::Max => self.b.ins().f32const(f32::NEG_INFINITY),
        }
    }

    /// A row of at least `LANE_SPLIT_MIN` elements reduced in the reference's order
    /// (`loops::fold_row`): eight lane accumulators over the first 8⌊n/8⌋ elements, lane `i`
    /// combined with lane `i + 4`, those four as (c0 ∘ c1) ∘ (c2 ∘ c3), then the tail in order.
    /// On four-lane loads the accumulators are vectors: two F32X4 for a max, four F64X2 (lanes
    /// 0–1, 2–3, 4–5, 6–7 widened) for a sum; on scalar loads, eight scalars.
    fn reduce_in_lanes(&mut self, op: ReduceOp, value: &'n Expr, lanes: Lanes) -> Value {
        const LANES: i64 = FOLD_LANES as i64;
        let n = self.plan.inner as i64;
        let split = n / LANES * LANES;
        let init = self.reduce_init(op);
        let accs = match (lanes, op) {
            (Lanes::Four, ReduceOp::Max) => vec![self.b.ins().splat(types::F32X4, init); 2],
            (Lanes::Four, _) => vec![self.b.ins().splat(types::F64X2, init); 4],
            (Lanes::One, _) => vec![init; FOLD_LANES],
        };
        let accs = self.counted_loop(split, LANES, accs, |e, j, accs| match lanes {
            Lanes::Four => {
                let mut next = Vec::with_capacity(accs.len());
                for half in 0..2 {
                    e.loads.clear();
                    let at = e.lane_index(j, 4 * half);
                    let v = e.expr(value, Lanes::Four, Index::At(at));
                    match op {
                        ReduceOp::Max => next.push(e.max4(accs[half as usize], v)),
                        ReduceOp::Sum | ReduceOp::Mean => {
                            let (low, high) = e.widen_halves(v);
                            let base = 2 * half as usize;
                            next.push(e.b.ins().fadd(accs[base], low));
                            next.push(e.b.ins().fadd(accs[base + 1], high));
                        }
                    }
                }
                next
            }
            Lanes::One => (0..LANES)
                .map(|lane| {
                    e.loads.clear();
                    let at = e.lane_index(j, lane);
                    let x = e.expr(value, Lanes::One, Index::At(at));
                    e.fold_one(op, accs[lane as usize], x)
                })
                .collect(),
        });
        // Lane i with lane i + 4: for vectors, the first half's vector(s) with the second's.
        let halves: Vec<Value> = match lanes {
            Lanes::One => (0..4)
                .map(|i| self.combine(op, accs[i], accs[i + 4]))
                .collect(),
            Lanes::Four => {
                let per_half = accs.len() / 2;
                let combined: Vec<Value> = (0..per_half)
                    .map(|i| match op {
                        ReduceOp::Max => self.max4(accs[i], accs[i + per_half]),
                        ReduceOp::Sum | ReduceOp::Mean => {
                            self.b.ins().fadd(accs[i], accs[i + per_half])
                        }
                    })
                    .collect();
                let count = if op == ReduceOp::Max { 4 } else { 2 };
                combined
                    .iter()
                    .flat_map(|&acc| (0..count).map(move |lane| (acc, lane)))
                    .map(|(acc, lane)| self.b.ins().extractlane(acc, lane))
                    .collect()
            }
        };
        let low = self.combine(op, halves[0], halves[1]);
        let high = self.combine(op, halves[2], halves[3]);
        let mut acc = self.combine(op, low, high);
        for k in split..n {
            self.loads.clear();
            let x = self.expr(value, Lanes::One, Index::Fixed(k));
            acc = self.fold_one(op, acc, x);
        }
        acc
    }

    /// `j + offset`, without an addition for offset 0.
    fn lane_index(&mut self, j: Value, offset: i64) -> Value {
        match offset {
            0 => j,
            _ => self.b.ins().iadd_imm_s(j, offset),
        }
    }

    /// Lanes 0–1 and 2–3 of an F32X4, each widened to an F64X2 (exactly, as `fpromote`).
    fn widen_halves(&mut self, v: Value) -> (Value, Value) {
        let low = self.b.ins().fvpromote_low(v);
        // Bytes 8..16 (lanes 2, 3) moved to the front.
        let bytes = self.b.ins().bitcast(types::I8X16, little_endian(), v);
        let order: Vec<u8> = (8..16).chain(0..8).collect();
        let mask = self.b.func.dfg.immediates.push(order.into());
        let swapped = self.b.ins().shuffle(bytes, bytes, mask);
        let swapped = self.b.ins().bitcast(types::F32X4, little_endian(), swapped);
        (low, self.b.ins().fvpromote_low(swapped))
    }

    /// Two partial results of a reduction combined (`b` folded into `a`).
    fn combine(&mut self, op: ReduceOp, a: Value, b: Value) -> Value {
        match op {
            ReduceOp::Sum | ReduceOp::Mean => self.b.ins().fadd(a, b),
            ReduceOp::Max => self.fold_one(op, a, b),
        }
    }

    /// Four lanes of `loops::max_step`: each lane of `v` replaces the accumulator's when
    /// greater or NaN.
    fn max4(&mut self, acc: Value, v: Value) -> Value {
        let greater = self.b.ins().fcmp(FloatCC::GreaterThan, v, acc);
        let nan = self.b.ins().fcmp(FloatCC::Unordered, v, v);
        let take = self.b.ins().bor(greater, nan);
        let mask = self.b.ins().bitcast(types::F32X4, little_endian(), take);
        self.b.ins().bitselect(mask, v, acc)
    }

    /// Folds the element(s) `v` into a reduction's accumulator, in index order.
    fn fold(&mut self, op: ReduceOp, acc: Value, v: Value, lanes: Lanes) -> Value {
        match lanes {
            Lanes::One => self.fold_one(op, acc, v),
            Lanes::Four => (0..4u8).fold(acc, |acc, lane| {
                let x = self.b.ins().extractlane(v, lane);
                self.fold_one(op, acc, x)
            }),
        }
    }

    fn fold_one(&mut self, op: ReduceOp, acc: Value, x: Value) -> Value {
        match op {
            ReduceOp::Sum | ReduceOp::Mean => {
                let wide = self.b.ins().fpromote(types::F64, x);
                self.b.ins().fadd(acc, wide)
            }
            ReduceOp::Max => {
                // The reference: `if x > m || x.is_nan() { x } else { m }`.
                let greater = self.b.ins().fcmp(FloatCC::GreaterThan, x, acc);
                let nan = self.b.ins().fcmp(FloatCC::Unordered, x, x);
                let take = self.b.ins().bor(greater, nan);
                self.b.ins().select(take, x, acc)
            }
        }
    }

    /// The address (and constant byte offset) of `view`'s element at inner index `j`.
    pub(super) fn address(&mut self, view: &View, j: Index) -> (Value, i32) {
        let base = self.bases[&base_key(view, self.plan.outer.len())];
        let stride = 4 * self.plan.inner_stride(view) as i64;
        match j {
            Index::Fixed(k) => match i32::try_from(stride * k) {
                Ok(offset) => (base, offset),
                Err(_) => (self.b.ins().iadd_imm_s(base, stride * k), 0),
            },
            Index::At(_) if stride == 0 => (base, 0),
            Index::At(j) => {
                let bytes = if stride == 4 {
                    self.b.ins().ishl_imm_s(j, 2)
                } else {
                    self.b.ins().imul_imm_s(j, stride)
                };
                (self.b.ins().iadd(base, bytes), 0)
            }
        }
    }

    /// The value type of one evaluation.
    pub(super) fn float_type(lanes: Lanes) -> Type {
        match lanes {
            Lanes::One => types::F32,
            Lanes::Four => types::F32X4,
        }
    }
}

/// Flags of a buffer access: in bounds (proved by `plan`), so it cannot trap; a scalar is
/// aligned (buffers are `Vec<f32>`), four lanes need not be.
pub(super) fn memflags(lanes: Lanes) -> MemFlagsData {
    match lanes {
        Lanes::One => MemFlagsData::trusted(),
        Lanes::Four => MemFlagsData::new().with_notrap(),
    }
}

fn base_key(view: &View, outer_rank: usize) -> BaseKey<'_> {
    (view.buffer, view.offset, &view.strides[..outer_rank])
}

fn args(first: Value, rest: &[Value]) -> Vec<BlockArg> {
    std::iter::once(first)
        .chain(rest.iter().copied())
        .map(BlockArg::from)
        .collect()
}
