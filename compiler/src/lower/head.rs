//! The language-model head and its loss as one library call
//! ([`Library::LinearCrossEntropy`]), under [`LowerOptions::linear_cross_entropy_routines`]
//! (the CPU's choice where its bf16 kernel runs: its routine keeps each chunk of tokens' logits
//! in cache from the product that writes them to the two that read their gradient).
//!
//! A training step's head is five kernels in the finished program: the logits' matmul
//! `hidden · weightᵀ`, the cross-entropy keeping its exponentials, its gradient, and the
//! gradient's two matmuls (`dlogits · weight`, `dlogitsᵀ · hidden`). This pass finds them and
//! replaces them with one call at the cross-entropy's place, when nothing else reads the
//! logits, the exponentials or the gradient, every operand is a whole dense buffer as the call
//! reads it, the three products multiply bf16 values and sum alike, and the cotangent does not
//! depend on the head: the gradients move forward to the loss, and the kernels computing the
//! cotangent (a loss weight over a count, in backward) move to just before it. Any other shape
//! of head stays as it is.
//!
//! [`LowerOptions::linear_cross_entropy_routines`]: super::LowerOptions

use crate::dtype::DType;
use crate::graph::Accumulation;
use crate::kernel::{BufferId, Kernel, KernelBody, Library, Program, View};

use super::kernel_name;
use super::softmax::covers;

/// Replaces every head of `program` with its call, named for what it is
/// (`k205_linear_cross_entropy_loss`), drops the four kernels it stands for, and moves the
/// kernels computing its cotangent, when they come later, to just before it.
pub(super) fn call_heads(program: &mut Program) {
    // One head at a time: each replacement moves kernels, and the next head's analysis reads
    // the program as it is then.
    loop {
        let uses = Uses::of(program);
        let Some(head) = (0..program.kernels.len()).find_map(|i| head_at(program, &uses, i)) else {
            return;
        };
        let Head {
            index,
            call,
            replaced,
            hoisted,
        } = head;
        let old = std::mem::take(&mut program.kernels);
        let mut moved: Vec<Kernel> = hoisted.iter().map(|&k| old[k].clone()).collect();
        let mut call = Some(call);
        for (k, kernel) in old.into_iter().enumerate() {
            if k == index {
                program.kernels.append(&mut moved);
                program.kernels.push(Kernel {
                    name: kernel_name(index, "linear_cross_entropy", &kernel.origin),
                    body: KernelBody::Library(call.take().expect("one call per head")),
                    ..kernel
                });
            } else if !replaced.contains(&k) && !hoisted.contains(&k) {
                program.kernels.push(kernel);
            }
        }
    }
}

/// A head found at its loss's kernel `index`: the call, the kernels it replaces, and those
/// computing its cotangent after `index`, which move before it (in their order).
struct Head {
    index: usize,
    call: Library,
    replaced: [usize; 4],
    hoisted: Vec<usize>,
}

/// Which kernels write and which read each buffer, in program order.
struct Uses {
    writers: Vec<Vec<usize>>,
    readers: Vec<Vec<usize>>,
    /// The program's outputs, read after every kernel.
    outputs: Vec<BufferId>,
}

impl Uses {
    fn of(program: &Program) -> Uses {
        let mut uses = Uses {
            writers: vec![Vec::new(); program.buffers.len()],
            readers: vec![Vec::new(); program.buffers.len()],
            outputs: program.outputs.iter().map(|(_, b)| *b).collect(),
        };
        for (k, kernel) in program.kernels.iter().enumerate() {
            let (reads, writes) = kernel.reads_and_writes();
            reads.iter().for_each(|b| uses.readers[b.index()].push(k));
            writes.iter().for_each(|b| uses.writers[b.index()].push(k));
        }
        uses
    }

    /// The one kernel writing `buffer`.
    fn writer(&self, buffer: BufferId) -> Option<usize> {
        match self.writers[buffer.index()][..] {
            [k] => Some(k),
            _ => None,
        }
    }

    /// The kernels after `index` that `buffer`'s value depends on (its writers after `index`,
    /// theirs, …), in program order; none if it depends on kernel `index` itself.
    fn producers_after(
        &self,
        program: &Program,
        buffer: BufferId,
        index: usize,
    ) -> Option<Vec<usize>> {
        let (mut found, mut pending) = (std::collections::BTreeSet::new(), vec![buffer]);
        while let Some(buffer) = pending.pop() {
            for &writer in &self.writers[buffer.index()] {
                if writer == index {
                    return None;
                }
                if writer > index && found.insert(writer) {
                    pending.extend(program.kernels[writer].reads_and_writes().0);
                }
            }
        }
        Some(found.into_iter().collect())
    }

    /// The kernels reading `buffer`, unless it is an output of the program (read by the
    /// caller too).
    fn readers(&self, buffer: BufferId) -> Option<&[usize]> {
        (!self.outputs.contains(&buffer)).then(|| &self.readers[buffer.index()][..])
    }
}

/// A matmul's operands and how it sums.
struct Product<'a> {
    batch: &'a [usize],
    mnk: (usize, usize, usize),
    a: &'a View,
    b: &'a View,
    out: &'a View,
    arithmetic: (Accumulation, Option<DType>, bool),
}

fn product(program: &Program, kernel: usize) -> Option<Product<'_>> {
    match &program.kernels[kernel].body {
        KernelBody::Library(Library::MatMul {
            batch,
            m,
            n,
            k,
            a,
            b,
            out,
            accumulation,
            exact_in,
            rounds,
            triangular: None,
        }) => Some(Product {
            batch,
            mnk: (*m, *n, *k),
            a,
            b,
            out,
            arithmetic: (*accumulation, *exact_in, *rounds),
        }),
        _ => None,
    }
}

/// `view` reads its buffer, `[rows, columns]` (of `rows · columns` elements), transposed: as a
/// `[columns, rows]` matrix (after `batch` broadcast axes).
fn transposed(
    program: &Program,
    view: &View,
    batch: usize,
    (rows, columns): (usize, usize),
) -> bool {
    let mut strides = vec![0; batch];
    strides.extend([1, columns as isize]);
    view.offset == 0
        && view.strides == strides
        && program.buffer(view.buffer).ty.numel() == rows * columns
}

/// The head whose cross-entropy is kernel `index`.
fn head_at(program: &Program, uses: &Uses, index: usize) -> Option<Head> {
    let KernelBody::Library(Library::CrossEntropy {
        logits,
        labels,
        loss,
        kept: Some(kept),
    }) = &program.kernels[index].body
    else {
        return None;
    };
    // logits = hidden · weightᵀ, read by the loss alone.
    let logits_kernel = uses.writer(*logits)?;
    let forward = product(program, logits_kernel)?;
    let (m, vocab, width) = forward.mnk;
    let dims = |batch: &[usize], columns: usize| {
        let mut dims = batch.to_vec();
        dims.extend([m, columns]);
        dims
    };
    let tokens = forward.batch.iter().product::<usize>() * m;
    let (hidden, weight) = (forward.a.buffer, forward.b.buffer);
    let fits = covers(program, forward.out, &dims(forward.batch, vocab))
        && covers(program, forward.a, &dims(forward.batch, width))
        && transposed(program, forward.b, forward.batch.len(), (vocab, width))
        && program.buffer(*labels).ty.numel() == tokens
        && uses.readers(*logits) == Some(&[index]);
    // Its gradient, read by the two products alone.
    let Some([gradient_kernel]) = uses.readers(kept.exponentials) else {
        return None;
    };
    let KernelBody::Library(Library::CrossEntropyGrad {
        kept: gradient_kept,
        labels: gradient_labels,
        cotangent,
        out: dlogits,
    }) = &program.kernels[*gradient_kernel].body
    else {
        return None;
    };
    let fits = fits
        && gradient_kept == kept
        && gradient_labels == labels
        && uses.readers(kept.sums) == Some(&[*gradient_kernel]);
    let (first, second) = match uses.readers(*dlogits) {
        Some(&[first, second]) => (product(program, first)?, product(program, second)?),
        _ => return None,
    };
    let hidden_grad_of = |p: &Product| {
        let (rows, n, k) = p.mnk;
        let rows_dims = |columns| {
            let mut dims = p.batch.to_vec();
            dims.extend([rows, columns]);
            dims
        };
        (p.batch.iter().product::<usize>() * rows, n, k) == (tokens, width, vocab)
            && covers(program, p.a, &rows_dims(vocab))
            && p.a.buffer == *dlogits
            && covers(program, p.out, &rows_dims(width))
            && p.b.buffer == weight
            && p.b.offset == 0
            && p.b.strides[..p.batch.len()].iter().all(|&s| s == 0)
            && p.b.strides[p.batch.len()..] == [width as isize, 1]
    };
    let weight_grad_of = |p: &Product| {
        p.batch.iter().product::<usize>() == 1
            && p.mnk == (vocab, width, tokens)
            && transposed(program, p.a, p.batch.len(), (tokens, vocab))
            && p.a.buffer == *dlogits
            && covers(program, p.b, &[tokens, width])
            && p.b.buffer == hidden
            && covers(program, p.out, &[vocab, width])
    };
    let (hidden_grad, weight_grad) = if hidden_grad_of(&first) && weight_grad_of(&second) {
        (first, second)
    } else if hidden_grad_of(&second) && weight_grad_of(&first) {
        (second, first)
    } else {
        return None;
    };
    let (accumulation, exact_in, rounds) = forward.arithmetic;
    // Products of bf16 values (the routine's chunks are the bf16 kernel's), all summed alike.
    let summed_alike = exact_in == Some(DType::BF16)
        && [&hidden_grad, &weight_grad]
            .iter()
            .all(|p| p.arithmetic == forward.arithmetic);
    let [hidden_grad_kernel, weight_grad_kernel] =
        [hidden_grad.out.buffer, weight_grad.out.buffer].map(|b| uses.writer(b));
    let call = Library::LinearCrossEntropy {
        hidden,
        weight,
        labels: *labels,
        cotangent: *cotangent,
        loss: *loss,
        hidden_grad: hidden_grad.out.buffer,
        weight_grad: weight_grad.out.buffer,
        accumulation,
        exact_in,
        rounds,
    };
    let replaced = [
        logits_kernel,
        *gradient_kernel,
        hidden_grad_kernel?,
        weight_grad_kernel?,
    ];
    // The cotangent's kernels after the loss, none of them a head's kernel or reading what one
    // writes (so the cotangent does not depend on the head).
    let hoisted = uses.producers_after(program, *cotangent, index)?;
    let independent = hoisted.iter().all(|k| !replaced.contains(k));
    let fits = fits && summed_alike && independent;
    (fits && uses.writer(*dlogits) == Some(*gradient_kernel)).then_some(Head {
        index,
        call,
        replaced,
        hoisted,
    })
}
