//! Corrupt payloads: each attack must come back as `CodecError::Decode`, and
//! real values near the bounds must still round-trip. No timing asserts: a test
//! that hangs or aborts is the failure.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::marker::PhantomData;

use serde::de::{DeserializeOwned, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::*;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Tree {
    Leaf,
    Node(Box<Tree>),
}

impl Tree {
    fn nested(levels: usize) -> Tree {
        (0..levels).fold(Tree::Leaf, |tree, _| Tree::Node(Box::new(tree)))
    }
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Node {
    children: Vec<Node>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct List {
    next: Option<Box<List>>,
}

/// A type with no base case: decoding it recurses without reading a byte.
#[derive(Debug, Deserialize)]
struct Endless(#[allow(dead_code)] Box<Endless>);

/// A byte buffer decoded with `deserialize_byte_buf` (as `serde_bytes` does).
#[derive(Debug, PartialEq)]
struct ByteBuf(Vec<u8>);

impl<'de> Deserialize<'de> for ByteBuf {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BufVisitor;
        impl Visitor<'_> for BufVisitor {
            type Value = ByteBuf;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes")
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<ByteBuf, E> {
                Ok(ByteBuf(v))
            }
        }
        deserializer.deserialize_byte_buf(BufVisitor)
    }
}

/// A string whose visitor only takes an owned `String` (a misuse of serde, but
/// it decodes with bincode alone, so it must through the adapter too).
#[derive(Debug, PartialEq)]
struct OwnedOnly(String);

impl<'de> Deserialize<'de> for OwnedOnly {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OwnedVisitor;
        #[allow(clippy::serde_api_misuse)]
        impl Visitor<'_> for OwnedVisitor {
            type Value = OwnedOnly;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_string<E>(self, v: String) -> Result<OwnedOnly, E> {
                Ok(OwnedOnly(v))
            }
        }
        deserializer.deserialize_string(OwnedVisitor)
    }
}

/// A sequence whose visitor preallocates whatever the size hint says.
#[derive(Debug)]
struct Greedy(#[allow(dead_code)] Vec<u64>);

impl<'de> Deserialize<'de> for Greedy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct GreedyVisitor;
        impl<'de> Visitor<'de> for GreedyVisitor {
            type Value = Greedy;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sequence")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Greedy, A::Error> {
                let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(value) = seq.next_element()? {
                    values.push(value);
                }
                Ok(Greedy(values))
            }
        }
        deserializer.deserialize_seq(GreedyVisitor)
    }
}

/// Catches its contents' error and carries on, as some "default on error"
/// wrappers do.
#[derive(Debug)]
struct Swallow(#[allow(dead_code)] Option<Tree>);

impl<'de> Deserialize<'de> for Swallow {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Swallow(Tree::deserialize(deserializer).ok()))
    }
}

fn header(codec: u8) -> Vec<u8> {
    crate::codec::header(codec, &crate::codec::Meta::default()).to_vec()
}

/// bincode's variable-length integer: one byte below 251, else 251/252/253
/// followed by a little-endian u16/u32/u64.
fn varint(n: u64) -> Vec<u8> {
    match n {
        0..=250 => vec![n as u8],
        251..=0xFFFF => [&[251][..], &(n as u16).to_le_bytes()].concat(),
        0x1_0000..=0xFFFF_FFFF => [&[252][..], &(n as u32).to_le_bytes()].concat(),
        _ => [&[253][..], &n.to_le_bytes()].concat(),
    }
}

/// Header, then `prefix`, then `zeros` zero bytes.
fn bincode_bytes(prefix: &[u8], zeros: usize) -> Vec<u8> {
    let mut bytes = header(BincodeCodec::ID);
    bytes.reserve(prefix.len() + zeros);
    bytes.extend_from_slice(prefix);
    bytes.resize(bytes.len() + zeros, 0);
    bytes
}

#[track_caller]
fn assert_decode_error<T: DeserializeOwned + fmt::Debug>(bytes: &[u8], message: &str) {
    match decode::<_, T>(&BincodeCodec, bytes) {
        Err(CodecError::Decode(m)) => assert!(m.contains(message), "{m:?} lacks {message:?}"),
        other => panic!("expected a decode error saying {message:?}, got {other:?}"),
    }
}

#[track_caller]
fn assert_round_trip<T: Serialize + DeserializeOwned + PartialEq + fmt::Debug>(value: &T) {
    let bytes = encode(&BincodeCodec, value).unwrap();
    assert_eq!(&decode::<_, T>(&BincodeCodec, &bytes).unwrap(), value);
}

const DEPTH: &str = "nesting deeper than 128 levels";
const ELEMENTS: &str = "elements in a payload of";
const DECODED: &str = "decoded value larger than";

#[test]
fn deep_recursive_values_are_an_error_not_a_stack_overflow() {
    for levels in [10_000, 100_000] {
        // Tree: variant 1 (Node) `levels` times, then 0 (Leaf).
        let bytes = bincode_bytes(&vec![1; levels], 1);
        assert_decode_error::<Tree>(&bytes, DEPTH);
        // Node: one child `levels` times, then no children.
        assert_decode_error::<Node>(&bytes, DEPTH);
        // List: Some `levels` times, then None.
        assert_decode_error::<List>(&bytes, DEPTH);
        assert_decode_error::<(u8, Vec<Option<Box<Tree>>>)>(&bytes, DEPTH);
    }
    // Recursion that reads no byte at all.
    assert_decode_error::<Endless>(&header(BincodeCodec::ID), DEPTH);
}

#[test]
fn the_depth_bound_is_exact() {
    // A tree of n nodes is n + 1 nested enums.
    assert_round_trip(&Tree::nested(MAX_DEPTH - 1));
    let bytes = encode(&BincodeCodec, &Tree::nested(MAX_DEPTH)).unwrap();
    assert_decode_error::<Tree>(&bytes, DEPTH);
}

#[test]
fn zero_sized_sequences_with_huge_lengths_stop() {
    for len in [1u64 << 62, u64::MAX] {
        let bytes = bincode_bytes(&varint(len), 0);
        assert_decode_error::<Vec<()>>(&bytes, ELEMENTS);
        assert_decode_error::<BTreeSet<()>>(&bytes, ELEMENTS);
        assert_decode_error::<Vec<[u8; 0]>>(&bytes, ELEMENTS);
        assert_decode_error::<Vec<PhantomData<u64>>>(&bytes, ELEMENTS);
        assert_decode_error::<HashMap<(), ()>>(&bytes, ELEMENTS);
    }
}

#[test]
fn huge_claims_in_a_payload_over_32_mib_fail_without_allocating() {
    const ZEROS: usize = 33 << 20;
    let claim = varint(1 << 40);
    let bytes = bincode_bytes(&claim, ZEROS);
    assert_decode_error::<String>(&bytes, "UnexpectedEnd");
    assert_decode_error::<ByteBuf>(&bytes, "UnexpectedEnd");
    // 33 Mi zero bytes, then the end of the payload.
    assert_decode_error::<Vec<u8>>(&bytes, "UnexpectedEnd");
    // 2^40 strings, the first claiming 2^40 bytes. (Zeros after the count
    // would be 33 Mi empty strings: a real value, about 800 MB in memory.)
    let bytes = bincode_bytes(&[claim.clone(), claim].concat(), ZEROS);
    assert_decode_error::<Vec<String>>(&bytes, "UnexpectedEnd");
}

#[test]
fn huge_claims_in_a_small_payload_fail() {
    for len in [1u64 << 40, 1 << 62, u64::MAX] {
        let claim = varint(len);
        let bytes = bincode_bytes(&claim, 16);
        assert_decode_error::<String>(&bytes, "UnexpectedEnd");
        assert_decode_error::<ByteBuf>(&bytes, "UnexpectedEnd");
        assert_decode_error::<OwnedOnly>(&bytes, "UnexpectedEnd");
        assert_decode_error::<Vec<u8>>(&bytes, "UnexpectedEnd");
        assert_decode_error::<Greedy>(&bytes, "UnexpectedEnd");
        let bytes = bincode_bytes(&[claim.clone(), claim].concat(), 16);
        assert_decode_error::<Vec<String>>(&bytes, "UnexpectedEnd");
    }
}

#[test]
fn sparse_values_far_larger_than_their_payload_are_refused() {
    // Two million `None`s of 264 bytes each: 528 MB in memory from 2 MB.
    let count = 2_000_000;
    let bytes = bincode_bytes(&varint(count), count as usize);
    assert_decode_error::<Vec<Option<[u64; 32]>>>(&bytes, DECODED);
    // The same bytes as small values are fine.
    assert_eq!(
        decode::<_, Vec<Option<u8>>>(&BincodeCodec, &bytes)
            .unwrap()
            .len(),
        count as usize
    );
}

#[test]
fn a_swallowed_bound_error_still_fails() {
    let bytes = bincode_bytes(&[1; 1_000], 1);
    assert_decode_error::<Swallow>(&bytes, DEPTH);
}

#[test]
fn values_near_the_bounds_round_trip() {
    assert_round_trip(&Tree::nested(100));
    assert_round_trip(&vec![(); 100_000]);
    assert_round_trip(&vec![1u128; 100_000]);
    assert_round_trip(&vec![String::new(); 100_000]);
    assert_round_trip(&vec![7u8; 20 << 20]);
    assert_round_trip(&"x".repeat(20 << 20));
    let bytes = encode(&BincodeCodec, &"y".repeat(20 << 20)).unwrap();
    assert_eq!(
        decode::<_, ByteBuf>(&BincodeCodec, &bytes).unwrap().0.len(),
        20 << 20
    );
    assert_eq!(
        decode::<_, OwnedOnly>(&BincodeCodec, &encode(&BincodeCodec, &"owned").unwrap()),
        Ok(OwnedOnly("owned".into()))
    );
    let map: HashMap<String, Vec<u32>> = (0..1_000)
        .map(|i| (i.to_string(), vec![i; i as usize % 7]))
        .collect();
    assert_round_trip(&map);
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Unit;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Meters(f64);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Shape {
    Dot,
    Circle(u32),
    Pair(i8, char),
    Rect { w: u16, h: u16 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct KitchenSink {
    unit: Unit,
    meters: Meters,
    shapes: Vec<Shape>,
    big: (i128, u128),
    text: Option<String>,
    nothing: Option<Box<KitchenSink>>,
    bytes: std::borrow::Cow<'static, [u8]>,
    map: std::collections::BTreeMap<String, Option<Vec<i64>>>,
    fixed: [u16; 5],
    flags: (bool, (), PhantomData<u8>),
}

fn kitchen_sink() -> KitchenSink {
    let inner = KitchenSink {
        unit: Unit,
        meters: Meters(-0.5),
        shapes: vec![],
        big: (i128::MIN, u128::MAX),
        text: None,
        nothing: None,
        bytes: vec![].into(),
        map: Default::default(),
        fixed: [0; 5],
        flags: (false, (), PhantomData),
    };
    KitchenSink {
        shapes: vec![
            Shape::Dot,
            Shape::Circle(7),
            Shape::Pair(-3, 'ß'),
            Shape::Rect { w: 2, h: 300 },
        ],
        text: Some("ünïcode".into()),
        nothing: Some(Box::new(inner.clone())),
        bytes: vec![0, 255, 251].into(),
        map: [("a".into(), Some(vec![-1, i64::MAX])), ("b".into(), None)].into(),
        fixed: [1, 2, 3, 4, 65_535],
        flags: (true, (), PhantomData),
        ..inner
    }
}

#[test]
fn every_kind_of_serde_value_round_trips() {
    assert_round_trip(&kitchen_sink());
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

#[test]
fn decode_bounded_works_with_any_deserializer() {
    use serde::de::value::{Error, SeqDeserializer};
    let numbers = SeqDeserializer::<_, Error>::new(0u32..5);
    assert_eq!(
        decode_bounded::<Vec<u32>, _>(numbers, 5),
        Ok(vec![0, 1, 2, 3, 4])
    );
    let endless = SeqDeserializer::<_, Error>::new(std::iter::repeat(()));
    match decode_bounded::<Vec<()>, _>(endless, 0) {
        Err(CodecError::Decode(m)) => assert!(m.contains(ELEMENTS), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[cfg(feature = "json")]
mod json {
    use super::*;

    fn json_bytes(payload: &str) -> Vec<u8> {
        [header(JsonCodec::ID), payload.as_bytes().to_vec()].concat()
    }

    #[test]
    fn deep_json_is_an_error() {
        for levels in [10_000, 100_000] {
            let deep = json_bytes(&format!("{}{}", "[".repeat(levels), "]".repeat(levels)));
            assert!(matches!(
                decode::<_, serde_json::Value>(&JsonCodec, &deep),
                Err(CodecError::Decode(_))
            ));
            let tree = json_bytes(&format!(
                "{}\"Leaf\"{}",
                "{\"Node\":".repeat(levels),
                "}".repeat(levels)
            ));
            assert!(matches!(
                decode::<_, Tree>(&JsonCodec, &tree),
                Err(CodecError::Decode(_))
            ));
        }
    }

    #[test]
    fn json_values_near_the_bounds_round_trip() {
        for value in [Tree::nested(100), Tree::Leaf] {
            let bytes = encode(&JsonCodec, &value).unwrap();
            assert_eq!(decode::<_, Tree>(&JsonCodec, &bytes).unwrap(), value);
        }
        let units = vec![(); 100_000];
        let bytes = encode(&JsonCodec, &units).unwrap();
        assert_eq!(decode::<_, Vec<()>>(&JsonCodec, &bytes).unwrap(), units);
        let text = "z".repeat(1 << 20);
        let bytes = encode(&JsonCodec, &text).unwrap();
        assert_eq!(decode::<_, String>(&JsonCodec, &bytes).unwrap(), text);
        assert_eq!(
            decode::<_, OwnedOnly>(&JsonCodec, &json_bytes("\"a\\nb\"")),
            Ok(OwnedOnly("a\nb".into()))
        );
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "kind")]
    enum Tagged {
        A { x: u8 },
        B { y: Option<String> },
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(untagged)]
    enum Untagged {
        Number(u64),
        Text(String),
        List(Vec<Untagged>),
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Flattened {
        id: u32,
        #[serde(flatten)]
        rest: HashMap<String, serde_json::Value>,
    }

    #[test]
    fn json_buffered_and_self_describing_values_round_trip() {
        let sink = kitchen_sink();
        let bytes = encode(&JsonCodec, &sink).unwrap();
        assert_eq!(decode::<_, KitchenSink>(&JsonCodec, &bytes).unwrap(), sink);
        for value in [
            Tagged::A { x: 1 },
            Tagged::B {
                y: Some("y".into()),
            },
        ] {
            let bytes = encode(&JsonCodec, &value).unwrap();
            assert_eq!(decode::<_, Tagged>(&JsonCodec, &bytes).unwrap(), value);
        }
        let untagged = Untagged::List(vec![Untagged::Number(3), Untagged::Text("t".into())]);
        let bytes = encode(&JsonCodec, &untagged).unwrap();
        assert_eq!(decode::<_, Untagged>(&JsonCodec, &bytes).unwrap(), untagged);
        let flat = json_bytes(r#"{"id": 4, "extra": [1, {"k": null}], "more": "m"}"#);
        let value = decode::<_, Flattened>(&JsonCodec, &flat).unwrap();
        assert_eq!(value.id, 4);
        assert_eq!(value.rest.len(), 2);
        let any = json_bytes(r#"{"a": [1, 2.5, "x", null, true, {"b": {}}]}"#);
        let value = decode::<_, serde_json::Value>(&JsonCodec, &any).unwrap();
        assert_eq!(value["a"][5]["b"], serde_json::json!({}));
    }

    #[test]
    fn json_trailing_characters_are_rejected() {
        assert!(matches!(
            decode::<_, u8>(&JsonCodec, &json_bytes("7 x")),
            Err(CodecError::Decode(_))
        ));
        assert_eq!(decode::<_, u8>(&JsonCodec, &json_bytes(" 7 \n")), Ok(7));
    }
}
