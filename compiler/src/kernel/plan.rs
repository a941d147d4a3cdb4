//! The memory plan: when each temporary buffer is alive, and which of them share storage.
//!
//! A temporary lives from the kernel that first writes it to the last kernel that reads it
//! (outputs, and the temporaries holding outputs' windows, to the end); a concatenation's
//! buffer, written a region at a time by several kernels (see `lower`), lives from the first
//! of them. Temporaries whose lifetimes do not
//! overlap share a *slot*: the plan walks kernels in order, frees the slots of buffers that died
//! and gives each new buffer the smallest free slot that fits it (growing the largest free one,
//! or opening a new slot, otherwise). Inputs, parameters and constants are the caller's memory
//! and not planned; a window is its temporary's.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{BufferId, BufferRole, Kernel, Program};

/// Index of a storage slot.
pub type SlotId = usize;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryPlan {
    /// For every buffer of the program: its slot, for temporaries.
    pub slot_of: Vec<Option<SlotId>>,
    /// Elements each slot holds (the largest buffer it serves).
    pub slot_elements: Vec<usize>,
    /// `(first kernel, last kernel)` of every temporary, by buffer index.
    pub lifetimes: Vec<Option<(usize, usize)>>,
    /// Bytes of temporaries if none shared storage.
    pub unshared_bytes: usize,
}

impl MemoryPlan {
    /// The plan for the kernels as the kernel IR says they run: each reads and writes its
    /// operands.
    pub fn of(program: &Program) -> Self {
        let touches: Vec<Vec<BufferId>> = program.kernels.iter().map(Kernel::touches).collect();
        Self::with_touches(program, &touches)
    }

    /// The plan for a backend that runs kernel `k` touching the buffers `touches[k]`, which
    /// may differ from the kernel IR's operands: the GPU's quantisation of an FP8 GEMM's
    /// operand reads the rounding's source in place of the rounding, which then runs nothing
    /// (`fathom_runtime::cuda`).
    pub fn with_touches(program: &Program, touches: &[Vec<BufferId>]) -> Self {
        let words: Vec<usize> = (program.buffers.iter()).map(|b| b.ty.numel()).collect();
        Self::with_touches_and_sizes(program, touches, &words)
    }

    /// [`MemoryPlan::with_touches`] for a backend that stores buffer `b` in `words[b]` 4-byte
    /// words instead of its elements (the GPU keeps some FP8 activations as codes).
    pub fn with_touches_and_sizes(
        program: &Program,
        touches: &[Vec<BufferId>],
        words: &[usize],
    ) -> Self {
        assert_eq!(words.len(), program.buffers.len(), "one size per buffer");
        assert_eq!(
            touches.len(),
            program.kernels.len(),
            "one list of buffers per kernel"
        );
        let n = program.buffers.len();
        let kernels = program.kernels.len();
        let mut lifetimes: Vec<Option<(usize, usize)>> = vec![None; n];
        for (k, touched) in touches.iter().enumerate() {
            for &b in touched {
                // A window is its temporary's storage.
                let (b, _) = program.holder(b);
                if matches!(program.buffer(b).role, BufferRole::Temporary) {
                    let life = lifetimes[b.index()].get_or_insert((k, k));
                    life.1 = life.1.max(k);
                }
            }
        }
        for (_, b) in &program.outputs {
            let (b, _) = program.holder(*b);
            if let Some(life) = &mut lifetimes[b.index()] {
                life.1 = kernels;
            }
        }
        // Buffers by the kernel that starts them.
        let mut starting: Vec<Vec<usize>> = vec![Vec::new(); kernels + 1];
        let mut ending: Vec<Vec<usize>> = vec![Vec::new(); kernels + 1];
        for (b, life) in lifetimes.iter().enumerate() {
            if let Some((first, last)) = life {
                starting[*first].push(b);
                ending[*last].push(b);
            }
        }
        let mut slot_of = vec![None; n];
        let mut slot_elements: Vec<usize> = Vec::new();
        let mut free: Vec<SlotId> = Vec::new();
        let mut unshared_bytes = 0;
        for k in 0..=kernels {
            for &b in &starting[k] {
                let need = words[b];
                unshared_bytes += need * 4;
                let fitting = free
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| slot_elements[**s] >= need)
                    .min_by_key(|(_, s)| slot_elements[**s])
                    .map(|(i, _)| i);
                let slot = match fitting.or_else(|| {
                    // Grow the largest free slot rather than open a new one.
                    free.iter()
                        .enumerate()
                        .max_by_key(|(_, s)| slot_elements[**s])
                        .map(|(i, _)| i)
                }) {
                    Some(i) => free.swap_remove(i),
                    None => {
                        slot_elements.push(0);
                        slot_elements.len() - 1
                    }
                };
                slot_elements[slot] = slot_elements[slot].max(need);
                slot_of[b] = Some(slot);
            }
            // Freed after the kernel: a kernel may read and write different buffers that
            // must not share storage.
            for &b in &ending[k] {
                if let Some(slot) = slot_of[b] {
                    free.push(slot);
                }
            }
        }
        MemoryPlan {
            slot_of,
            slot_elements,
            lifetimes,
            unshared_bytes,
        }
    }

    /// Bytes of temporary storage the program needs (every buffer is held as 4-byte values).
    pub fn peak_bytes(&self) -> usize {
        self.slot_elements.iter().sum::<usize>() * 4
    }
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "memory plan: {} slots, {} bytes of temporaries ({} without sharing)",
            self.slot_elements.len(),
            self.peak_bytes(),
            self.unshared_bytes
        )?;
        for (b, (slot, life)) in self.slot_of.iter().zip(&self.lifetimes).enumerate() {
            if let (Some(slot), Some((first, last))) = (slot, life) {
                writeln!(f, "  b{b}: slot {slot}, kernels {first}..={last}")?;
            }
        }
        Ok(())
    }
}
