use std::fs;
use std::path::Path;

use tempfile::TempDir;

use super::rows;
use crate::data::{Batches, ByteTokenizer, DataError, DataPosition, TextDataset};

/// a.txt "abcdefg", b.txt "hijklmnop", sub/c.txt "qrs", and what must be skipped: an empty
/// file, a hidden file and a hidden directory.
fn corpus() -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::write(root.join("b.txt"), "hijklmnop").unwrap();
    fs::write(root.join("a.txt"), "abcdefg").unwrap();
    fs::write(root.join("e.txt"), "").unwrap();
    fs::write(root.join(".hidden"), "HIDDEN").unwrap();
    fs::create_dir(root.join(".git")).unwrap();
    fs::write(root.join(".git").join("HEAD"), "GITGIT").unwrap();
    fs::create_dir(root.join("sub")).unwrap();
    fs::write(root.join("sub").join("c.txt"), "qrs").unwrap();
    dir
}

fn text_rows(data: &mut TextDataset) -> Vec<String> {
    let batch = data.next_batch().unwrap();
    assert_eq!(batch.dims(), &[data.batch_shape().0, data.batch_shape().1]);
    rows(&batch)
        .iter()
        .map(|r| ByteTokenizer.decode(r))
        .collect()
}

fn text_pos(epoch: u64, file_index: usize, byte_offset: u64) -> DataPosition {
    DataPosition::Text {
        epoch,
        file_index,
        byte_offset,
    }
}

#[test]
fn files_are_sorted_and_filtered() {
    let dir = corpus();
    let data = TextDataset::open(dir.path(), 2, 4).unwrap();
    let names: Vec<_> = data
        .files()
        .iter()
        .map(|p| p.strip_prefix(dir.path()).unwrap().to_path_buf())
        .collect();
    assert_eq!(
        names,
        [
            Path::new("a.txt"),
            Path::new("b.txt"),
            Path::new("sub/c.txt")
        ]
    );
    assert_eq!(data.tokens(), 19);
    assert_eq!(data.windows_per_epoch(), 4);
}

#[test]
fn windows_cross_files_and_wrap_around() {
    let dir = corpus();
    let mut data = TextDataset::open(dir.path(), 2, 4).unwrap();
    assert_eq!(data.position(), text_pos(0, 0, 0));
    // "efgh" spans a.txt and b.txt.
    assert_eq!(text_rows(&mut data), ["abcd", "efgh"]);
    assert_eq!(data.position(), text_pos(0, 1, 1));
    assert_eq!(text_rows(&mut data), ["ijkl", "mnop"]);
    // Only "qrs" is left: too short for a window, dropped; the next epoch starts.
    assert_eq!(data.position(), text_pos(1, 0, 0));
    assert_eq!(data.epoch(), 1);
    assert_eq!(text_rows(&mut data), ["abcd", "efgh"]);

    // Batches of 3 windows straddle the epoch boundary.
    let mut data = TextDataset::open(dir.path(), 3, 4).unwrap();
    assert_eq!(text_rows(&mut data), ["abcd", "efgh", "ijkl"]);
    assert_eq!(text_rows(&mut data), ["mnop", "abcd", "efgh"]);
    assert_eq!(data.position(), text_pos(1, 1, 1));
    assert_eq!(text_rows(&mut data), ["ijkl", "mnop", "abcd"]);
    assert_eq!(data.epoch(), 2);
}

#[test]
fn a_single_file_and_exact_fit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("one.txt");
    fs::write(&path, "0123456789ab").unwrap();
    let mut data = TextDataset::open(&path, 1, 6).unwrap();
    assert_eq!(data.files(), std::slice::from_ref(&path));
    assert_eq!(text_rows(&mut data), ["012345"]);
    assert_eq!(text_rows(&mut data), ["6789ab"]);
    assert_eq!(data.position(), text_pos(1, 0, 0));
    // A window as long as the whole data.
    let mut data = TextDataset::open(&path, 2, 12).unwrap();
    assert_eq!(text_rows(&mut data), ["0123456789ab", "0123456789ab"]);
    assert_eq!(data.epoch(), 2);
}

#[test]
fn resuming_from_a_saved_position_gives_the_same_batches() {
    let dir = corpus();
    let mut straight = TextDataset::open(dir.path(), 3, 5).unwrap();
    let expected: Vec<_> = (0..7).map(|_| straight.next_batch().unwrap()).collect();

    for stop in 0..7 {
        let mut first = TextDataset::open(dir.path(), 3, 5).unwrap();
        for batch in &expected[..stop] {
            assert_eq!(&first.next_batch().unwrap(), batch);
        }
        let saved = serde_json::to_string(&first.position()).unwrap();
        drop(first);

        let mut resumed = TextDataset::open(dir.path(), 3, 5).unwrap();
        resumed
            .seek(&serde_json::from_str(&saved).unwrap())
            .unwrap();
        for batch in &expected[stop..] {
            assert_eq!(&resumed.next_batch().unwrap(), batch);
        }
        assert_eq!(resumed.position(), straight.position());
    }
}

#[test]
fn position_json() {
    let json = serde_json::to_value(text_pos(2, 1, 7)).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"source": "text", "epoch": 2, "file_index": 1, "byte_offset": 7})
    );
}

#[test]
fn seek_rejects_foreign_positions() {
    let dir = corpus();
    let mut data = TextDataset::open(dir.path(), 1, 4).unwrap();
    for bad in [
        DataPosition::Synthetic { batch_index: 3 },
        text_pos(0, 3, 0), // no fourth file
        text_pos(0, 0, 7), // a.txt has 7 bytes
        text_pos(0, 2, 0), // only "qrs" left: less than a window
    ] {
        let err = data.seek(&bad).unwrap_err();
        assert!(matches!(err, DataError::InvalidPosition { .. }), "{err}");
        assert!(
            err.to_string().contains(&dir.path().display().to_string()),
            "{err}"
        );
    }
    assert_eq!(data.position(), text_pos(0, 0, 0));
    // Any position with a window left after it is accepted.
    data.seek(&text_pos(5, 1, 8)).unwrap();
    assert_eq!(text_rows(&mut data), ["pqrs"]);
    assert_eq!(data.position(), text_pos(6, 0, 0));
}

fn assert_names(err: &DataError, path: &Path) {
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();

    let missing = dir.path().join("missing.txt");
    let err = TextDataset::open(&missing, 1, 4).unwrap_err();
    assert!(matches!(err, DataError::NotFound { .. }), "{err}");
    assert_names(&err, &missing);

    let empty = dir.path().join("empty.txt");
    fs::write(&empty, "").unwrap();
    let err = TextDataset::open(&empty, 1, 4).unwrap_err();
    assert!(matches!(err, DataError::EmptyFile { .. }), "{err}");
    assert_names(&err, &empty);

    let short = dir.path().join("short.txt");
    fs::write(&short, "abc").unwrap();
    let err = TextDataset::open(&short, 1, 4).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::TooShort {
                tokens: 3,
                seq: 4,
                ..
            }
        ),
        "{err}"
    );
    assert_names(&err, &short);
    assert!(err.to_string().contains("3 tokens"), "{err}");
    TextDataset::open(&short, 1, 3).unwrap();

    for (batch, seq) in [(1, 0), (0, 4)] {
        let err = TextDataset::open(&short, batch, seq).unwrap_err();
        assert!(matches!(err, DataError::InvalidShape { .. }), "{err}");
        assert_names(&err, &short);
    }

    // A directory with nothing but an empty and a hidden file.
    let nothing = dir.path().join("nothing");
    fs::create_dir(&nothing).unwrap();
    let err = TextDataset::open(&nothing, 1, 4).unwrap_err();
    assert!(matches!(err, DataError::NoData { .. }), "{err}");
    fs::write(nothing.join("empty"), "").unwrap();
    fs::write(nothing.join(".hidden"), "data").unwrap();
    let err = TextDataset::open(&nothing, 1, 4).unwrap_err();
    assert!(matches!(err, DataError::NoData { .. }), "{err}");
    assert_names(&err, &nothing);

    // Too short over the whole directory.
    fs::write(nothing.join("x"), "ab").unwrap();
    let err = TextDataset::open(&nothing, 1, 4).unwrap_err();
    assert!(
        matches!(err, DataError::TooShort { tokens: 2, .. }),
        "{err}"
    );
    assert_names(&err, &nothing);
}

#[test]
fn a_read_error_names_the_file_and_keeps_the_position() {
    let dir = corpus();
    let mut data = TextDataset::open(dir.path(), 2, 4).unwrap();
    // b.txt shrinks after the dataset took its length: "ijkl" cannot be read.
    let b = dir.path().join("b.txt");
    fs::write(&b, "hi").unwrap();
    assert_eq!(text_rows(&mut data), ["abcd", "efgh"]);
    let err = data.next_batch().unwrap_err();
    assert!(matches!(err, DataError::Io { .. }), "{err}");
    assert_names(&err, &b);
    assert_eq!(data.position(), text_pos(0, 1, 1));
    // Restored, the batch reads again.
    fs::write(&b, "hijklmnop").unwrap();
    assert_eq!(text_rows(&mut data), ["ijkl", "mnop"]);
}
