//! Text files cut into fixed-length windows of byte tokens.

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::{Batches, DataError, DataPosition};
use crate::tensor::HostTensor;

/// Batches of byte tokens ([`ByteTokenizer`](super::ByteTokenizer) ids) from a text file or a
/// directory of text files, for causal language-model training.
///
/// **Files.** A file path is used as is. A directory contributes every regular file under it,
/// recursively, skipping hidden entries (names starting with `.`, and everything under a hidden
/// directory), empty files and anything that is not a regular file; symbolic links to files are
/// followed, links to directories are not. Files are ordered by path, so the order does not
/// depend on the file system. Their lengths are taken once, when the dataset is opened.
///
/// **Windows.** The files are concatenated in that order, with no separator, into one stream of
/// tokens, cut into consecutive, non-overlapping windows of `seq` tokens; each window is one row
/// of a batch, and a batch is the next `batch` windows. A window may therefore span the end of
/// one file and the start of the next: the model sees a document boundary mid-sequence, which
/// is harmless for training. The last `tokens % seq` tokens, too few for a window, are dropped;
/// the stream then wraps around to the first file and `epoch` increases, so a batch may hold
/// the last windows of one epoch and the first of the next. Every epoch yields the same windows
/// in the same order (no shuffling).
///
/// **Memory.** Only the current file is open, read through a buffered reader, a window at a
/// time: a batch costs `batch × seq` bytes whatever the corpus size. Reading is sequential and
/// unshuffled, meant for small corpora and smoke tests, not for large-scale pre-training.
///
/// **Resuming.** [`position`](Batches::position) is where the next window starts;
/// [`seek`](Batches::seek) to it on a dataset opened on the same files with the same `seq` and
/// the batches that follow are those an uninterrupted run would have seen.
#[derive(Debug)]
pub struct TextDataset {
    root: PathBuf,
    files: Vec<PathBuf>,
    /// `starts[i]`: the stream offset of file `i`'s first byte; `starts[files.len()]` is the
    /// total length.
    starts: Vec<u64>,
    batch: usize,
    seq: usize,
    epoch: u64,
    file_index: usize,
    byte_offset: u64,
    /// `files[file_index]`, positioned at `byte_offset`, once read from.
    reader: Option<BufReader<File>>,
}

impl TextDataset {
    /// Opens `path` (a file or a directory, see the type's documentation) for batches of
    /// `batch` windows of `seq` tokens, at the start of epoch 0. Fails if `batch` or `seq` is
    /// 0, if the path is missing or unreadable, if it holds no data, or if the data is shorter
    /// than one window of `seq` tokens.
    pub fn open(path: impl AsRef<Path>, batch: usize, seq: usize) -> Result<Self, DataError> {
        let root = path.as_ref().to_path_buf();
        if batch == 0 || seq == 0 {
            return Err(DataError::InvalidShape {
                what: root.display().to_string(),
                batch,
                seq,
            });
        }
        let meta = fs::metadata(&root).map_err(|e| io_error(&root, e))?;
        let files = if meta.is_file() {
            if meta.len() == 0 {
                return Err(DataError::EmptyFile { path: root });
            }
            vec![(root.clone(), meta.len())]
        } else if meta.is_dir() {
            let mut files = Vec::new();
            collect_files(&root, &mut files)?;
            files.sort();
            files
        } else {
            Vec::new()
        };
        if files.is_empty() {
            return Err(DataError::NoData { path: root });
        }

        let mut starts = Vec::with_capacity(files.len() + 1);
        let mut total = 0u64;
        for (_, len) in &files {
            starts.push(total);
            total += len;
        }
        starts.push(total);
        if total < seq as u64 {
            return Err(DataError::TooShort {
                path: root,
                tokens: total,
                seq,
            });
        }
        Ok(TextDataset {
            root,
            files: files.into_iter().map(|(path, _)| path).collect(),
            starts,
            batch,
            seq,
            epoch: 0,
            file_index: 0,
            byte_offset: 0,
            reader: None,
        })
    }

    /// The files read, in order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Tokens (bytes) in one pass over the files, including the tail too short for a window.
    pub fn tokens(&self) -> u64 {
        self.starts[self.files.len()]
    }

    /// Windows (batch rows) in one epoch: `tokens / seq`.
    pub fn windows_per_epoch(&self) -> u64 {
        self.tokens() / self.seq as u64
    }

    /// The current epoch (0-based): how many times the data has been wrapped around.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    fn len_of(&self, file: usize) -> u64 {
        self.starts[file + 1] - self.starts[file]
    }

    /// Tokens from the current position to the end of the data.
    fn remaining(&self) -> u64 {
        self.tokens() - (self.starts[self.file_index] + self.byte_offset)
    }

    /// Reads the next window into `buf` (`seq` bytes) and moves past it, wrapping around to the
    /// next epoch when less than a window is left.
    fn read_window(&mut self, buf: &mut [u8]) -> Result<(), DataError> {
        let mut filled = 0;
        while filled < buf.len() {
            let left_in_file = self.len_of(self.file_index) - self.byte_offset;
            let path = &self.files[self.file_index];
            let reader = match &mut self.reader {
                Some(reader) => reader,
                slot @ None => {
                    let mut file = File::open(path).map_err(|e| io_error(path, e))?;
                    file.seek(SeekFrom::Start(self.byte_offset))
                        .map_err(|e| io_error(path, e))?;
                    slot.insert(BufReader::new(file))
                }
            };
            let n = (buf.len() - filled).min(usize::try_from(left_in_file).unwrap_or(usize::MAX));
            reader
                .read_exact(&mut buf[filled..filled + n])
                .map_err(|e| io_error(path, e))?;
            filled += n;
            self.byte_offset += n as u64;
            if self.byte_offset == self.len_of(self.file_index) {
                self.file_index += 1;
                self.byte_offset = 0;
                self.reader = None;
            }
        }
        if self.remaining() < self.seq as u64 {
            self.epoch += 1;
            self.file_index = 0;
            self.byte_offset = 0;
            self.reader = None;
        }
        Ok(())
    }
}

impl Batches for TextDataset {
    /// The next `batch` windows. On a read error the position is left where it was.
    fn next_batch(&mut self) -> Result<HostTensor, DataError> {
        let start = self.position();
        let mut values = Vec::with_capacity(self.batch * self.seq);
        let mut window = vec![0u8; self.seq];
        for _ in 0..self.batch {
            if let Err(e) = self.read_window(&mut window) {
                self.seek(&start)?;
                return Err(e);
            }
            values.extend(window.iter().map(|&b| i64::from(b)));
        }
        Ok(HostTensor::i64([self.batch, self.seq], values))
    }

    fn batch_shape(&self) -> (usize, usize) {
        (self.batch, self.seq)
    }

    fn position(&self) -> DataPosition {
        DataPosition::Text {
            epoch: self.epoch,
            file_index: self.file_index,
            byte_offset: self.byte_offset,
        }
    }

    /// Accepts any position inside the data with at least one window left after it (positions
    /// returned by [`position`](Batches::position) always are), so a position saved with
    /// another `batch` works too; `seq` must be the same for the same windows.
    fn seek(&mut self, position: &DataPosition) -> Result<(), DataError> {
        let invalid = |reason: String| DataError::InvalidPosition {
            what: self.root.display().to_string(),
            position: *position,
            reason,
        };
        let &DataPosition::Text {
            epoch,
            file_index,
            byte_offset,
        } = position
        else {
            return Err(invalid("not a text dataset position".into()));
        };
        if file_index >= self.files.len() {
            return Err(invalid(format!(
                "file {file_index} of {}: the files changed?",
                self.files.len()
            )));
        }
        let len = self.len_of(file_index);
        if byte_offset >= len {
            return Err(invalid(format!(
                "{} holds {len} bytes: the files changed?",
                self.files[file_index].display()
            )));
        }
        let left = self.tokens() - (self.starts[file_index] + byte_offset);
        if left < self.seq as u64 {
            return Err(invalid(format!(
                "{left} tokens left there, fewer than one sequence of {}",
                self.seq
            )));
        }
        self.epoch = epoch;
        self.file_index = file_index;
        self.byte_offset = byte_offset;
        self.reader = None;
        Ok(())
    }
}

/// `NotFound` for a missing path, `Io` for any other failure.
fn io_error(path: &Path, e: io::Error) -> DataError {
    if e.kind() == io::ErrorKind::NotFound {
        DataError::NotFound {
            path: path.to_path_buf(),
        }
    } else {
        DataError::Io {
            path: path.to_path_buf(),
            source: e,
        }
    }
}

/// Appends the non-empty, non-hidden regular files under `dir` (recursively) with their lengths.
fn collect_files(dir: &Path, out: &mut Vec<(PathBuf, u64)>) -> Result<(), DataError> {
    let entries = fs::read_dir(dir).map_err(|e| io_error(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| io_error(&path, e))?;
        if kind.is_dir() {
            collect_files(&path, out)?;
            continue;
        }
        // Follows a symbolic link; a link to a directory is not a file and is skipped.
        let meta = fs::metadata(&path).map_err(|e| io_error(&path, e))?;
        if meta.is_file() && meta.len() > 0 {
            out.push((path, meta.len()));
        }
    }
    Ok(())
}
