//! The byte-level tokenizer: token id = byte value.

use super::DataError;

/// One token per byte: text is its UTF-8 bytes, each byte `b` the token id `b` (`0..=255`). No
/// special tokens (no BOS/EOS/padding): documents are simply concatenated. Needs a model
/// vocabulary of at least [`VOCAB_SIZE`](ByteTokenizer::VOCAB_SIZE) entries; larger vocabularies
/// work too, the ids above 255 are never produced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    /// The number of distinct ids produced: one per byte value.
    pub const VOCAB_SIZE: usize = 256;

    /// The token ids of `text`: its UTF-8 bytes.
    pub fn encode(&self, text: &str) -> Vec<i64> {
        self.encode_bytes(text.as_bytes())
    }

    /// The token ids of raw bytes.
    pub fn encode_bytes(&self, bytes: &[u8]) -> Vec<i64> {
        bytes.iter().map(|&b| i64::from(b)).collect()
    }

    /// The text of `ids`, lossily: byte sequences that are not UTF-8 (a multi-byte character cut
    /// in two, say) and ids outside `0..=255` each become U+FFFD.
    pub fn decode(&self, ids: &[i64]) -> String {
        let mut bytes = Vec::with_capacity(ids.len());
        for &id in ids {
            match u8::try_from(id) {
                Ok(b) => bytes.push(b),
                // The replacement character's own UTF-8 encoding, so from_utf8_lossy keeps it.
                Err(_) => bytes.extend_from_slice("\u{FFFD}".as_bytes()),
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Checks that a model with `vocab_size` embeddings can take byte tokens.
    pub fn check_vocab(vocab_size: usize) -> Result<(), DataError> {
        if vocab_size < Self::VOCAB_SIZE {
            return Err(DataError::VocabTooSmall {
                what: "a byte-level tokenizer".into(),
                needed: Self::VOCAB_SIZE,
                vocab_size,
            });
        }
        Ok(())
    }
}
