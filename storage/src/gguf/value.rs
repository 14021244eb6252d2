//! Metadata values and the key → value table with typed getters.
//!
//! Writers disagree on integer widths (one converter stores `block_count` as u32, another as
//! u64 or i32), so the integer getters accept any integer type whose value fits, and only a
//! value that cannot be represented is a [`GgufError::WrongType`].

use std::collections::HashMap;

use super::GgufError;

/// The wire ids of the metadata value types.
pub(crate) mod type_id {
    pub(crate) const U8: u32 = 0;
    pub(crate) const I8: u32 = 1;
    pub(crate) const U16: u32 = 2;
    pub(crate) const I16: u32 = 3;
    pub(crate) const U32: u32 = 4;
    pub(crate) const I32: u32 = 5;
    pub(crate) const F32: u32 = 6;
    pub(crate) const BOOL: u32 = 7;
    pub(crate) const STRING: u32 = 8;
    pub(crate) const ARRAY: u32 = 9;
    pub(crate) const U64: u32 = 10;
    pub(crate) const I64: u32 = 11;
    pub(crate) const F64: u32 = 12;
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(ArrayValue),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A homogeneous metadata array. Arrays of arrays may mix element types per inner array.
#[derive(Clone, Debug, PartialEq)]
pub enum ArrayValue {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
    Array(Vec<ArrayValue>),
}

impl Value {
    /// The GGUF wire id of this value's type.
    pub fn type_id(&self) -> u32 {
        match self {
            Self::U8(_) => type_id::U8,
            Self::I8(_) => type_id::I8,
            Self::U16(_) => type_id::U16,
            Self::I16(_) => type_id::I16,
            Self::U32(_) => type_id::U32,
            Self::I32(_) => type_id::I32,
            Self::F32(_) => type_id::F32,
            Self::Bool(_) => type_id::BOOL,
            Self::String(_) => type_id::STRING,
            Self::Array(_) => type_id::ARRAY,
            Self::U64(_) => type_id::U64,
            Self::I64(_) => type_id::I64,
            Self::F64(_) => type_id::F64,
        }
    }

    /// The type's name as gguf-py prints it, lower case ("u32", "string", "array").
    pub fn type_name(&self) -> &'static str {
        type_name_of(self.type_id())
    }

    /// The value as a signed 128-bit integer when it is of any integer type; wide enough to hold
    /// both u64 and i64 so range checks need no casts that could wrap.
    fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            Self::U8(v) => v.into(),
            Self::I8(v) => v.into(),
            Self::U16(v) => v.into(),
            Self::I16(v) => v.into(),
            Self::U32(v) => v.into(),
            Self::I32(v) => v.into(),
            Self::U64(v) => v.into(),
            Self::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// A short description for error messages: the type, and the value when it is a scalar.
    fn describe(&self) -> String {
        match self {
            Self::String(_) => "a string".to_owned(),
            Self::Array(a) => format!("an array of {} {}", a.len(), a.type_name()),
            Self::F32(v) => format!("f32 {v}"),
            Self::F64(v) => format!("f64 {v}"),
            Self::Bool(v) => format!("bool {v}"),
            other => match other.as_integer() {
                Some(i) => format!("{} {i}", other.type_name()),
                None => other.type_name().to_owned(),
            },
        }
    }
}

/// The lower-case name of a value type id; "unknown" for ids outside 0..=12.
pub(crate) fn type_name_of(id: u32) -> &'static str {
    match id {
        type_id::U8 => "u8",
        type_id::I8 => "i8",
        type_id::U16 => "u16",
        type_id::I16 => "i16",
        type_id::U32 => "u32",
        type_id::I32 => "i32",
        type_id::F32 => "f32",
        type_id::BOOL => "bool",
        type_id::STRING => "string",
        type_id::ARRAY => "array",
        type_id::U64 => "u64",
        type_id::I64 => "i64",
        type_id::F64 => "f64",
        _ => "unknown",
    }
}

impl ArrayValue {
    /// Number of elements (inner arrays count as one element each).
    pub fn len(&self) -> usize {
        match self {
            Self::U8(v) => v.len(),
            Self::I8(v) => v.len(),
            Self::U16(v) => v.len(),
            Self::I16(v) => v.len(),
            Self::U32(v) => v.len(),
            Self::I32(v) => v.len(),
            Self::F32(v) => v.len(),
            Self::Bool(v) => v.len(),
            Self::String(v) => v.len(),
            Self::U64(v) => v.len(),
            Self::I64(v) => v.len(),
            Self::F64(v) => v.len(),
            Self::Array(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The GGUF wire id of the element type.
    pub fn elem_type_id(&self) -> u32 {
        match self {
            Self::U8(_) => type_id::U8,
            Self::I8(_) => type_id::I8,
            Self::U16(_) => type_id::U16,
            Self::I16(_) => type_id::I16,
            Self::U32(_) => type_id::U32,
            Self::I32(_) => type_id::I32,
            Self::F32(_) => type_id::F32,
            Self::Bool(_) => type_id::BOOL,
            Self::String(_) => type_id::STRING,
            Self::U64(_) => type_id::U64,
            Self::I64(_) => type_id::I64,
            Self::F64(_) => type_id::F64,
            Self::Array(_) => type_id::ARRAY,
        }
    }

    /// The element type's name ("string", "f32", "array", ...).
    pub fn type_name(&self) -> &'static str {
        type_name_of(self.elem_type_id())
    }
}

/// The metadata key/value table: entries in file order, plus an index for O(1) lookup.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metadata {
    entries: Vec<(String, Value)>,
    index: HashMap<String, usize>,
}

impl Metadata {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an entry at the end; gives the value back if the key is already present, because a
    /// GGUF file with duplicate keys is ambiguous.
    pub fn insert(&mut self, key: String, value: Value) -> Result<(), Value> {
        if self.index.contains_key(&key) {
            return Err(value);
        }
        self.index.insert(key.clone(), self.entries.len());
        self.entries.push((key, value));
        Ok(())
    }

    /// Reserves room for `n` more entries.
    pub(crate) fn reserve(&mut self, n: usize) {
        self.entries.reserve(n);
        self.index.reserve(n);
    }

    /// The value stored under `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.entries[i].1)
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// All entries in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Looks `key` up and converts it with `f`; `f` returning `None` means the present value has
    /// an incompatible type, reported as [`GgufError::WrongType`].
    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &'static str,
        f: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<Option<T>, GgufError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match f(v) {
            Some(t) => Ok(Some(t)),
            None => Err(GgufError::WrongType {
                key: key.to_owned(),
                expected,
                found: v.describe(),
            }),
        }
    }

    /// A string value.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        self.typed(key, "a string", |v| match v {
            Value::String(s) => Some(s.as_str()),
            _ => None,
        })
    }

    /// Any integer type holding a non-negative value.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.typed(key, "a non-negative integer", |v| {
            v.as_integer().and_then(|i| u64::try_from(i).ok())
        })
    }

    /// Any integer type whose value fits in u32.
    pub fn get_u32(&self, key: &str) -> Result<Option<u32>, GgufError> {
        self.typed(key, "an integer in u32 range", |v| {
            v.as_integer().and_then(|i| u32::try_from(i).ok())
        })
    }

    /// Any integer type whose value fits in i64.
    pub fn get_i64(&self, key: &str) -> Result<Option<i64>, GgufError> {
        self.typed(key, "an integer in i64 range", |v| {
            v.as_integer().and_then(|i| i64::try_from(i).ok())
        })
    }

    /// An f32, an f64 (rounded to f32) or an integer (converted), finite: every number a model
    /// is configured with (an epsilon, a RoPE base, a scale) is, and a NaN or an infinity would
    /// only turn the model's output to garbage without an error.
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>, GgufError> {
        self.typed(key, "a finite number", |v| {
            match *v {
                Value::F32(f) => Some(f),
                Value::F64(f) => Some(f as f32),
                _ => v.as_integer().map(|i| i as f32),
            }
            .filter(|f| f.is_finite())
        })
    }

    /// A bool value.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        self.typed(key, "a bool", |v| match *v {
            Value::Bool(b) => Some(b),
            _ => None,
        })
    }

    /// An array of any element type.
    pub fn get_array(&self, key: &str) -> Result<Option<&ArrayValue>, GgufError> {
        self.typed(key, "an array", |v| match v {
            Value::Array(a) => Some(a),
            _ => None,
        })
    }

    /// An array of strings (a vocabulary, merges).
    pub fn get_str_array(&self, key: &str) -> Result<Option<&[String]>, GgufError> {
        self.typed(key, "an array of string", |v| match v {
            Value::Array(ArrayValue::String(a)) => Some(a.as_slice()),
            _ => None,
        })
    }

    /// An array of f32 (token scores).
    pub fn get_f32_array(&self, key: &str) -> Result<Option<&[f32]>, GgufError> {
        self.typed(key, "an array of f32", |v| match v {
            Value::Array(ArrayValue::F32(a)) => Some(a.as_slice()),
            _ => None,
        })
    }

    /// An array of i32 (token types).
    pub fn get_i32_array(&self, key: &str) -> Result<Option<&[i32]>, GgufError> {
        self.typed(key, "an array of i32", |v| match v {
            Value::Array(ArrayValue::I32(a)) => Some(a.as_slice()),
            _ => None,
        })
    }

    /// Like [`Metadata::get_str`], but a missing key is an error.
    pub fn require_str(&self, key: &str) -> Result<&str, GgufError> {
        self.get_str(key)?.ok_or_else(|| missing(key))
    }

    /// Like [`Metadata::get_u32`], but a missing key is an error.
    pub fn require_u32(&self, key: &str) -> Result<u32, GgufError> {
        self.get_u32(key)?.ok_or_else(|| missing(key))
    }

    /// Like [`Metadata::get_u64`], but a missing key is an error.
    pub fn require_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get_u64(key)?.ok_or_else(|| missing(key))
    }

    /// Like [`Metadata::get_f32`], but a missing key is an error.
    pub fn require_f32(&self, key: &str) -> Result<f32, GgufError> {
        self.get_f32(key)?.ok_or_else(|| missing(key))
    }

    /// Like [`Metadata::get_bool`], but a missing key is an error.
    pub fn require_bool(&self, key: &str) -> Result<bool, GgufError> {
        self.get_bool(key)?.ok_or_else(|| missing(key))
    }

    /// Like [`Metadata::get_array`], but a missing key is an error.
    pub fn require_array(&self, key: &str) -> Result<&ArrayValue, GgufError> {
        self.get_array(key)?.ok_or_else(|| missing(key))
    }
}

fn missing(key: &str) -> GgufError {
    GgufError::MissingKey {
        key: key.to_owned(),
    }
}

impl<'a> IntoIterator for &'a Metadata {
    type Item = (&'a str, &'a Value);
    type IntoIter = Box<dyn Iterator<Item = (&'a str, &'a Value)> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Metadata {
        let mut m = Metadata::new();
        for (k, v) in [
            ("neg", Value::I32(-1)),
            ("big", Value::U64(u64::MAX)),
            ("small", Value::U8(7)),
            ("f", Value::F64(0.5)),
            ("s", Value::String("x".into())),
        ] {
            assert!(m.insert(k.into(), v).is_ok());
        }
        m
    }

    #[test]
    fn integer_getters_accept_any_width_that_fits() {
        let m = table();
        assert_eq!(m.get_u32("small").ok().flatten(), Some(7));
        assert_eq!(m.get_u64("big").ok().flatten(), Some(u64::MAX));
        assert_eq!(m.get_i64("neg").ok().flatten(), Some(-1));
        assert!(matches!(m.get_u64("neg"), Err(GgufError::WrongType { .. })));
        assert!(matches!(m.get_u32("big"), Err(GgufError::WrongType { .. })));
        assert!(matches!(m.get_i64("big"), Err(GgufError::WrongType { .. })));
        assert_eq!(m.get_f32("f").ok().flatten(), Some(0.5));
        assert_eq!(m.get_f32("small").ok().flatten(), Some(7.0));
        assert!(m.get_u32("absent").is_ok_and(|v| v.is_none()));
        assert!(matches!(
            m.require_u32("absent"),
            Err(GgufError::MissingKey { .. })
        ));
        let e = m
            .get_u32("s")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("'s'") && e.contains("string"), "{e}");
    }

    #[test]
    fn duplicate_insert_is_refused() {
        let mut m = table();
        assert!(m.insert("s".into(), Value::Bool(true)).is_err());
        assert_eq!(m.len(), 5);
    }
}
