//! Strings and byte values decoded where they lie.
//!
//! A fresh hit of a `String`, a `Vec<u8>` or bytes (`get_or_load_bytes`)
//! stored by bincode is the 13-byte header, a length and the bytes
//! themselves. Rather than copy them through serde into a new buffer, the hit
//! moves them to the front of the buffer Redis handed over and keeps that
//! buffer: no second allocation, and a `Vec<u8>` is not decoded byte by byte.
//! A `String` is checked for UTF-8 once, as serde would.
//!
//! Anything else (another type, another codec, a payload that is not exactly
//! one length-prefixed run of bytes) goes through the codec as usual. The
//! stored bytes are consumed, so a leader that decoded in place encodes the
//! value again for its flight's followers, if it has any (`call.rs`).

use std::any::{Any, TypeId};

use super::bytes::Blob;
use crate::codec::{BincodeCodec, Codec, HEADER_LEN};
use crate::error::CodecError;

/// Decodes the stored value `bytes` (header included, and checked by the
/// caller with [`split_header`](crate::codec::split_header)) as `T` in place when
/// `T` is `String`, `Vec<u8>` or a [`Blob`] and the codec `C` is bincode
/// (the type, not only its id, which a codec of one's own could reuse):
/// `None` when it does not apply (then `bytes` is untouched), else the value,
/// or the error of a `String` that is not UTF-8 (then `bytes` is gone).
pub(super) fn decode<C: Codec, T: 'static>(bytes: &mut Vec<u8>) -> Option<Result<T, CodecError>> {
    let kind = TypeId::of::<T>();
    let string = kind == TypeId::of::<String>();
    if TypeId::of::<C>() != TypeId::of::<BincodeCodec>()
        || !(string || kind == TypeId::of::<Vec<u8>>() || kind == TypeId::of::<Blob>())
    {
        return None;
    }
    // The caller checked the header (`split_header`).
    let (len, prefix) = varint(bytes.get(HEADER_LEN..)?)?;
    let start = HEADER_LEN + prefix;
    if usize::try_from(len).ok()? != bytes.len() - start {
        return None;
    }
    bytes.drain(..start);
    let bytes = std::mem::take(bytes);
    // (Each cast succeeds: `kind` was checked above.)
    if string {
        return match String::from_utf8(bytes) {
            Ok(text) => cast(text).map(Ok),
            Err(e) => Some(Err(CodecError::Decode(format!("not UTF-8: {e}")))),
        };
    }
    if kind == TypeId::of::<Blob>() {
        cast(Blob(bytes)).map(Ok)
    } else {
        cast(bytes).map(Ok)
    }
}

/// `value` as a `T`, when it is one.
fn cast<T: 'static, V: 'static>(value: V) -> Option<T> {
    let mut slot = Some(value);
    (&mut slot as &mut dyn Any)
        .downcast_mut::<Option<T>>()
        .and_then(Option::take)
}

/// bincode's variable-length integer (standard configuration) at the start
/// of `bytes`: its value and its length. Below 251 a byte of its own; 251,
/// 252 and 253 announce a little-endian u16, u32 or u64.
fn varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let (&first, rest) = bytes.split_first()?;
    let read = |n: usize| -> Option<u64> {
        let mut le = [0u8; 8];
        le[..n].copy_from_slice(rest.get(..n)?);
        Some(u64::from_le_bytes(le))
    };
    match first {
        0..=250 => Some((u64::from(first), 1)),
        251 => Some((read(2)?, 3)),
        252 => Some((read(4)?, 5)),
        253 => Some((read(8)?, 9)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Meta, decode_with_meta, encode_with_meta};

    /// A codec of one's own that reuses bincode's id.
    struct Other;

    impl Codec for Other {
        const ID: u8 = b'b';
        fn encode_payload<T: serde::Serialize>(&self, _: &T) -> Result<Vec<u8>, CodecError> {
            Ok(Vec::new())
        }
        fn decode_payload<T: serde::de::DeserializeOwned>(
            &self,
            _: &[u8],
        ) -> Result<T, CodecError> {
            Err(CodecError::Decode("never".into()))
        }
    }

    fn stored<T: serde::Serialize>(value: &T) -> Vec<u8> {
        encode_with_meta(&BincodeCodec, value, &Meta::default()).unwrap()
    }

    #[test]
    fn strings_and_bytes_of_every_length_prefix_decode_as_the_codec_does() {
        // Lengths on both sides of each varint width.
        for len in [0, 1, 250, 251, 252, 65_535, 65_536, 70_000] {
            let text: String = "é".repeat(len / 2) + &"x".repeat(len % 2);
            let mut bytes = stored(&text);
            let (expected, _) = decode_with_meta::<_, String>(&BincodeCodec, &bytes).unwrap();
            let got: String = decode::<BincodeCodec, _>(&mut bytes).unwrap().unwrap();
            assert_eq!(got, expected);

            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut bytes = stored(&data);
            let got: Vec<u8> = decode::<BincodeCodec, _>(&mut bytes).unwrap().unwrap();
            assert_eq!(got, data);
            let mut bytes = stored(&data);
            let got: Blob = decode::<BincodeCodec, _>(&mut bytes).unwrap().unwrap();
            assert_eq!(got.0, data);
        }
    }

    #[test]
    fn other_types_codecs_and_shapes_are_left_to_the_codec() {
        let mut bytes = stored(&7_u64);
        assert!(decode::<BincodeCodec, u64>(&mut bytes).is_none());
        let mut bytes = stored(&"abc".to_owned());
        let before = bytes.clone();
        assert!(
            decode::<Other, String>(&mut bytes).is_none(),
            "another codec"
        );
        // A trailing byte, a short payload, a foreign header: untouched.
        let mut longer = before.clone();
        longer.push(0);
        assert!(decode::<BincodeCodec, String>(&mut longer).is_none());
        let mut shorter = before.clone();
        shorter.pop();
        assert!(decode::<BincodeCodec, String>(&mut shorter).is_none());
        let mut huge = stored(&"x".to_owned());
        huge.truncate(HEADER_LEN);
        huge.extend_from_slice(&[253, 255, 255, 255, 255, 255, 255, 255, 255]);
        assert!(decode::<BincodeCodec, String>(&mut huge).is_none());
        assert_eq!(bytes, before);
    }

    #[test]
    fn a_string_that_is_not_utf8_is_an_error() {
        let mut bytes = stored(&vec![0xff_u8, 0xfe]);
        let decoded = decode::<BincodeCodec, String>(&mut bytes).unwrap();
        assert!(decoded.is_err());
        // The codec agrees.
        let again = stored(&vec![0xff_u8, 0xfe]);
        assert!(decode_with_meta::<_, String>(&BincodeCodec, &again).is_err());
    }
}
