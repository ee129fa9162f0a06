//! How values become bytes in Redis and back.
//!
//! Every stored value starts with a 4-byte header: two magic bytes, the format
//! version and the codec's id. Bytes without the header (written by another
//! program), with an unknown version, or from another codec are reported as such
//! and never mis-decoded; the cache then treats the key as a miss and reloads it.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::CodecError;

/// The two bytes every locked-cache value starts with.
pub const MAGIC: [u8; 2] = [0xC7, 0x4C];
/// The header format this build writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Length of the header in bytes.
pub const HEADER_LEN: usize = 4;

/// Turns values into bytes and back. Implement it to store JSON, MessagePack or
/// your own format; [`BincodeCodec`] is the default.
///
/// The cache adds and checks the header itself; a codec only sees the payload.
pub trait Codec: Send + Sync + 'static {
    /// A byte naming this codec in the header, so that bytes from another codec
    /// are detected. `b'b'` and `b'j'` are taken by the built-in codecs.
    const ID: u8;

    /// Serialises `value` into the payload.
    fn encode_payload<T: Serialize>(&self, value: &T) -> Result<Vec<u8>, CodecError>;

    /// Deserialises a payload written by [`encode_payload`](Codec::encode_payload).
    fn decode_payload<T: DeserializeOwned>(&self, payload: &[u8]) -> Result<T, CodecError>;
}

/// serde + bincode 2 (standard configuration: little endian, variable-length
/// integers). Compact and fast; not self-describing, so a value of another type
/// may fail to decode or, rarely, decode as garbage of the right shape: keep one
/// type per key (or put the type in the key).
#[derive(Debug, Clone, Copy, Default)]
pub struct BincodeCodec;

impl Codec for BincodeCodec {
    const ID: u8 = b'b';

    fn encode_payload<T: Serialize>(&self, value: &T) -> Result<Vec<u8>, CodecError> {
        bincode::serde::encode_to_vec(value, bincode::config::standard())
            .map_err(|e| CodecError::Encode(e.to_string()))
    }

    fn decode_payload<T: DeserializeOwned>(&self, payload: &[u8]) -> Result<T, CodecError> {
        let (value, read) =
            decode_bounded(payload).map_err(|e| CodecError::Decode(e.to_string()))?;
        if read != payload.len() {
            return Err(CodecError::Decode(format!(
                "{} trailing bytes after the value",
                payload.len() - read
            )));
        }
        Ok(value)
    }
}

/// In memory, a decoded value claims at most 16 bytes per encoded byte (a
/// varint-encoded `u128`); bincode's allocation limit is set to twice that.
const DECODE_BUDGET: usize = 32;

/// Decodes with bincode's allocation limit at [`DECODE_BUDGET`] times the
/// payload's size (rounded up to 1, 16 or 256 MiB or 1 GiB), so that a corrupt
/// length prefix (foreign or truncated bytes, another type) fails to decode
/// instead of allocating without bound (a capacity-overflow panic, or an abort when the
/// allocation fails). Payloads over 32 MiB (twice the default maximum value
/// size) are decoded without a limit.
fn decode_bounded<T: DeserializeOwned>(
    payload: &[u8],
) -> Result<(T, usize), bincode::error::DecodeError> {
    use bincode::serde::decode_from_slice;
    let config = bincode::config::standard();
    let budget = payload.len().saturating_mul(DECODE_BUDGET);
    if budget <= 1 << 20 {
        decode_from_slice(payload, config.with_limit::<{ 1 << 20 }>())
    } else if budget <= 1 << 24 {
        decode_from_slice(payload, config.with_limit::<{ 1 << 24 }>())
    } else if budget <= 1 << 28 {
        decode_from_slice(payload, config.with_limit::<{ 1 << 28 }>())
    } else if budget <= 1 << 30 {
        decode_from_slice(payload, config.with_limit::<{ 1 << 30 }>())
    } else {
        decode_from_slice(payload, config)
    }
}

/// serde + JSON (feature `json`). Larger and slower than bincode, but readable
/// with `redis-cli GET` and tolerant of added fields.
#[cfg(feature = "json")]
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonCodec;

#[cfg(feature = "json")]
impl Codec for JsonCodec {
    const ID: u8 = b'j';

    fn encode_payload<T: Serialize>(&self, value: &T) -> Result<Vec<u8>, CodecError> {
        serde_json::to_vec(value).map_err(|e| CodecError::Encode(e.to_string()))
    }

    fn decode_payload<T: DeserializeOwned>(&self, payload: &[u8]) -> Result<T, CodecError> {
        serde_json::from_slice(payload).map_err(|e| CodecError::Decode(e.to_string()))
    }
}

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

    #[test]
    fn a_length_prefix_beyond_the_payload_is_an_error_not_an_allocation() {
        // u64::MAX read back as a String: a length prefix of 2^64 - 1 bytes.
        let bytes = encode(&BincodeCodec, &u64::MAX).unwrap();
        assert!(matches!(
            decode::<_, String>(&BincodeCodec, &bytes),
            Err(CodecError::Decode(_))
        ));
        // 2^40 bytes claimed, which would abort on allocation.
        let bytes = encode(&BincodeCodec, &(1u64 << 40)).unwrap();
        assert!(matches!(
            decode::<_, Vec<u8>>(&BincodeCodec, &bytes),
            Err(CodecError::Decode(_))
        ));
        // Values whose decoded form is far larger than their encoding still decode.
        let wide = vec![1u128; 100_000];
        let bytes = encode(&BincodeCodec, &wide).unwrap();
        assert_eq!(decode::<_, Vec<u128>>(&BincodeCodec, &bytes).unwrap(), wide);
        let strings = vec![String::new(); 100_000];
        let bytes = encode(&BincodeCodec, &strings).unwrap();
        assert_eq!(
            decode::<_, Vec<String>>(&BincodeCodec, &bytes).unwrap(),
            strings
        );
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut bytes = encode(&BincodeCodec, &7u8).unwrap();
        bytes.extend_from_slice(&[1, 2, 3]);
        assert!(matches!(
            decode::<_, u8>(&BincodeCodec, &bytes),
            Err(CodecError::Decode(_))
        ));
    }
}
