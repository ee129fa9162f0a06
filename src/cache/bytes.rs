//! Byte values without a byte-by-byte decode: [`LockedCache::get_or_load_bytes`],
//! [`get_bytes`](LockedCache::get_bytes) and [`set_bytes`](LockedCache::set_bytes).
//!
//! serde hands a `Vec<u8>` to the codec as a *sequence* of `u8`s: bincode
//! writes it as a length and the raw bytes, but decoding goes element by element
//! through the bounded adapter (about 6 ns a byte). These methods pass the same
//! bytes through serde's *byte buffer* hooks instead (`serialize_bytes`,
//! `deserialize_byte_buf`), which the codecs encode identically (bincode: the
//! length and the raw bytes; JSON: an array of numbers) and decode with one copy.
//! A value stored by `get_or_load::<Vec<u8>>` is read by `get_bytes` and the
//! other way round.
//!
//! Decoding stays bounded: the byte buffer is borrowed from the payload before
//! it is copied, so a corrupt length prefix fails on the payload's end instead
//! of allocating (see `codec/bounded.rs`).

use std::fmt;
use std::future::Future;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use super::LockedCache;
use crate::codec::Codec;
use crate::error::{LoadError, Result};
use crate::telemetry::Outcome;

impl<C: Codec> LockedCache<C> {
    /// [`get_or_load`](Self::get_or_load) for a blob (rendered HTML, a protobuf
    /// message, an image): the value is stored as bytes and read back with one
    /// copy, so a hit costs about what the round trip costs. Every guarantee of
    /// `get_or_load` holds (one load across processes, coalescing, errors,
    /// cancellation).
    ///
    /// For a struct with byte fields, mark each field
    /// `#[serde(with = "serde_bytes")]` (crate `serde_bytes`) for the same effect;
    /// a plain `Vec<u8>` field decodes byte by byte.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use locked_cache::LockedCache;
    ///
    /// let cache = LockedCache::builder().build().await?;
    /// let page: Vec<u8> = cache
    ///     .get_or_load_bytes("page:/", || async { Ok::<_, std::io::Error>(b"<html>".to_vec()) })
    ///     .await?;
    /// assert_eq!(page, b"<html>");
    /// assert_eq!(cache.get_bytes("page:/").await?.as_deref(), Some(&b"<html>"[..]));
    /// # Ok(()) }
    /// ```
    pub async fn get_or_load_bytes<E, F, Fut>(
        &self,
        key: &str,
        loader: F,
    ) -> Result<Vec<u8>, LoadError<E>>
    where
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<u8>, E>>,
    {
        let (blob, _) = self
            .get_or_load_bytes_with_outcome(key, |_| loader())
            .await?;
        Ok(blob)
    }

    /// As [`get_or_load_bytes`](Self::get_or_load_bytes), handing the loader
    /// its [`LoadContext`](crate::LoadContext) and telling how the call was
    /// served (see [`get_or_load_with_outcome`](Self::get_or_load_with_outcome)).
    pub async fn get_or_load_bytes_with_outcome<E, F, Fut>(
        &self,
        key: &str,
        loader: F,
    ) -> Result<(Vec<u8>, Outcome), LoadError<E>>
    where
        E: Send + Sync + 'static,
        F: FnOnce(crate::LoadContext) -> Fut,
        Fut: Future<Output = Result<Vec<u8>, E>>,
    {
        let (Blob(blob), outcome) = self
            .get_or_load_with_outcome(
                key,
                |context| async move { loader(context).await.map(Blob) },
            )
            .await?;
        Ok((blob, outcome))
    }

    /// [`get`](Self::get) for a blob stored by
    /// [`get_or_load_bytes`](Self::get_or_load_bytes), [`set_bytes`](Self::set_bytes)
    /// or as a `Vec<u8>`: one round trip and one copy.
    pub async fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.get::<Blob>(key).await?.map(|blob| blob.0))
    }

    /// [`set`](Self::set) for a blob: stores `value` under `key` with the
    /// cache's TTL, unconditionally.
    pub async fn set_bytes(&self, key: &str, value: &[u8]) -> Result<()> {
        self.set(key, &BlobRef(value)).await
    }
}

/// A byte vector that serde sees as a byte buffer, not a sequence of `u8`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Blob(pub(crate) Vec<u8>);

/// A borrowed [`Blob`], to store without copying.
pub(super) struct BlobRef<'a>(pub(super) &'a [u8]);

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl Serialize for BlobRef<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Blob, D::Error> {
        deserializer.deserialize_byte_buf(BlobVisitor).map(Blob)
    }
}

struct BlobVisitor;

impl<'de> Visitor<'de> for BlobVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bytes")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> std::result::Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> std::result::Result<Vec<u8>, E> {
        Ok(v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Vec<u8>, E> {
        Ok(v.as_bytes().to_vec())
    }

    /// Self-describing formats (JSON) write bytes as an array of numbers.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Vec<u8>, A::Error> {
        // The hint comes from the data: preallocate at most 64 KiB on its word.
        let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64 << 10));
        while let Some(b) = seq.next_element()? {
            bytes.push(b);
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{BincodeCodec, decode, encode};

    #[test]
    fn blob_and_vec_share_the_bincode_format() {
        let data: Vec<u8> = (0..=255).collect();
        let as_vec = encode(&BincodeCodec, &data).unwrap();
        let as_blob = encode(&BincodeCodec, &BlobRef(&data)).unwrap();
        assert_eq!(as_vec, as_blob);
        assert_eq!(decode::<_, Blob>(&BincodeCodec, &as_vec).unwrap().0, data);
        assert_eq!(decode::<_, Vec<u8>>(&BincodeCodec, &as_blob).unwrap(), data);
    }

    #[test]
    fn a_corrupt_length_fails_without_allocating() {
        let mut bytes = encode(&BincodeCodec, &BlobRef(b"abc")).unwrap();
        // Length prefix (after the 4-byte header) claiming 2^40 bytes.
        bytes.truncate(4);
        bytes.extend_from_slice(&[0xFD]);
        bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(decode::<_, Blob>(&BincodeCodec, &bytes).is_err());
    }

    #[cfg(feature = "json")]
    #[test]
    fn blob_and_vec_share_the_json_format() {
        use crate::codec::JsonCodec;
        let data = vec![0u8, 7, 255];
        let as_vec = encode(&JsonCodec, &data).unwrap();
        let as_blob = encode(&JsonCodec, &BlobRef(&data)).unwrap();
        assert_eq!(as_vec, as_blob);
        assert_eq!(decode::<_, Blob>(&JsonCodec, &as_vec).unwrap().0, data);
    }
}
