//! Bytes read back from Redis can be anything: decoding them must return, Ok or
//! Err, without a panic, a stack overflow, an endless loop or an allocation
//! failure, whatever the type asked for. No Redis needed.
//!
//! - `arbitrary_*` / `mutated_*`: proptest over random bytes (with and without a
//!   header) and over mutated valid encodings (bit flips, truncations, splices of
//!   huge varint length prefixes and of runs that nest deeply), decoded as every
//!   shape in [`SHAPES`]. When a decode succeeds, re-encoding and decoding again
//!   must give an equal value.
//! - `the_corpus_decodes_without_panicking`: every `tests/decode_corpus/*.bin` as
//!   every shape with every codec; `attack-<shape>-*.bin` must be a decode error
//!   for `<shape>` with the codec its header names.
//!
//! Run with `cargo test --all-features --test suite -- decode_fuzz::`; the JSON parts need
//! the `json` feature.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::path::Path;

use locked_cache::codec::{self, HEADER_LEN};
use locked_cache::{BincodeCodec, Codec, CodecError};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::Config;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Tree {
    Leaf,
    Node(Box<Tree>),
}

impl Tree {
    fn nested(levels: usize) -> Tree {
        (0..levels).fold(Tree::Leaf, |tree, _| Tree::Node(Box::new(tree)))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Node {
    children: Vec<Node>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Record {
    byte: u8,
    name: Option<String>,
}

type Map = HashMap<String, Vec<u32>>;
type TupleTree = (u8, Vec<Option<Box<Tree>>>);

/// The codecs under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Bincode,
    #[cfg(feature = "json")]
    Json,
}

const CODECS: &[Which] = &[
    Which::Bincode,
    #[cfg(feature = "json")]
    Which::Json,
];

impl Which {
    fn id(self) -> u8 {
        match self {
            Which::Bincode => BincodeCodec::ID,
            #[cfg(feature = "json")]
            Which::Json => locked_cache::JsonCodec::ID,
        }
    }

    fn from_id(id: u8) -> Option<Which> {
        CODECS.iter().copied().find(|c| c.id() == id)
    }

    fn header(self) -> Vec<u8> {
        codec::header(self.id(), &codec::Meta::default()).to_vec()
    }

    fn encode<T: Serialize>(self, value: &T) -> Vec<u8> {
        match self {
            Which::Bincode => codec::encode(&BincodeCodec, value),
            #[cfg(feature = "json")]
            Which::Json => codec::encode(&locked_cache::JsonCodec, value),
        }
        .expect("encode")
    }

    fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, CodecError> {
        match self {
            Which::Bincode => codec::decode(&BincodeCodec, bytes),
            #[cfg(feature = "json")]
            Which::Json => codec::decode(&locked_cache::JsonCodec, bytes),
        }
    }
}

/// Decodes `bytes` (header included) as a `T` with `codec`; when that works,
/// re-encodes and decodes again and checks the value is unchanged.
fn check<T>(codec: Which, bytes: &[u8]) -> Result<(), CodecError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let value = codec.decode::<T>(bytes)?;
    let again = codec.encode(&value);
    let back = codec
        .decode::<T>(&again)
        .unwrap_or_else(|e| panic!("{codec:?}: re-encoded {value:?} does not decode: {e}"));
    assert_eq!(back, value, "{codec:?}: the round trip changed the value");
    Ok(())
}

type Check = fn(Which, &[u8]) -> Result<(), CodecError>;

/// The value shapes every input is decoded as, by the name attack files use.
const SHAPES: &[(&str, Check)] = &[
    ("string", check::<String>),
    ("vec_u8", check::<Vec<u8>>),
    ("u64", check::<u64>),
    ("record", check::<Record>),
    ("vec_unit", check::<Vec<()>>),
    ("btreeset_unit", check::<BTreeSet<()>>),
    ("map", check::<Map>),
    ("tree", check::<Tree>),
    ("node", check::<Node>),
    ("tuple_tree", check::<TupleTree>),
];

/// Decodes `payload` as every shape with every codec: as is (usually foreign
/// bytes) and behind each codec's header.
fn check_all(payload: &[u8]) {
    for &codec in CODECS {
        let headed = [codec.header(), payload.to_vec()].concat();
        for (_, check) in SHAPES {
            let _ = check(codec, payload);
            let _ = check(codec, &headed);
        }
    }
}

/// Valid payloads (no header) of every shape, to mutate.
fn seeds(codec: Which) -> Vec<Vec<u8>> {
    fn payload<T: Serialize>(codec: Which, value: &T) -> Vec<u8> {
        codec.encode(value)[HEADER_LEN..].to_vec()
    }
    let node = Node {
        children: vec![
            Node { children: vec![] },
            Node {
                children: vec![Node { children: vec![] }],
            },
        ],
    };
    let map: Map = [("a".into(), vec![1, 300, 70_000]), ("".into(), vec![])].into();
    vec![
        payload(codec, &"hello"),
        payload(codec, &String::new()),
        payload(codec, &"é".repeat(40)),
        payload(codec, &vec![0u8, 1, 250, 251, 255]),
        payload(codec, &0u64),
        payload(codec, &u64::MAX),
        payload(
            codec,
            &Record {
                byte: 7,
                name: Some("n".into()),
            },
        ),
        payload(
            codec,
            &Record {
                byte: 0,
                name: None,
            },
        ),
        payload(codec, &vec![(); 3]),
        payload(codec, &BTreeSet::from([()])),
        payload(codec, &map),
        payload(codec, &Tree::nested(0)),
        payload(codec, &Tree::nested(5)),
        payload(codec, &Tree::nested(127)),
        payload(codec, &node),
        payload(codec, &(3u8, vec![None, Some(Box::new(Tree::nested(2)))])),
    ]
}

/// Fragments spliced into bincode payloads: huge varint length prefixes, and
/// bytes that start nested values.
const BINCODE_SPLICES: &[&[u8]] = &[
    &[253, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    &[253, 0, 0, 0, 0, 0, 0, 0, 0x40],
    &[253, 0, 0, 0, 0, 0, 1, 0, 0],
    &[252, 0xff, 0xff, 0xff, 0xff],
    &[251, 0xff, 0xff],
    &[254, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    &[255],
    &[1, 1, 1, 1, 1, 1, 1, 1],
    &[0xC0, 0x80],
];

/// Fragments spliced into JSON payloads.
#[cfg(feature = "json")]
const JSON_SPLICES: &[&[u8]] = &[
    b"[",
    b"{",
    b"{\"Node\":",
    b"\"",
    b"\\u0000",
    b"\\ud800",
    b"1e99999",
    b"18446744073709551616",
    b"-1",
    b"null",
    b",",
    b"]",
    b"}",
    b":",
    b"\"Leaf\"",
    b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
];

#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Truncate(Index),
    Splice(Index, Index),
    Repeat(Index, u8, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip(at, bit)),
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), any::<Index>()).prop_map(|(at, s)| Mutation::Splice(at, s)),
        // Runs of 1 (bincode's Some, variant 1, length 1) and `[` nest deeply.
        (
            any::<Index>(),
            prop_oneof![Just(1u8), Just(b'['), any::<u8>()],
            1usize..400
        )
            .prop_map(|(at, byte, n)| Mutation::Repeat(at, byte, n)),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation], splices: &[&[u8]]) -> Vec<u8> {
    for m in mutations {
        match m {
            Mutation::Flip(at, bit) if !bytes.is_empty() => {
                let i = at.index(bytes.len());
                bytes[i] ^= 1 << bit;
            }
            Mutation::Flip(..) => {}
            Mutation::Truncate(at) => bytes.truncate(at.index(bytes.len() + 1)),
            Mutation::Splice(at, which) => {
                let i = at.index(bytes.len() + 1);
                let chunk = splices[which.index(splices.len())];
                bytes.splice(i..i, chunk.iter().copied());
            }
            Mutation::Repeat(at, byte, n) => {
                let i = at.index(bytes.len() + 1);
                bytes.splice(i..i, std::iter::repeat_n(*byte, *n));
            }
        }
    }
    bytes
}

/// `cases` per test, or `PROPTEST_CASES` for a longer run by hand.
fn config(cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(cases);
    Config {
        cases,
        // Failures go to tests/decode_corpus by hand, not to a regressions file.
        failure_persistence: None,
        ..Config::default()
    }
}

// Case counts keep the file within a few seconds in a debug build: an input
// that decodes as a huge `Vec<()>` or `BTreeSet<()>` costs a million elements
// (60-100 ms unoptimised) before the element bound stops it, and a fifth of the
// varint-heavy and mutated bincode inputs do. `PROPTEST_CASES=20000` for a long
// run (in release: `cargo test --release --all-features --test suite -- decode_fuzz::`).
proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn arbitrary_bytes(payload in prop::collection::vec(any::<u8>(), 0..160)) {
        check_all(&payload);
    }
}

proptest! {
    #![proptest_config(config(96))]

    #[test]
    fn arbitrary_varint_heavy_bytes(
        payload in prop::collection::vec(
            prop::sample::select(vec![0u8, 1, 2, 3, 250, 251, 252, 253, 254, 255]),
            0..160,
        )
    ) {
        check_all(&payload);
    }
}

proptest! {
    #![proptest_config(config(192))]

    #[test]
    fn mutated_bincode_encodings(
        seed in any::<Index>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let seeds = seeds(Which::Bincode);
        let seed = seeds[seed.index(seeds.len())].clone();
        check_all(&mutate(seed, &mutations, BINCODE_SPLICES));
    }
}

#[cfg(feature = "json")]
proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn mutated_json_encodings(
        seed in any::<Index>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let seeds = seeds(Which::Json);
        let seed = seeds[seed.index(seeds.len())].clone();
        check_all(&mutate(seed, &mutations, JSON_SPLICES));
    }
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

/// The hand-made attacks kept in the corpus, by file name:
/// `attack-<shape>-<what>.bin`, each a decode error for `<shape>`. (The 33 MiB
/// payloads are built in the codec's unit tests instead.)
fn attacks() -> Vec<(String, Vec<u8>)> {
    let b = |payload: &[&[u8]]| [&Which::Bincode.header(), payload.concat().as_slice()].concat();
    let deep = [vec![1u8; 10_000], vec![0]].concat();
    let claim_2p40 = varint(1 << 40);
    let attacks = vec![
        // 10,000 nested enums / structs / options: a stack overflow unbounded.
        ("attack-tree-10000-levels.bin", b(&[&deep])),
        ("attack-node-10000-levels.bin", b(&[&deep])),
        (
            "attack-tuple_tree-10000-levels.bin",
            b(&[&[0, 1, 1], &deep]),
        ),
        // 2^62 and 2^64 - 1 zero-sized elements: an endless loop unbounded.
        ("attack-vec_unit-len-2p62.bin", b(&[&varint(1 << 62)])),
        ("attack-vec_unit-len-u64max.bin", b(&[&varint(u64::MAX)])),
        ("attack-btreeset_unit-len-2p62.bin", b(&[&varint(1 << 62)])),
        (
            "attack-btreeset_unit-len-u64max.bin",
            b(&[&varint(u64::MAX)]),
        ),
        // Strings claiming 2^40 bytes: an allocation failure if allocated first.
        ("attack-string-claims-2p40.bin", b(&[&claim_2p40])),
        ("attack-vec_u8-claims-2p40.bin", b(&[&claim_2p40])),
        ("attack-record-claims-2p40.bin", b(&[&[7, 1], &claim_2p40])),
        (
            "attack-map-claims-2p62.bin",
            b(&[&varint(1 << 62), &claim_2p40]),
        ),
    ];
    #[cfg(feature = "json")]
    let attacks = {
        let mut attacks = attacks;
        let tree = format!(
            "{}\"Leaf\"{}",
            "{\"Node\":".repeat(2_000),
            "}".repeat(2_000)
        );
        let json = [Which::Json.header(), tree.into_bytes()].concat();
        attacks.push(("attack-tree-json-2000-levels.bin", json));
        attacks
    };
    attacks
        .into_iter()
        .map(|(name, bytes)| (name.to_owned(), bytes))
        .collect()
}

fn corpus_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/decode_corpus"))
}

/// Regenerates the attack files: `cargo test --all-features --test suite
/// -- --ignored decode_fuzz::write_attack_corpus`.
#[test]
#[ignore = "rewrites tests/decode_corpus/attack-*.bin"]
fn write_attack_corpus() {
    for (name, bytes) in attacks() {
        std::fs::write(corpus_dir().join(name), bytes).unwrap();
    }
}

#[test]
fn the_attack_corpus_is_up_to_date() {
    for (name, bytes) in attacks() {
        let stored = std::fs::read(corpus_dir().join(&name))
            .unwrap_or_else(|e| panic!("{name}: {e} (run write_attack_corpus)"));
        assert!(stored == bytes, "{name} differs from attacks()");
    }
}

#[test]
fn the_corpus_decodes_without_panicking() {
    let mut files = 0;
    let mut checked_attacks = 0;
    for entry in std::fs::read_dir(corpus_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "bin") {
            continue;
        }
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let bytes = std::fs::read(&path).unwrap();
        files += 1;
        // Its payload alone and behind every codec's header (its own included).
        check_all(bytes.get(HEADER_LEN..).unwrap_or(&bytes));
        if let Some(rest) = name.strip_prefix("attack-") {
            let shape = rest.split('-').next().unwrap();
            let (_, check) = SHAPES
                .iter()
                .find(|(s, _)| *s == shape)
                .unwrap_or_else(|| panic!("{name}: no shape {shape:?}"));
            // A JSON attack without the json feature is only checked for panics.
            let Some(codec) = bytes.get(3).and_then(|&id| Which::from_id(id)) else {
                continue;
            };
            match check(codec, &bytes) {
                Err(CodecError::Decode(_)) => checked_attacks += 1,
                other => panic!("{name}: expected a decode error, got {other:?}"),
            }
        }
    }
    assert!(files > 0 && checked_attacks > 0, "empty corpus");
}
