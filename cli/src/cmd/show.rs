//! `strata show MODEL`: a model's metadata and tensor table, laid out like gguf-py's
//! `gguf-dump` so the two can be compared line by line.

use std::io::Write;

use anyhow::Context as _;
use strata_storage::gguf::{ArrayValue, GgufFile, Value};
use strata_storage::store::Store;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A store name or a path to a .gguf file.
    pub model: String,
    /// Print whole arrays and strings instead of abbreviating them.
    #[arg(long)]
    pub full: bool,
    /// Print only the metadata, not the tensor table.
    #[arg(long)]
    pub no_tensors: bool,
}

/// Elements of an array printed before "..." (gguf-dump shows the same number).
const ARRAY_HEAD: usize = 5;
/// Characters of a string printed before "...".
const STRING_HEAD: usize = 60;

pub fn exec(args: Args) -> anyhow::Result<()> {
    let store = Store::open_default().context("opening the model store")?;
    let path = store
        .resolve(&args.model)
        .with_context(|| format!("model '{}'", args.model))?;
    let gguf = GgufFile::open(&path).with_context(|| format!("reading {}", path.display()))?;
    let limits = (!args.full).then_some((ARRAY_HEAD, STRING_HEAD));
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    dump(
        &mut out,
        &path.display().to_string(),
        &gguf,
        limits,
        !args.no_tensors,
    )?;
    out.flush()?;
    Ok(())
}

/// Writes the dump; `limits` = (array elements, string characters) to show, `None` for all.
fn dump(
    out: &mut impl Write,
    name: &str,
    gguf: &GgufFile,
    limits: Option<(usize, usize)>,
    tensors: bool,
) -> std::io::Result<()> {
    writeln!(out, "* Loading: {name}")?;
    writeln!(
        out,
        "* GGUF v{}, alignment {}, tensor data at offset {}, file size {} bytes",
        gguf.version, gguf.alignment, gguf.data_offset, gguf.file_size
    )?;
    // gguf-dump counts the three header fields as pseudo key/value pairs; so do we.
    writeln!(
        out,
        "* Dumping {} key/value pair(s)",
        gguf.metadata.len() + 3
    )?;
    let header = [
        ("UINT32", "GGUF.version", gguf.version.to_string()),
        (
            "UINT64",
            "GGUF.tensor_count",
            gguf.tensors.len().to_string(),
        ),
        ("UINT64", "GGUF.kv_count", gguf.metadata.len().to_string()),
    ];
    for (i, (ty, key, value)) in header.iter().enumerate() {
        writeln!(out, "{:7}: {ty:10} | {:8} | {key} = {value}", i + 1, 1)?;
    }
    for (i, (key, value)) in gguf.metadata.iter().enumerate() {
        let (ty, count) = match value {
            Value::Array(a) => (format!("[{}]", type_label(a.type_name())), a.len()),
            v => (type_label(v.type_name()).to_owned(), 1),
        };
        writeln!(
            out,
            "{:7}: {ty:10} | {count:8} | {key} = {}",
            i + 4,
            render_value(value, limits)
        )?;
    }
    if !tensors {
        return Ok(());
    }
    writeln!(out, "* Dumping {} tensor(s)", gguf.tensors.len())?;
    for (i, t) in gguf.tensors.iter().enumerate() {
        let mut dims: Vec<String> = t.dims.iter().map(|d| format!("{d:5}")).collect();
        while dims.len() < 4 {
            dims.push(format!("{:5}", 1));
        }
        writeln!(
            out,
            "{:7}: {:10} | {} | {:7} | {}",
            i + 1,
            t.n_elements,
            dims.join(", "),
            t.ty.to_string(),
            t.name
        )?;
    }
    let strided = gguf.tensors.iter().filter(|t| t.stride.is_some()).count();
    if strided > 0 {
        writeln!(
            out,
            "* {strided} expert tensor(s) laid out expert by expert (strata optimize): only strata reads this file"
        )?;
    }
    writeln!(
        out,
        "* Tensor data: {} bytes",
        gguf.tensors.iter().map(|t| t.n_bytes).sum::<u64>()
    )
}

/// gguf-dump's upper-case type names.
fn type_label(name: &str) -> &'static str {
    match name {
        "u8" => "UINT8",
        "i8" => "INT8",
        "u16" => "UINT16",
        "i16" => "INT16",
        "u32" => "UINT32",
        "i32" => "INT32",
        "f32" => "FLOAT32",
        "bool" => "BOOL",
        "string" => "STRING",
        "array" => "ARRAY",
        "u64" => "UINT64",
        "i64" => "INT64",
        "f64" => "FLOAT64",
        _ => "UNKNOWN",
    }
}

fn render_value(v: &Value, limits: Option<(usize, usize)>) -> String {
    match v {
        Value::U8(x) => x.to_string(),
        Value::I8(x) => x.to_string(),
        Value::U16(x) => x.to_string(),
        Value::I16(x) => x.to_string(),
        Value::U32(x) => x.to_string(),
        Value::I32(x) => x.to_string(),
        Value::U64(x) => x.to_string(),
        Value::I64(x) => x.to_string(),
        Value::F32(x) => x.to_string(),
        Value::F64(x) => x.to_string(),
        Value::Bool(x) => x.to_string(),
        Value::String(s) => render_str(s, limits.map(|l| l.1)),
        Value::Array(a) => render_array(a, limits),
    }
}

/// A quoted, escaped string, cut to `limit` characters (so a chat template stays one line).
fn render_str(s: &str, limit: Option<usize>) -> String {
    match limit {
        Some(n) if s.chars().count() > n => {
            let head: String = s.chars().take(n).collect();
            format!("{head:?}...")
        }
        _ => format!("{s:?}"),
    }
}

fn render_array(a: &ArrayValue, limits: Option<(usize, usize)>) -> String {
    let head = limits.map_or(usize::MAX, |l| l.0);
    let strs = limits.map(|l| l.1);
    fn items<T>(v: &[T], head: usize, f: impl Fn(&T) -> String) -> Vec<String> {
        v.iter().take(head).map(f).collect()
    }
    let mut shown = match a {
        ArrayValue::U8(v) => items(v, head, |x| x.to_string()),
        ArrayValue::I8(v) => items(v, head, |x| x.to_string()),
        ArrayValue::U16(v) => items(v, head, |x| x.to_string()),
        ArrayValue::I16(v) => items(v, head, |x| x.to_string()),
        ArrayValue::U32(v) => items(v, head, |x| x.to_string()),
        ArrayValue::I32(v) => items(v, head, |x| x.to_string()),
        ArrayValue::U64(v) => items(v, head, |x| x.to_string()),
        ArrayValue::I64(v) => items(v, head, |x| x.to_string()),
        ArrayValue::F32(v) => items(v, head, |x| x.to_string()),
        ArrayValue::F64(v) => items(v, head, |x| x.to_string()),
        ArrayValue::Bool(v) => items(v, head, |x| x.to_string()),
        ArrayValue::String(v) => items(v, head, |s| render_str(s, strs)),
        ArrayValue::Array(v) => items(v, head, |inner| render_array(inner, limits)),
    };
    if a.len() > shown.len() {
        shown.push("...".to_owned());
    }
    format!("[{}]", shown.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_arrays_and_strings_are_abbreviated() {
        let a = ArrayValue::String((0..10).map(|i| format!("t{i}")).collect());
        let limits = Some((ARRAY_HEAD, STRING_HEAD));
        assert_eq!(
            render_array(&a, limits),
            r#"["t0", "t1", "t2", "t3", "t4", ...]"#
        );
        assert_eq!(render_array(&a, None).matches(", ").count(), 9);
        assert_eq!(render_str("a\nb", Some(60)), r#""a\nb""#);
        assert_eq!(render_str("abcdef", Some(3)), r#""abc"..."#);
        assert_eq!(render_array(&ArrayValue::F32(vec![]), limits), "[]");
    }
}
