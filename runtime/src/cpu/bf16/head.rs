//! The language-model head and its loss in one pass over chunks of tokens, on the bf16 kernel
//! (`Library::LinearCrossEntropy`): per chunk of [`ROWS_PER_CHUNK`] tokens, their logits
//! `h · Wᵀ`, each row's loss and gradient `(softmax − onehot) · g` written over the logits,
//! the chunk's rows of `dh = dlogits · W`, and its tokens' pairs of the packed `dlogitsᵀ` that
//! `dW = dlogitsᵀ · h` multiplies once every chunk is done. A chunk's logits (24 × 4096 f32,
//! 384 KB) stay in L2 from the product that writes them to the two that read their gradient,
//! where the separate kernels wrote and read three vocabulary-wide arrays (logits,
//! exponentials, gradient: 16 MB each on the small model) through memory.
//!
//! Every value is the one the separate kernels compute, bit for bit: each logit and each
//! element of `dh` and `dW` is summed by the same register tiles over the same K blocks in the
//! same order (chunks of rows split the products along M only), the rows' losses and
//! gradients are `super::super::cross_entropy`'s row functions, and the packed operands are
//! the same roundings of the same values.

use rayon::prelude::*;

use super::super::cross_entropy;
use super::pack::{Runs, pack_pairs_side_by_side};
use super::{
    Layout, MR, Matrix, NR, Output, Source, give_back, lent, multiply_packed, pack_operand,
    packing_buffer,
};

/// Tokens per chunk (a multiple of 2, so that chunks hold whole K pairs of `dlogitsᵀ`): two
/// row panels, whose logits over a 4096-word vocabulary (384 KB) and their packed gradient
/// (192 KB) fit in L2 together.
const ROWS_PER_CHUNK: usize = 2 * MR;

/// The head's operands: `hidden [tokens, width]`, `weight [vocab, width]` (both row-major),
/// and per token its label and the loss's cotangent.
#[derive(Clone, Copy)]
pub(in crate::cpu) struct Head<'a> {
    pub(in crate::cpu) hidden: &'a [f32],
    pub(in crate::cpu) weight: &'a [f32],
    pub(in crate::cpu) labels: &'a [f32],
    pub(in crate::cpu) cotangent: &'a [f32],
}

/// What the head computes: per token its loss, and the gradients of `hidden` and `weight`
/// (their shapes).
pub(in crate::cpu) struct HeadResults<'a> {
    pub(in crate::cpu) loss: &'a mut [f32],
    pub(in crate::cpu) hidden_grad: &'a mut [f32],
    pub(in crate::cpu) weight_grad: &'a mut [f32],
}

/// The packed `dlogitsᵀ`, filled by the chunks at disjoint K pairs.
#[derive(Clone, Copy)]
struct SharedPanels(*mut u32);

// SAFETY: each chunk writes the pairs of its own tokens only.
unsafe impl Send for SharedPanels {}
unsafe impl Sync for SharedPanels {}

impl SharedPanels {
    /// The first packed pair (a method, so that closures capture the whole wrapper).
    fn first(self) -> *mut u32 {
        self.0
    }
}

thread_local! {
    /// Each thread's chunk of logits and row of exponentials, kept between calls (fresh, they
    /// cost page faults on every run).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs the head over `width`-wide hidden states and a `vocab`-word vocabulary; see the module
/// documentation.
///
/// # Safety
/// `super::supported()` holds.
pub(in crate::cpu) unsafe fn linear_cross_entropy(
    head: Head<'_>,
    (width, vocab): (usize, usize),
    results: HeadResults<'_>,
) {
    let tokens = head.labels.len();
    assert!(width > 0 && vocab > 0);
    assert!(head.hidden.len() == tokens * width && head.weight.len() == vocab * width);
    assert!(head.cotangent.len() == tokens && results.loss.len() == tokens);
    assert!(results.hidden_grad.len() == tokens * width);
    assert!(results.weight_grad.len() == vocab * width);
    let (width_pairs, vocab_pairs, token_pairs) =
        (width.div_ceil(2), vocab.div_ceil(2), tokens.div_ceil(2));
    let (vocab_panels, width_panels) = (vocab.div_ceil(NR), width.div_ceil(NR));
    let mut buffers = [packing_buffer(), packing_buffer(), packing_buffer()];
    let [logits_weight, grad_weight, transposed_grad] = &mut buffers;
    // `Wᵀ` for the logits (K = width) and `W` for `dh` (K = vocab), as `rhs`.
    let logits_weight = lent(logits_weight, vocab_panels * width_pairs * NR);
    let grad_weight = lent(grad_weight, width_panels * vocab_pairs * NR);
    let transposed_grad = lent(transposed_grad, vocab.div_ceil(MR) * token_pairs * MR);
    let w = head.weight.as_ptr();
    // SAFETY: `W` is vocab × width, row-major (asserted above); `supported()` holds.
    unsafe {
        let transposed = Matrix::Strided((w, width as isize, 1));
        pack_operand(
            logits_weight,
            Source::rhs(transposed),
            (0..vocab, width),
            NR,
            true,
        );
        let as_is = Matrix::Strided((w, 1, width as isize));
        pack_operand(grad_weight, Source::rhs(as_is), (0..width, vocab), NR, true);
    }
    let (logits_weight, grad_weight) = (&logits_weight[..], &grad_weight[..]);
    let shared = SharedPanels(transposed_grad.as_mut_ptr());
    let chunks = results
        .loss
        .par_chunks_mut(ROWS_PER_CHUNK)
        .zip(results.hidden_grad.par_chunks_mut(ROWS_PER_CHUNK * width))
        .enumerate();
    chunks.for_each(|(chunk, (loss, hidden_grad))| {
        let first = chunk * ROWS_PER_CHUNK;
        let rows = loss.len();
        let panels = rows.div_ceil(MR);
        let mut scratch = SCRATCH.take();
        scratch.resize(rows * vocab + vocab, 0.0);
        let (logits, exponentials) = scratch.split_at_mut(rows * vocab);
        let mut packed = [packing_buffer(), packing_buffer()];
        let [hidden_rows, grad_rows] = &mut packed;
        let hidden_rows = lent(hidden_rows, panels * width_pairs * MR);
        let grad_rows = lent(grad_rows, panels * vocab_pairs * MR);
        let hidden = head.hidden[first * width..].as_ptr();
        // SAFETY: the chunk's rows of `hidden` and of the logits are inside them, the tiles of
        // the logits and of `hidden_grad` this chunk's own; `supported()` holds (the caller's
        // promise).
        unsafe {
            let hidden = Source::lhs(Matrix::Strided((hidden, 1, width as isize)));
            let layout = pack_operand(hidden_rows, hidden, (0..rows, width), MR, false);
            let out = Output::Strided((logits.as_mut_ptr(), 1, vocab as isize));
            let a = (&hidden_rows[..], layout);
            multiply_packed(
                (rows, vocab, width_pairs),
                out,
                a,
                logits_weight,
                false,
                false,
            );
        }
        for (r, x) in logits.chunks_exact_mut(vocab).enumerate() {
            let token = first + r;
            let (label, g) = (head.labels[token], head.cotangent[token]);
            loss[r] = cross_entropy::row_loss_and_gradient(x, exponentials, label, g);
        }
        // SAFETY: as above; the chunk's tokens are K pairs `first / 2..` of `dlogitsᵀ`, which
        // no other chunk packs (chunks start at even tokens).
        unsafe {
            let grad = Source::lhs(Matrix::Strided((logits.as_ptr(), 1, vocab as isize)));
            let layout = pack_operand(grad_rows, grad, (0..rows, vocab), MR, false);
            let out = Output::Strided((hidden_grad.as_mut_ptr(), 1, width as isize));
            let a = (&grad_rows[..], layout);
            multiply_packed(
                (rows, width, vocab_pairs),
                out,
                a,
                grad_weight,
                false,
                false,
            );
            // Token t's row of the gradient at `runs.at(t)`: the chunk's rows from `first`.
            let runs = Runs::Strided(logits.as_ptr().wrapping_sub(first * vocab), vocab as isize);
            let pairs = first / 2..(first + rows).div_ceil(2);
            pack_pairs_side_by_side(shared.first(), runs, (vocab, tokens), MR, pairs);
        }
        give_back(packed);
        SCRATCH.set(scratch);
    });
    let mut hidden_buffer = packing_buffer();
    let packed_hidden = lent(&mut hidden_buffer, width_panels * token_pairs * NR);
    let out = Output::Strided((results.weight_grad.as_mut_ptr(), 1, width as isize));
    // SAFETY: `hidden` is tokens × width, row-major, `dW` vocab × width; `dlogitsᵀ` packed
    // over every token's pair by the chunks; `supported()` holds.
    unsafe {
        let hidden = Matrix::Strided((head.hidden.as_ptr(), 1, width as isize));
        pack_operand(
            packed_hidden,
            Source::rhs(hidden),
            (0..width, tokens),
            NR,
            true,
        );
        let grad = (&transposed_grad[..], Layout::Panels);
        multiply_packed(
            (vocab, width, token_pairs),
            out,
            grad,
            packed_hidden,
            false,
            true,
        );
    }
    give_back([hidden_buffer]);
    give_back(buffers);
}
