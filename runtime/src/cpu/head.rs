//! The language-model head and its loss in one call (`Library::LinearCrossEntropy`): on the
//! bf16 kernel in chunks of tokens whose logits stay in cache (`super::bf16::head`, bit for bit
//! the five kernels' values); elsewhere (a program lowered for a CPU with the kernel, run where
//! it is off) as the five kernels it stands for, one after another, on temporaries of its own:
//! a fallback, not a fast path.

use gemm::Parallelism;

use super::bf16::{self, Head, HeadResults};
use super::cross_entropy;
use super::product::{Arithmetic, multiply};

/// `head`'s loss per token and gradients, with its products summed as `arithmetic` says, for
/// `width`-wide hidden states over a `vocab`-word vocabulary.
pub(super) fn linear_cross_entropy(
    head: Head<'_>,
    (width, vocab): (usize, usize),
    arithmetic: Arithmetic,
    results: HeadResults<'_>,
) {
    if arithmetic.on_bf16_kernel() {
        // SAFETY: `on_bf16_kernel` implies the kernel's CPU support.
        return unsafe { bf16::linear_cross_entropy(head, (width, vocab), results) };
    }
    step_by_step(head, (width, vocab), arithmetic, results);
}

/// [`linear_cross_entropy`] as the matmul, the cross-entropy keeping its exponentials, its
/// gradient and the gradient's two matmuls, each whole.
fn step_by_step(
    head: Head<'_>,
    (width, vocab): (usize, usize),
    arithmetic: Arithmetic,
    results: HeadResults<'_>,
) {
    let Head {
        hidden,
        weight,
        labels,
        cotangent,
    } = head;
    let tokens = labels.len();
    assert!(hidden.len() == tokens * width && weight.len() == vocab * width);
    assert!(results.hidden_grad.len() == tokens * width);
    assert!(results.weight_grad.len() == vocab * width);
    let (w, v) = (width as isize, vocab as isize);
    let mut logits = vec![0f32; tokens * vocab];
    // SAFETY (each product): the operands are the row-major matrices their strides describe
    // (asserted above), the destination a fresh buffer or a result of its own.
    unsafe {
        multiply(
            (tokens, vocab, width),
            (logits.as_mut_ptr(), 1, v),
            (hidden.as_ptr(), 1, w),
            (weight.as_ptr(), w, 1),
            arithmetic,
            Parallelism::Rayon(0),
        );
    }
    let (mut exponentials, mut sums) = (vec![0f32; tokens * vocab], vec![0f32; tokens]);
    let kept = Some((&mut exponentials[..], &mut sums[..]));
    cross_entropy::forward(&logits, labels, vocab, results.loss, kept);
    let dlogits = &mut logits;
    cross_entropy::gradient((&exponentials, &sums), labels, cotangent, vocab, dlogits);
    unsafe {
        multiply(
            (tokens, width, vocab),
            (results.hidden_grad.as_mut_ptr(), 1, w),
            (dlogits.as_ptr(), 1, v),
            (weight.as_ptr(), 1, w),
            arithmetic,
            Parallelism::Rayon(0),
        );
        multiply(
            (vocab, width, tokens),
            (results.weight_grad.as_mut_ptr(), 1, w),
            (dlogits.as_ptr(), v, 1),
            (hidden.as_ptr(), 1, w),
            arithmetic,
            Parallelism::Rayon(0),
        );
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::{Arithmetic, Head, HeadResults, linear_cross_entropy, step_by_step};

    /// The chunked routine writes the bits the five kernels write, over shapes that are not
    /// whole chunks, panels or K blocks: an odd token count (the last chunk ends in half a
    /// pair of `dlogitsᵀ`), an odd width (the logits' K completed with a zero), vocabularies
    /// of one and of several K blocks of `dh`; labels ignored (negative) and out of range;
    /// cotangents ten orders of magnitude apart, so that a sum in another order shows.
    #[test]
    fn the_chunked_head_writes_the_bits_of_the_five_kernels() {
        let Some(arithmetic) = Arithmetic::bf16_kernel_or_skip() else {
            return;
        };
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for (tokens, width, vocab) in [(53, 71, 300), (48, 64, 33), (2, 5, 7), (97, 40, 1100)] {
            let mut values = |len: usize, scale: f32| -> Vec<f32> {
                (0..len).map(|_| rng.random_range(-scale..scale)).collect()
            };
            let hidden = values(tokens * width, 2.0);
            let weight = values(vocab * width, 1.0);
            let cotangent: Vec<f32> = values(tokens, 1.0)
                .iter()
                .enumerate()
                .map(|(t, g)| g * 10f32.powi(t as i32 % 11 - 5))
                .collect();
            let labels: Vec<f32> = (0..tokens)
                .map(|t| match t % 13 {
                    3 => -1.0,
                    7 => vocab as f32,
                    _ => ((t * 31 + 5) % vocab) as f32,
                })
                .collect();
            let head = Head {
                hidden: &hidden,
                weight: &weight,
                labels: &labels,
                cotangent: &cotangent,
            };
            let run = |chunked: bool| {
                let mut loss = vec![f32::NAN; tokens];
                let mut hidden_grad = vec![f32::NAN; tokens * width];
                let mut weight_grad = vec![f32::NAN; vocab * width];
                let results = HeadResults {
                    loss: &mut loss,
                    hidden_grad: &mut hidden_grad,
                    weight_grad: &mut weight_grad,
                };
                if chunked {
                    linear_cross_entropy(head, (width, vocab), arithmetic, results);
                } else {
                    step_by_step(head, (width, vocab), arithmetic, results);
                }
                [loss, hidden_grad, weight_grad].map(|v| v.iter().map(|x| x.to_bits()).collect())
            };
            let (chunked, kernels): ([Vec<u32>; 3], _) = (run(true), run(false));
            for (what, (got, want)) in ["loss", "dh", "dW"]
                .iter()
                .zip(chunked.iter().zip(&kernels))
            {
                let first = got.iter().zip(want).position(|(g, w)| g != w);
                assert_eq!(first, None, "{what} of ({tokens}, {width}, {vocab})");
            }
            if tokens > 7 {
                // An out-of-range label's loss is +∞, an ignored one's 0.
                assert!(f32::from_bits(kernels[0][7]).is_infinite() && kernels[0][3] == 0);
            }
        }
    }
}
