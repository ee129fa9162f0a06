//! serde + JSON (feature `json`).

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Codec, decode_bounded};
use crate::error::CodecError;

/// serde + JSON (feature `json`). Larger and slower than bincode, but readable
/// with `redis-cli GET` and tolerant of added fields.
///
/// Decoding is bounded like bincode's (see [`decode_bounded`]); serde_json's own
/// recursion limit (128) stays on as well.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonCodec;

impl Codec for JsonCodec {
    const ID: u8 = b'j';

    fn encode_payload<T: Serialize>(&self, value: &T) -> Result<Vec<u8>, CodecError> {
        serde_json::to_vec(value).map_err(|e| CodecError::Encode(e.to_string()))
    }

    fn decode_payload<T: DeserializeOwned>(&self, payload: &[u8]) -> Result<T, CodecError> {
        let mut deserializer = serde_json::Deserializer::from_slice(payload);
        let value = decode_bounded(&mut deserializer, payload.len())?;
        // Only whitespace may follow the value, as in `serde_json::from_slice`.
        deserializer
            .end()
            .map_err(|e| CodecError::Decode(e.to_string()))?;
        Ok(value)
    }
}
