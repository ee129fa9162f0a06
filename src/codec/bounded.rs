//! Bounded decoding: a serde [`Deserializer`] adapter that caps nesting depth,
//! element count and decoded size, whatever the format and the value's type.
//!
//! A format such as bincode trusts its input: a recursive type nested 100,000
//! levels deep overflows the stack (an abort), a sequence of zero-sized elements
//! with a length prefix of 2^62 loops 2^62 times, a string claiming 2^40 bytes
//! is allocated before it is read. [`Bounded`] wraps any deserializer and every
//! visitor, `SeqAccess`, `MapAccess`, `EnumAccess` and `VariantAccess` it hands
//! out, so that each nested value is deserialized through the adapter again and
//! charged to one shared [`Budget`]:
//!
//! - **depth**: every `visit_seq`, `visit_map`, `visit_enum`, `visit_some` and
//!   `visit_newtype_struct`, the only places serde recurses, enters one level for
//!   as long as it runs; deeper than [`MAX_DEPTH`] is an error.
//! - **elements**: every element of a variable-length sequence and every map entry
//!   takes one unit; more than the payload's length plus [`EXTRA_ELEMENTS`] is an
//!   error. Fields of structs, tuples and arrays are not counted: their number comes
//!   from the type, not from the bytes.
//! - **decoded size**: every value charges its in-memory size (`size_of` of the
//!   value, plus the length of strings and byte buffers); more than
//!   [`DECODED_BYTES_PER_PAYLOAD_BYTE`] times the payload's length, or
//!   [`MIN_DECODED_BYTES_LIMIT`] if that is larger, is an error.
//!
//! It also asks for borrowed strings and byte buffers (`deserialize_str` for
//! `deserialize_string`, `deserialize_bytes` for `deserialize_byte_buf`) and hands
//! the visitor an owned copy, so that a length prefix longer than the payload fails
//! when the format finds the payload too short, before anything is allocated
//! (bincode's owned `String` allocates the claimed length first). Sequence size
//! hints larger than the payload are withheld, so a visitor preallocates at most
//! one slot per payload byte (serde's own collections cap their preallocation at
//! 1 MiB anyway).
//!
//! A bound, once hit, stays hit: the budgets are emptied, no container opens any
//! more, and the result is an error even if a visitor swallowed the first one.

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;
use std::mem::size_of;

use serde::de::{
    self, Deserialize, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess,
    VariantAccess, Visitor,
};

use crate::error::CodecError;

/// Deepest nesting a decoded value may have: sequences, maps, structs, tuples,
/// enums, `Some` and newtype structs each count one level (a `Vec<Vec<u8>>` is 2
/// deep, a struct holding a `Vec<Node>` field is 2 deep per level of nodes).
/// 128 is serde_json's default. Decoding 128 levels takes about 300 KiB of stack
/// in a debug build and under 64 KiB optimised, well within the 2 MiB of a tokio
/// worker or test thread.
pub const MAX_DEPTH: usize = 128;

/// Elements allowed beyond one per payload byte. Elements of variable-length
/// sequences and map entries are counted (not struct, tuple or array fields); a
/// decode may produce at most `payload.len() + EXTRA_ELEMENTS` of them.
///
/// In bincode and JSON every element occupies at least one byte of its own except
/// those that encode to nothing (`()`, unit structs, `PhantomData`, `[T; 0]`...),
/// so only values with more than a million such elements (a `Vec<()>` of a few
/// million, which is silly) are refused. A corrupt length prefix of 2^62 `()`
/// elements stops after `payload.len() + 2^20` of them, in milliseconds.
pub const EXTRA_ELEMENTS: usize = 1 << 20;

/// Decoded bytes allowed per payload byte: the sum of `size_of` of every decoded
/// value (a struct's field counts once for itself and again inside the struct's
/// own size) plus the length of strings and byte buffers may not exceed this many
/// times the payload's length (or [`MIN_DECODED_BYTES_LIMIT`] if that is larger).
///
/// Real data stays far below it (a `Vec<u128>` of small numbers charges 16 per
/// byte, empty `String`s 24); it stops a value of a large but sparsely encoded
/// type (a long `Vec<Option<[u64; 32]>>` of `None`s: 1 byte each, 264 in memory)
/// from allocating hundreds of times its size.
pub const DECODED_BYTES_PER_PAYLOAD_BYTE: usize = 64;

/// The decoded-size bound of small payloads: a payload of up to 4 MiB may decode
/// to 256 MiB of charged size (see [`DECODED_BYTES_PER_PAYLOAD_BYTE`]).
pub const MIN_DECODED_BYTES_LIMIT: usize = 256 << 20;

/// A tuple or array longer than this has its elements counted like a sequence's:
/// real fixed-length types are shorter, and a longer one is usually the
/// `deserialize_tuple(usize::MAX, ..)` idiom for a length read from the data.
const MAX_UNCOUNTED_FIXED_LEN: usize = 4096;

/// Deserializes a `T` from `deserializer` with nesting depth, element count and
/// decoded size bounded by `payload_len`, the size of the encoded input (see
/// [`MAX_DEPTH`], [`EXTRA_ELEMENTS`], [`DECODED_BYTES_PER_PAYLOAD_BYTE`]).
///
/// Use it in a custom [`Codec`](super::Codec) so that corrupt bytes from Redis
/// give an error instead of a stack overflow, an endless loop or an allocation
/// failure. A value over a bound is `CodecError::Decode("... nesting deeper than
/// 128 levels")` (or "more than N elements", "decoded value larger than N
/// bytes"); the format's own errors are `CodecError::Decode` with its message.
/// Checking for trailing bytes is left to the caller.
///
/// ```
/// use locked_cache::CodecError;
/// use locked_cache::codec::decode_bounded;
///
/// fn decode_json<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
///     let mut deserializer = serde_json::Deserializer::from_slice(payload);
///     let value = decode_bounded(&mut deserializer, payload.len())?;
///     deserializer.end().map_err(|e| CodecError::Decode(e.to_string()))?;
///     Ok(value)
/// }
///
/// assert_eq!(decode_json::<Vec<u32>>(b"[1, 2]"), Ok(vec![1, 2]));
/// let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
/// assert!(matches!(decode_json::<serde_json::Value>(deep.as_bytes()), Err(CodecError::Decode(_))));
/// ```
pub fn decode_bounded<'de, T, D>(deserializer: D, payload_len: usize) -> Result<T, CodecError>
where
    T: Deserialize<'de>,
    D: Deserializer<'de>,
{
    let budget = Budget::new(payload_len);
    let decoded = T::deserialize(Bounded {
        de: deserializer,
        budget: &budget,
    });
    budget.finish(decoded.map_err(|e| e.to_string()))
}

/// Which bound a decode hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bound {
    Depth,
    Elements,
    DecodedBytes,
}

/// What one decode may still use, shared by every adapter of that decode.
pub(super) struct Budget {
    payload_len: usize,
    depth: Cell<usize>,
    elements_left: Cell<usize>,
    bytes_left: Cell<usize>,
    exceeded: Cell<Option<Bound>>,
}

impl Budget {
    /// The budget of a decode of `payload_len` encoded bytes.
    pub(super) fn new(payload_len: usize) -> Budget {
        Budget {
            payload_len,
            depth: Cell::new(0),
            elements_left: Cell::new(max_elements(payload_len)),
            bytes_left: Cell::new(max_decoded_bytes(payload_len)),
            exceeded: Cell::new(None),
        }
    }

    /// A seed that deserializes a `T` through the adapter, for formats whose
    /// entry point takes a seed (bincode's `seed_decode_from_slice`).
    pub(super) fn seed<T>(&self) -> BoundedSeed<'_, PhantomData<T>> {
        BoundedSeed {
            seed: PhantomData,
            budget: self,
        }
    }

    /// The decode's result as a [`CodecError`]: the bound's own message if one
    /// was hit (even if the value came back `Ok`), else the format's.
    pub(super) fn finish<T>(&self, decoded: Result<T, String>) -> Result<T, CodecError> {
        match (self.exceeded.get(), decoded) {
            (Some(bound), _) => Err(CodecError::Decode(self.message(bound))),
            (None, Ok(value)) => Ok(value),
            (None, Err(message)) => Err(CodecError::Decode(message)),
        }
    }

    fn message(&self, bound: Bound) -> String {
        match bound {
            Bound::Depth => format!("nesting deeper than {MAX_DEPTH} levels"),
            Bound::Elements => format!(
                "more than {} elements in a payload of {} bytes",
                max_elements(self.payload_len),
                self.payload_len
            ),
            Bound::DecodedBytes => format!(
                "decoded value larger than {} bytes from a payload of {} bytes",
                max_decoded_bytes(self.payload_len),
                self.payload_len
            ),
        }
    }

    /// Records that `bound` was hit (unless another was first) and makes the
    /// error. Once hit, the element and size budgets are empty and every
    /// container refuses to open, so the decode stops soon even if a visitor
    /// swallows this error.
    #[cold]
    #[inline(never)]
    fn exceed<E: de::Error>(&self, bound: Bound) -> E {
        let bound = self.exceeded.get().unwrap_or(bound);
        self.exceeded.set(Some(bound));
        self.elements_left.set(0);
        self.bytes_left.set(0);
        E::custom(self.message(bound))
    }

    /// Charges `bytes` of decoded size.
    #[inline]
    fn charge<E: de::Error>(&self, bytes: usize) -> Result<(), E> {
        match self.bytes_left.get().checked_sub(bytes) {
            Some(left) => {
                self.bytes_left.set(left);
                Ok(())
            }
            None => Err(self.exceed(Bound::DecodedBytes)),
        }
    }

    #[inline]
    fn count_element<E: de::Error>(&self) -> Result<(), E> {
        match self.elements_left.get().checked_sub(1) {
            Some(left) => {
                self.elements_left.set(left);
                Ok(())
            }
            None => Err(self.exceed(Bound::Elements)),
        }
    }

    /// Enters one level of nesting until the guard is dropped; fails if any
    /// bound was hit before.
    #[inline]
    fn enter<E: de::Error>(&self) -> Result<Level<'_>, E> {
        let depth = self.depth.get() + 1;
        if depth > MAX_DEPTH || self.exceeded.get().is_some() {
            return Err(self.exceed(Bound::Depth));
        }
        self.depth.set(depth);
        Ok(Level(self))
    }

    /// A sequence's size hint, withheld when it claims more elements than the
    /// payload has bytes: in bincode and JSON every element that takes memory
    /// takes a byte, so such a hint is a lie, and preallocating for it is how a
    /// visitor that does not cap its hints (`Vec::with_capacity(hint)`) aborts.
    #[inline]
    fn cap_hint(&self, hint: Option<usize>) -> Option<usize> {
        hint.filter(|&n| n <= self.payload_len)
    }
}

fn max_elements(payload_len: usize) -> usize {
    payload_len.saturating_add(EXTRA_ELEMENTS)
}

fn max_decoded_bytes(payload_len: usize) -> usize {
    payload_len
        .saturating_mul(DECODED_BYTES_PER_PAYLOAD_BYTE)
        .max(MIN_DECODED_BYTES_LIMIT)
}

/// One level of nesting, left on drop.
struct Level<'b>(&'b Budget);

impl Drop for Level<'_> {
    fn drop(&mut self) {
        self.0.depth.set(self.0.depth.get() - 1);
    }
}

/// The adapter: a [`Deserializer`] that deserializes through `de`, wrapping the
/// visitor so that everything nested comes back through a `Bounded`.
pub(super) struct Bounded<'b, D> {
    de: D,
    budget: &'b Budget,
}

/// What a wrapped visitor was asked for, which decides how it treats the calls
/// it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    /// Anything else: sequences are variable-length, their elements counted.
    Plain,
    /// A struct, tuple or array of a length fixed by the type: its fields are not
    /// counted as elements.
    Fixed,
    /// An owned `String` asked for as a borrowed `str`: hand the visitor a copy.
    OwnedString,
    /// An owned byte buffer asked for as borrowed bytes: hand the visitor a copy.
    OwnedBytes,
}

impl Request {
    fn fixed(len: usize) -> Request {
        if len <= MAX_UNCOUNTED_FIXED_LEN {
            Request::Fixed
        } else {
            Request::Plain
        }
    }
}

/// Forwards `deserialize_*` methods to the inner deserializer, charging the
/// value's size and wrapping the visitor.
macro_rules! forward_deserialize {
    ($($method:ident($($arg:ident: $ty:ty),*) => $request:expr;)*) => {$(
        #[inline]
        fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, D::Error> {
            self.budget.charge(size_of::<V::Value>())?;
            let request = $request;
            self.de.$method($($arg,)* BoundedVisitor { visitor, budget: self.budget, request })
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Bounded<'_, D> {
    type Error = D::Error;

    forward_deserialize! {
        deserialize_any() => Request::Plain;
        deserialize_bool() => Request::Plain;
        deserialize_i8() => Request::Plain;
        deserialize_i16() => Request::Plain;
        deserialize_i32() => Request::Plain;
        deserialize_i64() => Request::Plain;
        deserialize_i128() => Request::Plain;
        deserialize_u8() => Request::Plain;
        deserialize_u16() => Request::Plain;
        deserialize_u32() => Request::Plain;
        deserialize_u64() => Request::Plain;
        deserialize_u128() => Request::Plain;
        deserialize_f32() => Request::Plain;
        deserialize_f64() => Request::Plain;
        deserialize_char() => Request::Plain;
        deserialize_str() => Request::Plain;
        deserialize_bytes() => Request::Plain;
        deserialize_option() => Request::Plain;
        deserialize_unit() => Request::Plain;
        deserialize_unit_struct(name: &'static str) => Request::Plain;
        deserialize_newtype_struct(name: &'static str) => Request::Plain;
        deserialize_seq() => Request::Plain;
        deserialize_tuple(len: usize) => Request::fixed(len);
        deserialize_tuple_struct(name: &'static str, len: usize) => Request::fixed(len);
        deserialize_map() => Request::Plain;
        deserialize_struct(name: &'static str, fields: &'static [&'static str]) => Request::fixed(fields.len());
        deserialize_enum(name: &'static str, variants: &'static [&'static str]) => Request::Plain;
        deserialize_identifier() => Request::Plain;
        deserialize_ignored_any() => Request::Plain;
    }

    /// Asks for a borrowed `str` and hands the visitor an owned copy: a length
    /// prefix beyond the payload fails before anything is allocated.
    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.budget.charge(size_of::<V::Value>())?;
        self.de.deserialize_str(BoundedVisitor {
            visitor,
            budget: self.budget,
            request: Request::OwnedString,
        })
    }

    /// Asks for borrowed bytes and hands the visitor an owned copy, as
    /// [`deserialize_string`](Self::deserialize_string).
    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.budget.charge(size_of::<V::Value>())?;
        self.de.deserialize_bytes(BoundedVisitor {
            visitor,
            budget: self.budget,
            request: Request::OwnedBytes,
        })
    }

    fn is_human_readable(&self) -> bool {
        self.de.is_human_readable()
    }
}

/// A visitor whose nested deserializers and accesses are wrapped in turn.
struct BoundedVisitor<'b, V> {
    visitor: V,
    budget: &'b Budget,
    request: Request,
}

macro_rules! forward_visit {
    ($($method:ident($ty:ty);)*) => {$(
        #[inline]
        fn $method<E: de::Error>(self, v: $ty) -> Result<V::Value, E> {
            self.visitor.$method(v)
        }
    )*};
}

impl<'de, V: Visitor<'de>> Visitor<'de> for BoundedVisitor<'_, V> {
    type Value = V::Value;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.visitor.expecting(formatter)
    }

    forward_visit! {
        visit_bool(bool);
        visit_i8(i8);
        visit_i16(i16);
        visit_i32(i32);
        visit_i64(i64);
        visit_i128(i128);
        visit_u8(u8);
        visit_u16(u16);
        visit_u32(u32);
        visit_u64(u64);
        visit_u128(u128);
        visit_f32(f32);
        visit_f64(f64);
        visit_char(char);
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<V::Value, E> {
        self.budget.charge(v.len())?;
        match self.request {
            Request::OwnedString => self.visitor.visit_string(v.to_owned()),
            _ => self.visitor.visit_str(v),
        }
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<V::Value, E> {
        self.budget.charge(v.len())?;
        match self.request {
            Request::OwnedString => self.visitor.visit_string(v.to_owned()),
            _ => self.visitor.visit_borrowed_str(v),
        }
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<V::Value, E> {
        self.budget.charge(v.len())?;
        self.visitor.visit_string(v)
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<V::Value, E> {
        self.budget.charge(v.len())?;
        match self.request {
            Request::OwnedBytes => self.visitor.visit_byte_buf(v.to_vec()),
            _ => self.visitor.visit_bytes(v),
        }
    }

    fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<V::Value, E> {
        self.budget.charge(v.len())?;
        match self.request {
            Request::OwnedBytes => self.visitor.visit_byte_buf(v.to_vec()),
            _ => self.visitor.visit_borrowed_bytes(v),
        }
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<V::Value, E> {
        self.budget.charge(v.len())?;
        self.visitor.visit_byte_buf(v)
    }

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.visitor.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.visitor.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, de: D) -> Result<V::Value, D::Error> {
        let _level = self.budget.enter()?;
        self.visitor.visit_some(Bounded {
            de,
            budget: self.budget,
        })
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, de: D) -> Result<V::Value, D::Error> {
        let _level = self.budget.enter()?;
        self.visitor.visit_newtype_struct(Bounded {
            de,
            budget: self.budget,
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        let _level = self.budget.enter()?;
        self.visitor.visit_seq(BoundedSeq {
            seq,
            budget: self.budget,
            counted: self.request != Request::Fixed,
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        let _level = self.budget.enter()?;
        self.visitor.visit_map(BoundedMap {
            map,
            budget: self.budget,
        })
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        let _level = self.budget.enter()?;
        self.visitor.visit_enum(BoundedEnum {
            data,
            budget: self.budget,
        })
    }
}

/// A seed whose deserializer is wrapped.
pub(super) struct BoundedSeed<'b, S> {
    seed: S,
    budget: &'b Budget,
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for BoundedSeed<'_, S> {
    type Value = S::Value;

    #[inline]
    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<S::Value, D::Error> {
        self.seed.deserialize(Bounded {
            de,
            budget: self.budget,
        })
    }
}

/// The elements of a sequence, each deserialized through the adapter and, in a
/// variable-length sequence, counted.
struct BoundedSeq<'b, A> {
    seq: A,
    budget: &'b Budget,
    counted: bool,
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for BoundedSeq<'_, A> {
    type Error = A::Error;

    #[inline]
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        let element = self.seq.next_element_seed(BoundedSeed {
            seed,
            budget: self.budget,
        })?;
        if self.counted && element.is_some() {
            self.budget.count_element()?;
        }
        Ok(element)
    }

    fn size_hint(&self) -> Option<usize> {
        self.budget.cap_hint(self.seq.size_hint())
    }
}

/// The entries of a map, each key and value deserialized through the adapter,
/// each entry counted.
struct BoundedMap<'b, A> {
    map: A,
    budget: &'b Budget,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for BoundedMap<'_, A> {
    type Error = A::Error;

    #[inline]
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let key = self.map.next_key_seed(BoundedSeed {
            seed,
            budget: self.budget,
        })?;
        if key.is_some() {
            self.budget.count_element()?;
        }
        Ok(key)
    }

    #[inline]
    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        self.map.next_value_seed(BoundedSeed {
            seed,
            budget: self.budget,
        })
    }

    fn size_hint(&self) -> Option<usize> {
        self.budget.cap_hint(self.map.size_hint())
    }
}

/// An enum's variant tag and contents, deserialized through the adapter.
struct BoundedEnum<'b, A> {
    data: A,
    budget: &'b Budget,
}

impl<'b, 'de, A: EnumAccess<'de>> EnumAccess<'de> for BoundedEnum<'b, A> {
    type Error = A::Error;
    type Variant = BoundedVariant<'b, A::Variant>;

    fn variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Self::Variant), A::Error> {
        let (tag, variant) = self.data.variant_seed(BoundedSeed {
            seed,
            budget: self.budget,
        })?;
        Ok((
            tag,
            BoundedVariant {
                variant,
                budget: self.budget,
            },
        ))
    }
}

/// An enum variant's contents, deserialized through the adapter.
struct BoundedVariant<'b, A> {
    variant: A,
    budget: &'b Budget,
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for BoundedVariant<'_, A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.variant.unit_variant()
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, A::Error> {
        self.variant.newtype_variant_seed(BoundedSeed {
            seed,
            budget: self.budget,
        })
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        self.variant.tuple_variant(
            len,
            BoundedVisitor {
                visitor,
                budget: self.budget,
                request: Request::fixed(len),
            },
        )
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        self.variant.struct_variant(
            fields,
            BoundedVisitor {
                visitor,
                budget: self.budget,
                request: Request::fixed(fields.len()),
            },
        )
    }
}
