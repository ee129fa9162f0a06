//! The default codec: serde + bincode 2.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Codec;
use super::bounded::Budget;
use crate::error::CodecError;

/// serde + bincode 2 (standard configuration: little endian, variable-length
/// integers). Compact and fast; not self-describing, so a value of another type
/// may fail to decode or, rarely, decode as garbage of the right shape: keep one
/// type per key (or put the type in the key).
///
/// Decoding is bounded (see [`decode_bounded`](super::decode_bounded)) and
/// borrows strings and byte buffers from the payload before copying them, so a
/// corrupt length prefix fails on the payload's end instead of allocating first.
#[derive(Debug, Clone, Copy, Default)]
pub struct BincodeCodec;

impl Codec for BincodeCodec {
    const ID: u8 = b'b';

    fn encode_payload<T: Serialize>(&self, value: &T) -> Result<Vec<u8>, CodecError> {
        bincode::serde::encode_to_vec(value, bincode::config::standard())
            .map_err(|e| CodecError::Encode(e.to_string()))
    }

    fn decode_payload<T: DeserializeOwned>(&self, payload: &[u8]) -> Result<T, CodecError> {
        // No bincode allocation limit: through the bounded adapter bincode only
        // ever borrows from the payload (see `Bounded::deserialize_string`), and
        // the adapter's budget bounds everything else.
        let budget = Budget::new(payload.len());
        let decoded = bincode::serde::seed_decode_from_slice(
            budget.seed::<T>(),
            payload,
            bincode::config::standard(),
        );
        let (value, read) = budget.finish(decoded.map_err(|e| e.to_string()))?;
        if read != payload.len() {
            return Err(CodecError::Decode(format!(
                "{} trailing bytes after the value",
                payload.len() - read
            )));
        }
        Ok(value)
    }
}
