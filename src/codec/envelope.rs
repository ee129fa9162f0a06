//! The header in front of every stored value: magic bytes, format version,
//! codec id, and the value's [`Meta`] (stale window, load time, absent flag).
//!
//! ```text
//! 0..2  magic C7 4C
//! 2     format version (2)
//! 3     codec id
//! 4     flags: bit 0 = absent (a cached "not found"), bit 1 = marked
//! 5..9  stale window, ms, u32 little-endian
//! 9..13 load time, ms, u32 little-endian
//! 13..  payload (the codec's)
//! ```
//!
//! A *marked* value (a cache with tags on, `Builder::tags`) carries, between
//! the header and the payload, what its invalidations are judged by
//! (`cache/tags.rs`): the cache's generation when its load began (u64 LE),
//! the number of its tags (u8, at most [`MAX_TAGS`]), and per tag its id and
//! its version when the load began (two u64 LE). Unmarked values are laid
//! out as before.
//!
//! Version 1 (the 4-byte header of locked-cache before stale-while-revalidate)
//! is not read: such bytes are [`CodecError::UnsupportedVersion`], which the
//! cache treats as a miss, reloading and overwriting the value.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Codec;
use crate::error::CodecError;

/// The two bytes every locked-cache value starts with.
pub const MAGIC: [u8; 2] = [0xC7, 0x4C];
/// The header format this build writes and reads.
pub const FORMAT_VERSION: u8 = 2;
/// Length of the header in bytes.
pub const HEADER_LEN: usize = 13;
/// The longest stale window or load time the header holds: `u32::MAX` ms
/// (about 49.7 days). Longer durations are stored as this.
pub const MAX_META_DURATION: Duration = Duration::from_millis(u32::MAX as u64);

const FLAG_ABSENT: u8 = 1;
const FLAG_MARKED: u8 = 2;
const KNOWN_FLAGS: u8 = FLAG_ABSENT | FLAG_MARKED;

/// The most tags one value carries.
pub const MAX_TAGS: usize = 8;

/// What a marked value was loaded under: the cache's generation and each of
/// its tags' versions (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Marks {
    /// The cache's generation (0: never cleared).
    pub generation: u64,
    /// (tag id, version) per tag.
    pub tags: Vec<(u64, u64)>,
}

impl Marks {
    /// Its length between the header and the payload.
    fn len(&self) -> usize {
        9 + 16 * self.tags.len()
    }
}

/// The marks section of `bytes` (header checked by the caller) and its
/// length: `None` and 0 for an unmarked value; an error when it is cut short
/// or has too many tags.
fn read_marks(bytes: &[u8]) -> Result<(Option<Marks>, usize), CodecError> {
    if bytes[4] & FLAG_MARKED == 0 {
        return Ok((None, 0));
    }
    let section = &bytes[HEADER_LEN..];
    let short = || CodecError::Decode("marks section cut short".into());
    let u64_at = |at: usize| -> Result<u64, CodecError> {
        let raw = section.get(at..at + 8).ok_or_else(short)?;
        Ok(u64::from_le_bytes(raw.try_into().expect("8 bytes")))
    };
    let generation = u64_at(0)?;
    let n = usize::from(*section.get(8).ok_or_else(short)?);
    if n > MAX_TAGS {
        return Err(CodecError::Decode(format!(
            "{n} tags, over the maximum of {MAX_TAGS}"
        )));
    }
    let mut tags = Vec::with_capacity(n);
    for i in 0..n {
        tags.push((u64_at(9 + 16 * i)?, u64_at(17 + 16 * i)?));
    }
    let marks = Marks { generation, tags };
    let len = marks.len();
    Ok((Some(marks), len))
}

/// The marks of a stored value whose header is valid, or `None` (unmarked,
/// or a section that does not parse: then the decode fails too).
pub(crate) fn marks(bytes: &[u8]) -> Option<Marks> {
    if bytes.len() < HEADER_LEN {
        return None;
    }
    read_marks(bytes).ok().and_then(|(marks, _)| marks)
}

/// Where the payload of a stored value whose header is valid starts.
pub(crate) fn payload_offset(bytes: &[u8]) -> usize {
    match read_marks(bytes) {
        Ok((_, len)) => HEADER_LEN + len,
        Err(_) => bytes.len(),
    }
}

/// As [`encode_with_meta`], with `marks` between the header and the payload.
pub(crate) fn encode_marked<C: Codec, T: Serialize>(
    codec: &C,
    value: &T,
    meta: &Meta,
    marks: Option<&Marks>,
) -> Result<Vec<u8>, CodecError> {
    let Some(marks) = marks else {
        return encode_with_meta(codec, value, meta);
    };
    if marks.tags.len() > MAX_TAGS {
        return Err(CodecError::Encode(format!(
            "{} tags, over the maximum of {MAX_TAGS}",
            marks.tags.len()
        )));
    }
    let payload = codec.encode_payload(value)?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + marks.len() + payload.len());
    let mut header = header(C::ID, meta);
    header[4] |= FLAG_MARKED;
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&marks.generation.to_le_bytes());
    bytes.push(marks.tags.len() as u8);
    for (tag, version) in &marks.tags {
        bytes.extend_from_slice(&tag.to_le_bytes());
        bytes.extend_from_slice(&version.to_le_bytes());
    }
    bytes.extend_from_slice(&payload);
    Ok(bytes)
}

/// What the cache stores with a value, besides the value itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Meta {
    /// How long the value stays usable after it stops being fresh: the key's
    /// Redis TTL is the fresh time plus this, so a value is fresh while its
    /// remaining TTL exceeds it. Zero for values stored without a stale window.
    pub stale_for: Duration,
    /// How long the load that produced the value took (early refresh starts a
    /// reload about this long, times a random factor, before the value goes
    /// stale). Zero for values stored by `set`.
    pub load_time: Duration,
    /// The loader found nothing (`None`): a cached "not found", kept for the
    /// negative TTL.
    pub absent: bool,
}

/// The header for a value encoded by the codec with id `codec_id`.
pub fn header(codec_id: u8, meta: &Meta) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[..2].copy_from_slice(&MAGIC);
    header[2] = FORMAT_VERSION;
    header[3] = codec_id;
    header[4] = if meta.absent { FLAG_ABSENT } else { 0 };
    header[5..9].copy_from_slice(&meta_millis(meta.stale_for).to_le_bytes());
    header[9..13].copy_from_slice(&meta_millis(meta.load_time).to_le_bytes());
    header
}

fn meta_millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// Encodes `value` with `codec` behind the locked-cache header, with no
/// metadata (no stale window, no load time).
pub fn encode<C: Codec, T: Serialize>(codec: &C, value: &T) -> Result<Vec<u8>, CodecError> {
    encode_with_meta(codec, value, &Meta::default())
}

/// Encodes `value` with `codec` behind the locked-cache header carrying `meta`.
pub fn encode_with_meta<C: Codec, T: Serialize>(
    codec: &C,
    value: &T,
    meta: &Meta,
) -> Result<Vec<u8>, CodecError> {
    let payload = codec.encode_payload(value)?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(&header(C::ID, meta));
    bytes.extend_from_slice(&payload);
    Ok(bytes)
}

/// Checks the header of `bytes` (written by the codec with id `codec_id`) and
/// splits it into the value's [`Meta`] and the payload.
pub fn split_header(codec_id: u8, bytes: &[u8]) -> Result<(Meta, &[u8]), CodecError> {
    if bytes.len() < 3 || bytes[..2] != MAGIC {
        return Err(CodecError::ForeignBytes);
    }
    if bytes[2] != FORMAT_VERSION {
        return Err(CodecError::UnsupportedVersion(bytes[2]));
    }
    if bytes.len() < HEADER_LEN {
        return Err(CodecError::Decode(format!(
            "{} bytes, shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    if bytes[3] != codec_id {
        return Err(CodecError::WrongCodec {
            found: bytes[3],
            expected: codec_id,
        });
    }
    let flags = bytes[4];
    if flags & !KNOWN_FLAGS != 0 {
        return Err(CodecError::Decode(format!(
            "unknown header flags {flags:#04x}"
        )));
    }
    let millis = |at: usize| {
        let ms = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        Duration::from_millis(u64::from(ms))
    };
    let meta = Meta {
        stale_for: millis(5),
        load_time: millis(9),
        absent: flags & FLAG_ABSENT != 0,
    };
    let (_, marks_len) = read_marks(bytes)?;
    Ok((meta, &bytes[HEADER_LEN + marks_len..]))
}

/// Whether `bytes` have a valid header (as [`split_header`] checks it) with a
/// stale window: what a hit asks before decoding, without the rest of the
/// header's parse.
pub(crate) fn has_stale_window(codec_id: u8, bytes: &[u8]) -> bool {
    bytes.len() >= HEADER_LEN
        && bytes[..2] == MAGIC
        && bytes[2] == FORMAT_VERSION
        && bytes[3] == codec_id
        && bytes[4] & !KNOWN_FLAGS == 0
        && bytes[5..9] != [0; 4]
}

/// Checks the header and decodes the payload with `codec`.
///
/// `bytes` may be anything (they come from Redis): with the built-in codecs a
/// corrupt payload of any size is a [`CodecError::Decode`], never a panic, a
/// stack overflow or an allocation failure (see [`decode_bounded`](super::decode_bounded)).
pub fn decode<C: Codec, T: DeserializeOwned>(codec: &C, bytes: &[u8]) -> Result<T, CodecError> {
    decode_with_meta(codec, bytes).map(|(value, _)| value)
}

/// As [`decode`], also returning the value's [`Meta`].
pub fn decode_with_meta<C: Codec, T: DeserializeOwned>(
    codec: &C,
    bytes: &[u8],
) -> Result<(T, Meta), CodecError> {
    let (meta, payload) = split_header(C::ID, bytes)?;
    Ok((codec.decode_payload(payload)?, meta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::BincodeCodec;

    /// `has_stale_window` says what `split_header` would: for values with
    /// and without a window, and every header cut short or with a byte changed.
    #[test]
    fn has_stale_window_agrees_with_split_header() {
        let expected = |bytes: &[u8]| {
            split_header(BincodeCodec::ID, bytes).is_ok_and(|(meta, _)| !meta.stale_for.is_zero())
        };
        for stale_for in [0, 1, 999, 1_000, 70_000_000] {
            let meta = Meta {
                stale_for: Duration::from_millis(stale_for),
                load_time: Duration::from_millis(5),
                absent: false,
            };
            let bytes = encode_with_meta(&BincodeCodec, &"v".to_owned(), &meta).unwrap();
            assert_eq!(has_stale_window(BincodeCodec::ID, &bytes), stale_for > 0);
            for len in 0..bytes.len() {
                let cut = &bytes[..len];
                assert_eq!(
                    has_stale_window(BincodeCodec::ID, cut),
                    expected(cut),
                    "{cut:?}"
                );
            }
            for at in 0..HEADER_LEN {
                for change in [1_u8, 0x80, 0xff] {
                    let mut changed = bytes.clone();
                    changed[at] ^= change;
                    assert_eq!(
                        has_stale_window(BincodeCodec::ID, &changed),
                        expected(&changed),
                        "{changed:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&BincodeCodec, &("hello", 42u64)).unwrap();
        assert_eq!(&bytes[..2], &MAGIC);
        let back: (String, u64) = decode(&BincodeCodec, &bytes).unwrap();
        assert_eq!(back, ("hello".to_string(), 42));
    }

    #[test]
    fn meta_round_trips_and_long_durations_saturate() {
        let meta = Meta {
            stale_for: Duration::from_secs(300),
            load_time: Duration::from_millis(57),
            absent: true,
        };
        let bytes = encode_with_meta(&BincodeCodec, &Option::<u8>::None, &meta).unwrap();
        let (value, back): (Option<u8>, Meta) = decode_with_meta(&BincodeCodec, &bytes).unwrap();
        assert_eq!((value, back), (None, meta));

        let long = Meta {
            stale_for: Duration::from_secs(100 * 24 * 3600),
            ..Meta::default()
        };
        let bytes = encode_with_meta(&BincodeCodec, &1u8, &long).unwrap();
        let (_, back): (u8, Meta) = decode_with_meta(&BincodeCodec, &bytes).unwrap();
        assert_eq!(back.stale_for, MAX_META_DURATION);
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
        // A header cut short is a decode error, not a slice panic.
        for len in 3..HEADER_LEN {
            assert!(matches!(
                decode::<_, u8>(&BincodeCodec, &bytes[..len]),
                Err(CodecError::Decode(_))
            ));
        }
    }

    #[test]
    fn other_version_codec_and_flags_are_detected() {
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
        bytes[3] = b'b';
        bytes[4] = 0x80;
        assert!(matches!(
            decode::<_, u8>(&BincodeCodec, &bytes),
            Err(CodecError::Decode(_))
        ));
    }

    #[test]
    fn version_1_bytes_are_an_unsupported_version_not_a_value() {
        // The 4-byte header locked-cache wrote before format 2, then bincode's 7.
        let v1 = [0xC7, 0x4C, 1, b'b', 7];
        assert_eq!(
            decode::<_, u8>(&BincodeCodec, &v1),
            Err(CodecError::UnsupportedVersion(1))
        );
    }
}
