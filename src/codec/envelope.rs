//! The header in front of every stored value: magic bytes, format version, codec id.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Codec;
use crate::error::CodecError;

/// The two bytes every locked-cache value starts with.
pub const MAGIC: [u8; 2] = [0xC7, 0x4C];
/// The header format this build writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Length of the header in bytes.
pub const HEADER_LEN: usize = 4;

/// Encodes `value` with `codec` behind the locked-cache header.
pub fn encode<C: Codec, T: Serialize>(codec: &C, value: &T) -> Result<Vec<u8>, CodecError> {
    let payload = codec.encode_payload(value)?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(&MAGIC);
    bytes.push(FORMAT_VERSION);
    bytes.push(C::ID);
    bytes.extend_from_slice(&payload);
    Ok(bytes)
}

/// Checks the header and decodes the payload with `codec`.
///
/// `bytes` may be anything (they come from Redis): with the built-in codecs a
/// corrupt payload of any size is a [`CodecError::Decode`], never a panic, a
/// stack overflow or an allocation failure (see [`decode_bounded`](super::decode_bounded)).
pub fn decode<C: Codec, T: DeserializeOwned>(codec: &C, bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() < HEADER_LEN || bytes[..2] != MAGIC {
        return Err(CodecError::ForeignBytes);
    }
    if bytes[2] != FORMAT_VERSION {
        return Err(CodecError::UnsupportedVersion(bytes[2]));
    }
    if bytes[3] != C::ID {
        return Err(CodecError::WrongCodec {
            found: bytes[3],
            expected: C::ID,
        });
    }
    codec.decode_payload(&bytes[HEADER_LEN..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::BincodeCodec;

    #[test]
    fn round_trip() {
        let bytes = encode(&BincodeCodec, &("hello", 42u64)).unwrap();
        assert_eq!(&bytes[..2], &MAGIC);
        let back: (String, u64) = decode(&BincodeCodec, &bytes).unwrap();
        assert_eq!(back, ("hello".to_string(), 42));
    }

    #[test]
    fn foreign_and_truncated_bytes_are_detected() {
        assert_eq!(
            decode::<_, u64>(&BincodeCodec, b"plain text"),
            Err(CodecError::ForeignBytes)
        );
        assert_eq!(
            decode::<_, u64>(&BincodeCodec, &[]),
            Err(CodecError::ForeignBytes)
        );
        let mut bytes = encode(&BincodeCodec, &"a longer string value").unwrap();
        bytes.truncate(bytes.len() - 3);
        assert!(matches!(
            decode::<_, String>(&BincodeCodec, &bytes),
            Err(CodecError::Decode(_))
        ));
    }

    #[test]
    fn other_version_and_codec_are_detected() {
        let mut bytes = encode(&BincodeCodec, &1u8).unwrap();
        bytes[2] = 9;
        assert_eq!(
            decode::<_, u8>(&BincodeCodec, &bytes),
            Err(CodecError::UnsupportedVersion(9))
        );
        bytes[2] = FORMAT_VERSION;
        bytes[3] = b'x';
        assert_eq!(
            decode::<_, u8>(&BincodeCodec, &bytes),
            Err(CodecError::WrongCodec {
                found: b'x',
                expected: b'b'
            })
        );
    }
}
