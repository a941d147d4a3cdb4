//! Softmaxes and their gradients as library calls ([`Library::Softmax`], `SoftmaxGrad`), under
//! [`LowerOptions::softmax_routines`] (the CPU's choice where it has AVX-512: its routines run
//! sixteen lanes of `exp` where cranelift's loops run four).
//!
//! The graph has no softmax op: a softmax is its max, exponentials, sum and division, which
//! fusion and merging make one loop nest, and its gradient the chain rule's nest over them.
//! This pass recognises those two nests, statement for statement, in the finished program and
//! replaces each with the call computing the same values in the same order; a nest of any
//! other shape stays a loop, so a model the pattern does not foresee runs as before.
//!
//! [`LowerOptions::softmax_routines`]: super::LowerOptions

use crate::graph::{BinaryOp, ReduceOp, UnaryOp};
use crate::kernel::{Expr, KernelBody, Library, LoopNest, Masking, Program, Scores, Stmt, View};

use super::{kernel_name, row_major_strides};

/// Replaces every softmax nest of `program` and every gradient nest of one with its call,
/// renamed for what it now is (`k16_softmax_model_layers_0_self_attn`).
pub(super) fn call_softmaxes(program: &mut Program) {
    for index in 0..program.kernels.len() {
        let KernelBody::Loop(nest) = &program.kernels[index].body else {
            continue;
        };
        let call = forward(nest).or_else(|| gradient(nest));
        if let Some(call) = call.filter(|call| writes_whole_buffers(program, call)) {
            let kernel = &mut program.kernels[index];
            let what = match call {
                Library::Softmax { .. } => "softmax",
                _ => "softmax_grad",
            };
            kernel.name = kernel_name(index, what, &kernel.origin);
            kernel.body = KernelBody::Library(call);
        }
    }
}

/// `r_a = max(s); e = exp(s − r_a); r_b = sum(e); out = e / r_b`, with `sums = r_b` stored per
/// row before or after the division when the gradient reads it.
fn forward(nest: &LoopNest) -> Option<Library> {
    if nest.domain.is_empty() {
        return None;
    }
    let [
        Stmt::Reduce {
            row: max_row,
            op: ReduceOp::Max,
            value: s,
        },
        Stmt::Store {
            view: exponentials,
            value: Expr::Unary(UnaryOp::Exp, shifted),
        },
        Stmt::Reduce {
            row: sum_row,
            op: ReduceOp::Sum,
            value: Expr::Load(summed),
        },
        rest @ ..,
    ] = &nest.body[..]
    else {
        return None;
    };
    let Expr::Binary(BinaryOp::Sub, shifted_scores, max) = &**shifted else {
        return None;
    };
    if **shifted_scores != *s || **max != Expr::Row(*max_row) || summed != exponentials {
        return None;
    }
    let (mut out, mut sums) = (None, None);
    for stmt in rest {
        match stmt {
            Stmt::Store {
                view,
                value: Expr::Binary(BinaryOp::Div, e, sum),
            } if out.is_none()
                && **e == Expr::Load(exponentials.clone())
                && **sum == Expr::Row(*sum_row) =>
            {
                out = Some(view.clone())
            }
            Stmt::StoreRow {
                view,
                value: Expr::Row(row),
            } if sums.is_none() && row == sum_row => sums = Some(view.clone()),
            _ => return None,
        }
    }
    let scores = scores(s)?;
    let mut rows_read = vec![&scores.x];
    rows_read.extend(scores.mask.as_ref().map(|m| &m.mask));
    let out = out?;
    let mut written = vec![exponentials, &out];
    written.extend(sums.as_ref());
    let rows_written = &written[..2];
    (contiguous_rows(&rows_read, rows_written) && apart(&rows_read, &written)).then(|| {
        Library::Softmax {
            domain: nest.domain.clone(),
            scores,
            exponentials: exponentials.clone(),
            sums,
            out,
        }
    })
}

/// `x`, `x · c` or either of them under `select(mask, …, fill)`.
fn scores(expr: &Expr) -> Option<Scores> {
    let (mask, scaled) = match expr {
        Expr::Select(mask, scaled, fill) => match (&**mask, &**fill) {
            (Expr::Load(mask), &Expr::Constant(fill)) => (
                Some(Masking {
                    mask: mask.clone(),
                    fill,
                }),
                &**scaled,
            ),
            _ => return None,
        },
        other => (None, other),
    };
    let (x, scale) = match scaled {
        Expr::Load(x) => (x, None),
        Expr::Binary(BinaryOp::Mul, x, c) => match (&**x, &**c) {
            (Expr::Load(x), &Expr::Constant(c)) => (x, Some(c)),
            _ => return None,
        },
        _ => return None,
    };
    Some(Scores {
        x: x.clone(),
        scale,
        mask,
    })
}

/// `r = sum(neg(dp · (p / s))); out = select(mask, ((dp / s) + r) · e, 0) · c`, the select and
/// the scale each optional.
fn gradient(nest: &LoopNest) -> Option<Library> {
    if nest.domain.is_empty() {
        return None;
    }
    let [
        Stmt::Reduce {
            row,
            op: ReduceOp::Sum,
            value: Expr::Unary(UnaryOp::Neg, weighted),
        },
        Stmt::Store { view: out, value },
    ] = &nest.body[..]
    else {
        return None;
    };
    let (cotangent, quotient) = loads_product(weighted, BinaryOp::Mul)?;
    let Expr::Binary(BinaryOp::Div, p, s) = quotient else {
        return None;
    };
    let (Expr::Load(probabilities), Expr::Load(sums)) = (&**p, &**s) else {
        return None;
    };
    let (masked, scale) = match value {
        Expr::Binary(BinaryOp::Mul, masked, c) => match **c {
            Expr::Constant(c) => (&**masked, Some(c)),
            _ => (value, None),
        },
        _ => (value, None),
    };
    let (mask, core) = match masked {
        Expr::Select(mask, core, zero) => match (&**mask, &**zero) {
            (Expr::Load(mask), Expr::Constant(0.0)) => (Some(mask.clone()), &**core),
            _ => return None,
        },
        core => (None, core),
    };
    // ((dp / s) + r) · e
    let Expr::Binary(BinaryOp::Mul, shifted, e) = core else {
        return None;
    };
    let (Expr::Binary(BinaryOp::Add, scaled_cotangent, r), Expr::Load(exponentials)) =
        (&**shifted, &**e)
    else {
        return None;
    };
    let divided = Expr::Binary(
        BinaryOp::Div,
        Box::new(Expr::Load(cotangent.clone())),
        Box::new(Expr::Load(sums.clone())),
    );
    if **scaled_cotangent != divided || **r != Expr::Row(*row) {
        return None;
    }
    let per_row = sums.strides.last() == Some(&0);
    let mut rows_read = vec![cotangent, probabilities, exponentials];
    rows_read.extend(mask.as_ref());
    let fits =
        contiguous_rows(&rows_read, &[out]) && apart(&[&rows_read[..], &[sums]].concat(), &[out]);
    (per_row && fits).then(|| Library::SoftmaxGrad {
        domain: nest.domain.clone(),
        cotangent: cotangent.clone(),
        probabilities: probabilities.clone(),
        sums: sums.clone(),
        exponentials: exponentials.clone(),
        mask,
        scale,
        out: out.clone(),
    })
}

/// The two views of `load · load` (`op` the product's operator), the second possibly any
/// expression: `(dp, p / s)`.
fn loads_product(expr: &Expr, op: BinaryOp) -> Option<(&View, &Expr)> {
    match expr {
        Expr::Binary(found, a, b) if *found == op => match &**a {
            Expr::Load(view) => Some((view, &**b)),
            _ => None,
        },
        _ => None,
    }
}

/// Every view read as rows and every view written as rows has consecutive elements along the
/// inner axis: the routines read and write rows as slices.
pub(super) fn contiguous_rows(read: &[&View], written: &[&View]) -> bool {
    let inner_unit = |v: &&View| v.strides.last() == Some(&1);
    read.iter().all(inner_unit) && written.iter().all(inner_unit)
}

/// No written buffer is read, nor written twice: the routines hold each written buffer alone.
pub(super) fn apart(read: &[&View], written: &[&View]) -> bool {
    written.iter().enumerate().all(|(i, w)| {
        read.iter().all(|r| r.buffer != w.buffer)
            && written[..i].iter().all(|v| v.buffer != w.buffer)
    })
}

/// Every view the call writes is its whole buffer, row-major over the domain (the sums over
/// its outer axes): the routines hand out each buffer's rows to the threads.
fn writes_whole_buffers(program: &Program, call: &Library) -> bool {
    let whole = |view: &View, dims: &[usize]| covers(program, view, dims);
    match call {
        Library::Softmax {
            domain,
            exponentials,
            sums,
            out,
            ..
        } => {
            let outer = &domain[..domain.len() - 1];
            whole(exponentials, domain)
                && whole(out, domain)
                && sums.as_ref().is_none_or(|sums| whole(sums, outer))
        }
        Library::SoftmaxGrad { domain, out, .. } => whole(out, domain),
        _ => false,
    }
}

/// `view` is its whole buffer, row-major over `dims` (its first `dims.len()` strides).
pub(super) fn covers(program: &Program, view: &View, dims: &[usize]) -> bool {
    let buffer = program.buffer(view.buffer);
    view.offset == 0
        && buffer.ty.dims().iter().product::<usize>() == dims.iter().product::<usize>()
        && view.strides[..dims.len()] == row_major_strides(dims)[..]
}
