//! Strings and byte values decoded where they lie.
//!
//! A fresh hit of a `String`, a `Vec<u8>` or bytes (`get_or_load_bytes`),
//! or of one of them behind an `Arc` (`get_or_load_shared`), stored by bincode is the 13-byte header, a length and the bytes
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

use std::sync::Arc;

use super::bytes::Blob;
use super::shared::Shared;
use crate::codec::{BincodeCodec, Codec, HEADER_LEN};
use crate::error::CodecError;

/// Decodes the stored value `bytes` (header included, and checked by the
/// caller with [`split_header`](crate::codec::split_header)) as `T` in place when
/// `T` is `String`, `Vec<u8>` or a [`Blob`] (or `Shared` `String` or
/// `Vec<u8>`) and the codec `C` is bincode
/// (the type, not only its id, which a codec of one's own could reuse):
/// `None` when it does not apply (then `bytes` is untouched), else the value,
/// or the error of a `String` that is not UTF-8 (then `bytes` is gone).
pub(super) fn decode<C: Codec, T: 'static>(bytes: &mut Vec<u8>) -> Option<Result<T, CodecError>> {
    let kind = TypeId::of::<T>();
    let shared_string = kind == TypeId::of::<Shared<String>>();
    let shared_bytes = kind == TypeId::of::<Shared<Vec<u8>>>();
    let string = kind == TypeId::of::<String>() || shared_string;
    if TypeId::of::<C>() != TypeId::of::<BincodeCodec>()
        || !(string
            || shared_bytes
            || kind == TypeId::of::<Vec<u8>>()
            || kind == TypeId::of::<Blob>())
    {
        return None;
    }
    // The caller checked the header (`split_header`); a marked value's marks
    // come before the payload.
    let offset = if bytes.get(4).is_some_and(|flags| flags & 2 != 0) {
        crate::codec::payload_offset(bytes)
    } else {
        HEADER_LEN
    };
    let (len, prefix) = varint(bytes.get(offset..)?)?;
    let start = offset + prefix;
    if usize::try_from(len).ok()? != bytes.len() - start {
        return None;
    }
    // The payload to the front (`drain` does the same through a guard that
    // costs a hit about 100 instructions more).
    bytes.copy_within(start.., 0);
    bytes.truncate(bytes.len() - start);
    let bytes = std::mem::take(bytes);
    // (Each cast succeeds: `kind` was checked above.)
    if string {
        return match utf8(bytes) {
            Ok(text) if shared_string => cast(Shared(Arc::new(text))).map(Ok),
            Ok(text) => cast(text).map(Ok),
            Err(e) => Some(Err(CodecError::Decode(format!("not UTF-8: {e}")))),
        };
    }
    if kind == TypeId::of::<Blob>() {
        cast(Blob(bytes)).map(Ok)
    } else if shared_bytes {
        cast(Shared(Arc::new(bytes))).map(Ok)
    } else {
        cast(bytes).map(Ok)
    }
}

/// `bytes` as a `String`, checked for UTF-8 as [`String::from_utf8`] does,
/// several times faster: simdutf8 checks 32 or 64 bytes at a step where std
/// checks 16 (a 1 KiB value: about 100 instructions instead of 500, a
/// twentieth of a hit). An invalid one gets std's error, which says where.
#[allow(unsafe_code)]
fn utf8(bytes: Vec<u8>) -> Result<String, std::string::FromUtf8Error> {
    if simdutf8::basic::from_utf8(&bytes).is_ok() {
        // SAFETY: simdutf8 has just checked that these very bytes are UTF-8
        // (it validates as `std::str::from_utf8` does, and its tests compare
        // the two); `utf8_agrees_with_std` below checks that it does here.
        return Ok(unsafe { String::from_utf8_unchecked(bytes) });
    }
    String::from_utf8(bytes)
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
    fn shared_strings_and_bytes_decode_in_place_too() {
        let text = "é".repeat(300);
        let mut bytes = stored(&text);
        let got: Shared<String> = decode::<BincodeCodec, _>(&mut bytes).unwrap().unwrap();
        assert_eq!(*got.0, text);
        let data: Vec<u8> = (0..300).map(|i| i as u8).collect();
        let mut bytes = stored(&data);
        let got: Shared<Vec<u8>> = decode::<BincodeCodec, _>(&mut bytes).unwrap().unwrap();
        assert_eq!(*got.0, data);
        let mut bytes = stored(&vec![0xff_u8]);
        assert!(
            decode::<BincodeCodec, Shared<String>>(&mut bytes)
                .unwrap()
                .is_err()
        );
        let mut bytes = stored(&7_u64);
        assert!(decode::<BincodeCodec, Shared<u64>>(&mut bytes).is_none());
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

    /// The fast UTF-8 check accepts exactly what std accepts: every string of
    /// up to 2 bytes, 3- and 4-byte sequences around every lead byte, and
    /// valid text (and the same with one byte changed) at every third length
    /// up to 400 bytes, across simdutf8's 64-byte blocks.
    #[test]
    fn utf8_agrees_with_std() {
        let mut cases: Vec<Vec<u8>> = vec![Vec::new()];
        for a in 0..=255_u8 {
            cases.push(vec![a]);
            for b in 0..=255_u8 {
                cases.push(vec![a, b]);
                if a >= 0xc0 || b >= 0xc0 {
                    cases.push(vec![a, b, 0x80]);
                    cases.push(vec![0xe0 | (a & 0x0f), b, 0x80]);
                    cases.push(vec![0xf0 | (a & 0x07), b, 0x80, 0x80]);
                }
            }
        }
        let text = "aé€😀".repeat(40);
        let mut rng = fastrand::Rng::with_seed(7);
        for len in (0..=text.len()).step_by(3) {
            let valid = text.as_bytes()[..len].to_vec();
            cases.push(valid.clone());
            for _ in 0..4 {
                let mut broken = valid.clone();
                if !broken.is_empty() {
                    let at = rng.usize(..broken.len());
                    broken[at] = rng.u8(..);
                }
                cases.push(broken);
            }
        }
        for case in cases {
            let std = String::from_utf8(case.clone());
            let ours = utf8(case.clone());
            assert_eq!(ours.is_ok(), std.is_ok(), "{case:?}");
            if let Ok(text) = ours {
                assert_eq!(text.as_bytes(), &case[..]);
            }
        }
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
