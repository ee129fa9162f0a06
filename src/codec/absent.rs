//! Whether a value is a "not found": [`is_absent`] asks serde whether a value
//! serialises as `None`, without serialising anything else, so negative caching
//! works for any `Option<T>` loader without a trait on the user's type.

use std::fmt;

use serde::Serialize;
use serde::ser::{self, Impossible};

/// True when `value` serialises as `None` (an `Option` that is `None`, or a
/// type whose `Serialize` says so). Costs one call: the first thing the value
/// serialises decides, and nothing is written.
pub fn is_absent<T: Serialize + ?Sized>(value: &T) -> bool {
    value.serialize(AbsentProbe).is_ok()
}

/// A serializer that succeeds only on `serialize_none`.
struct AbsentProbe;

/// "Not `None`": the probe stops at the first thing serialised.
#[derive(Debug)]
struct Present;

impl fmt::Display for Present {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("present")
    }
}

impl std::error::Error for Present {}

impl ser::Error for Present {
    fn custom<M: fmt::Display>(_: M) -> Self {
        Present
    }
}

macro_rules! present {
    ($($method:ident($($arg:ty),*);)*) => {
        $(fn $method(self, $(_: $arg),*) -> Result<Self::Ok, Self::Error> {
            Err(Present)
        })*
    };
}

impl ser::Serializer for AbsentProbe {
    type Ok = ();
    type Error = Present;
    type SerializeSeq = Impossible<(), Present>;
    type SerializeTuple = Impossible<(), Present>;
    type SerializeTupleStruct = Impossible<(), Present>;
    type SerializeTupleVariant = Impossible<(), Present>;
    type SerializeMap = Impossible<(), Present>;
    type SerializeStruct = Impossible<(), Present>;
    type SerializeStructVariant = Impossible<(), Present>;

    fn serialize_none(self) -> Result<(), Present> {
        Ok(())
    }

    present! {
        serialize_bool(bool);
        serialize_i8(i8);
        serialize_i16(i16);
        serialize_i32(i32);
        serialize_i64(i64);
        serialize_i128(i128);
        serialize_u8(u8);
        serialize_u16(u16);
        serialize_u32(u32);
        serialize_u64(u64);
        serialize_u128(u128);
        serialize_f32(f32);
        serialize_f64(f64);
        serialize_char(char);
        serialize_str(&str);
        serialize_bytes(&[u8]);
        serialize_unit();
        serialize_unit_struct(&'static str);
        serialize_unit_variant(&'static str, u32, &'static str);
    }

    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<(), Present> {
        Err(Present)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), Present> {
        // A newtype around an `Option` is as absent as the option.
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<(), Present> {
        Err(Present)
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, Present> {
        Err(Present)
    }

    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, Present> {
        Err(Present)
    }

    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, Present> {
        Err(Present)
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, Present> {
        Err(Present)
    }

    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Present> {
        Err(Present)
    }

    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeStruct, Present> {
        Err(Present)
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, Present> {
        Err(Present)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Wrapper(Option<u32>);

    #[derive(Serialize)]
    struct User {
        id: u32,
    }

    #[test]
    fn only_none_is_absent() {
        assert!(is_absent(&Option::<User>::None));
        assert!(is_absent(&Wrapper(None)));
        assert!(!is_absent(&Some(User { id: 1 })));
        assert!(!is_absent(&Wrapper(Some(0))));
        assert!(!is_absent(&User { id: 1 }));
        assert!(!is_absent(&()));
        assert!(!is_absent(&Vec::<u8>::new()));
        assert!(!is_absent(&String::new()));
        assert!(!is_absent(&Some(Option::<u8>::None)));
    }
}
