//! Training data: where the token batches a trainer consumes come from.
//!
//! - [`ByteTokenizer`]: one token per byte (ids `0..=255`), so any text trains any model whose
//!   vocabulary has at least 256 entries, with no vocabulary file.
//! - [`TextDataset`]: a text file or a directory of them, cut into consecutive windows of `seq`
//!   byte tokens and served as `i64 [batch, seq]` batches, wrapping around at the end.
//! - [`SyntheticTask`]: deterministic generated sequences that a tiny model learns within a few
//!   hundred steps, with a known loss floor, for smoke-testing training end to end.
//!
//! Both sources implement [`Batches`], the interface a trainer pulls from. Batches hold the token
//! ids only: the model's next-token loss shifts them itself (as `transformers` does with
//! `labels = input_ids`), so there is no separate label tensor. A source's [`DataPosition`] is
//! small and serialisable, so a checkpoint can store it and a resumed run, after
//! [`Batches::seek`], sees exactly the batches an uninterrupted run would have seen.

mod synthetic;
mod text;
mod tokenizer;

#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::tensor::HostTensor;

pub use synthetic::{SyntheticBatches, SyntheticKind, SyntheticTask};
pub use text::TextDataset;
pub use tokenizer::ByteTokenizer;

/// A source of training batches: each call to [`next_batch`](Batches::next_batch) returns the
/// next `i64 [batch, seq]` tensor of token ids.
pub trait Batches {
    /// The next batch, `i64 [batch, seq]`. Sources never run dry: they wrap around (text) or
    /// generate forever (synthetic).
    fn next_batch(&mut self) -> Result<HostTensor, DataError>;

    /// `(batch, seq)`: the shape of every batch this source returns.
    fn batch_shape(&self) -> (usize, usize);

    /// Where the next batch will start. Store it with a checkpoint and hand it back to
    /// [`seek`](Batches::seek) to resume.
    fn position(&self) -> DataPosition;

    /// Moves to a position returned by [`position`](Batches::position) of the same source (same
    /// files, or same task and seed); the following batches are the ones that followed it there.
    fn seek(&mut self, position: &DataPosition) -> Result<(), DataError>;
}

impl<B: Batches + ?Sized> Batches for Box<B> {
    fn next_batch(&mut self) -> Result<HostTensor, DataError> {
        (**self).next_batch()
    }

    fn batch_shape(&self) -> (usize, usize) {
        (**self).batch_shape()
    }

    fn position(&self) -> DataPosition {
        (**self).position()
    }

    fn seek(&mut self, position: &DataPosition) -> Result<(), DataError> {
        (**self).seek(position)
    }
}

/// Where a data source stands: the start of its next batch. Serialised with a `source` tag,
/// e.g. `{"source":"text","epoch":1,"file_index":0,"byte_offset":4096}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum DataPosition {
    /// A [`TextDataset`]: the next window starts `byte_offset` bytes into file `file_index` (in
    /// the dataset's sorted file order) during pass `epoch` (0-based) over the data.
    Text {
        epoch: u64,
        file_index: usize,
        byte_offset: u64,
    },
    /// A [`SyntheticTask`]: the index of the next batch to generate.
    Synthetic { batch_index: u64 },
}

/// Everything that can go wrong reading training data. Errors about files name the path.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: no such file or directory", path.display())]
    NotFound { path: PathBuf },

    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{} is empty", path.display())]
    EmptyFile { path: PathBuf },

    #[error("{} holds no data: no non-empty, non-hidden regular file in it", path.display())]
    NoData { path: PathBuf },

    #[error(
        "{} holds {tokens} tokens, fewer than one sequence of {seq}",
        path.display()
    )]
    TooShort {
        path: PathBuf,
        tokens: u64,
        seq: usize,
    },

    /// `what` names the source: a path, or the synthetic task.
    #[error("{what}: batch and seq must both be positive, got batch {batch}, seq {seq}")]
    InvalidShape {
        what: String,
        batch: usize,
        seq: usize,
    },

    #[error("{what} needs vocab_size >= {needed}, the model has {vocab_size}")]
    VocabTooSmall {
        what: String,
        needed: usize,
        vocab_size: usize,
    },

    #[error("invalid synthetic task: {0}")]
    InvalidTask(String),

    /// A position that this source cannot have produced: another kind of source, a file index
    /// or offset outside the data (the files changed since), or too little data left after it.
    #[error("{what}: cannot seek to {position:?}: {reason}")]
    InvalidPosition {
        what: String,
        position: DataPosition,
        reason: String,
    },
}
