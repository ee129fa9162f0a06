//! How values become bytes in Redis and back.
//!
//! Every stored value starts with a 13-byte header: two magic bytes, the format
//! version, the codec's id and the value's [`Meta`] (its stale window, how long
//! its load took, whether it is a cached "not found"). Bytes without the header (written by another
//! program), with an unknown version, or from another codec are reported as such
//! and never mis-decoded; the cache then treats the key as a miss and reloads it.
//!
//! Bytes read back from Redis are untrusted: they may be truncated, written by
//! another program behind a copied header, or corrupted. Decoding them never takes
//! the process down: the built-in codecs decode through [`decode_bounded`], which
//! caps nesting depth ([`MAX_DEPTH`]), element count ([`EXTRA_ELEMENTS`] beyond one
//! per payload byte) and decoded size ([`DECODED_BYTES_PER_PAYLOAD_BYTE`],
//! [`MIN_DECODED_BYTES_LIMIT`]) whatever the value's type, and reports a value over
//! a bound as [`CodecError::Decode`].
//!
//! Files: `envelope.rs` (the header), `bounded.rs` (bounded decoding), and one file
//! per codec.

mod absent;
mod bincode_codec;
mod bounded;
mod envelope;
#[cfg(feature = "json")]
mod json_codec;
#[cfg(test)]
mod tests;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::CodecError;

pub(crate) use absent::is_absent;
pub use bincode_codec::BincodeCodec;
pub use bounded::{
    DECODED_BYTES_PER_PAYLOAD_BYTE, EXTRA_ELEMENTS, MAX_DEPTH, MIN_DECODED_BYTES_LIMIT,
    decode_bounded,
};
pub use envelope::{
    FORMAT_VERSION, HEADER_LEN, MAGIC, MAX_META_DURATION, MAX_TAGS, Meta, decode, decode_with_meta,
    encode, encode_with_meta, header, split_header,
};
pub(crate) use envelope::{Marks, encode_marked, has_stale_window, marks, payload_offset};
#[cfg(feature = "json")]
pub use json_codec::JsonCodec;

/// Turns values into bytes and back. Implement it to store JSON, MessagePack or
/// your own format; [`BincodeCodec`] is the default.
///
/// The cache adds and checks the header itself; a codec only sees the payload.
/// The payload comes from Redis and may be anything: decode it through
/// [`decode_bounded`] so that a corrupt value is an error rather than a stack
/// overflow, an endless loop or an allocation failure.
pub trait Codec: Send + Sync + 'static {
    /// A byte naming this codec in the header, so that bytes from another codec
    /// are detected. `b'b'` and `b'j'` are taken by the built-in codecs.
    const ID: u8;

    /// Serialises `value` into the payload.
    fn encode_payload<T: Serialize>(&self, value: &T) -> Result<Vec<u8>, CodecError>;

    /// Deserialises a payload written by [`encode_payload`](Codec::encode_payload).
    fn decode_payload<T: DeserializeOwned>(&self, payload: &[u8]) -> Result<T, CodecError>;
}
