use crate::data::{ByteTokenizer, DataError};

#[test]
fn round_trip_of_multi_byte_utf8() {
    let text = "héllo, 世界 🦀\n\ttab";
    let ids = ByteTokenizer.encode(text);
    assert_eq!(ids.len(), text.len()); // one token per byte, not per char
    assert!(ids.iter().all(|&id| (0..256).contains(&id)));
    assert_eq!(&ids[..3], &[104, 0xC3, 0xA9]); // 'h', then 'é' as two bytes
    assert_eq!(ByteTokenizer.decode(&ids), text);
    assert_eq!(ByteTokenizer.encode_bytes(&[0, 255]), vec![0, 255]);
}

#[test]
fn decode_is_lossy() {
    // '世' is E4 B8 96: cut after two bytes.
    assert_eq!(ByteTokenizer.decode(&[0x61, 0xE4, 0xB8]), "a\u{FFFD}");
    assert_eq!(
        ByteTokenizer.decode(&[0x61, 300, -1, 0x62]),
        "a\u{FFFD}\u{FFFD}b"
    );
    assert_eq!(ByteTokenizer.decode(&[]), "");
}

#[test]
fn vocab_check() {
    ByteTokenizer::check_vocab(256).unwrap();
    ByteTokenizer::check_vocab(129_280).unwrap();
    let err = ByteTokenizer::check_vocab(64).unwrap_err();
    assert!(matches!(
        err,
        DataError::VocabTooSmall {
            needed: 256,
            vocab_size: 64,
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        "a byte-level tokenizer needs vocab_size >= 256, the model has 64"
    );
}
