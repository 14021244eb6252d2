//! Model names and what a user-typed model spec refers to.

use std::path::{Path, PathBuf};

use super::error::{Result, StoreError};

/// Longest accepted model name; file systems limit a component to 255 bytes and the store adds
/// suffixes such as `.gguf` and `.json`.
const MAX_NAME_LEN: usize = 128;

/// Checks that `name` can only ever name a file directly inside the store's `models/` folder.
///
/// Allowed: `[A-Za-z0-9._-]+`, not starting with a dot and without `..`, so neither `../x`,
/// `a/b` nor hidden files can be reached through a name.
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(StoreError::BadName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 128 characters");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return if c == '/' || c == '\\' {
            bad("contains a path separator")
        } else {
            bad("only letters, digits, '.', '_' and '-' are allowed")
        };
    }
    if name.starts_with('.') {
        return bad("starts with a dot");
    }
    if name.contains("..") {
        return bad("contains \"..\"");
    }
    Ok(())
}

/// What a model spec typed by a user refers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Spec {
    /// An existing regular file outside (or inside) the store.
    Path(PathBuf),
    /// An `http(s)://` URL, with Hugging Face shorthands already expanded.
    Url(String),
    /// A store name (already validated).
    Name(String),
}

impl Spec {
    /// Classifies `spec`: URLs first, then existing files, then names. A spec with a path
    /// separator that names no file is reported as a missing file, which says more than
    /// "bad name" would.
    pub(crate) fn parse(spec: &str) -> Result<Spec> {
        if let Some(url) = expand_url(spec) {
            return Ok(Spec::Url(url));
        }
        let path = Path::new(spec);
        if !spec.is_empty() && path.is_file() {
            return Ok(Spec::Path(path.to_path_buf()));
        }
        if spec.contains('/') || spec.contains('\\') {
            return Err(match std::fs::metadata(path) {
                Ok(meta) => StoreError::NotAFile {
                    path: path.to_path_buf(),
                    kind: file_kind(&meta.file_type()),
                },
                Err(_) => StoreError::NoSuchFile {
                    path: path.to_path_buf(),
                },
            });
        }
        validate_name(spec)?;
        Ok(Spec::Name(spec.to_owned()))
    }
}

/// What a file type is, in words, for [`StoreError::NotAFile`].
pub fn file_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// Returns the URL to fetch when `spec` is one: `http(s)://...`, or a scheme-less Hugging Face
/// link (`hf.co/...`, `huggingface.co/...`). Hugging Face `/blob/` page links are turned into
/// `/resolve/` links, which serve the file itself rather than an HTML page about it.
fn expand_url(spec: &str) -> Option<String> {
    let url = if spec.starts_with("https://") || spec.starts_with("http://") {
        spec.to_owned()
    } else if spec.starts_with("hf.co/") || spec.starts_with("huggingface.co/") {
        format!("https://{spec}")
    } else {
        return None;
    };
    let is_hf = ["https://hf.co/", "https://huggingface.co/"]
        .iter()
        .any(|p| url.starts_with(p));
    Some(if is_hf {
        url.replacen("/blob/", "/resolve/", 1)
    } else {
        url
    })
}

/// Derives a store name from the last path segment of a URL (`.../Foo-Q4_K_M.gguf?x=1` →
/// `Foo-Q4_K_M`).
pub(crate) fn name_from_url(url: &str) -> Result<String> {
    let without_query = url.split(['?', '#']).next().unwrap_or(url);
    let file = without_query.rsplit('/').next().unwrap_or("");
    if file.is_empty() {
        return Err(StoreError::BadUrl {
            url: url.to_owned(),
            reason: "it has no file name; pass --name",
        });
    }
    name_from_file_name(file)
}

/// Derives a store name from a file name by dropping a `.gguf` extension.
pub(crate) fn name_from_file_name(file: &str) -> Result<String> {
    let stem = file.strip_suffix(".gguf").unwrap_or(file);
    validate_name(stem)?;
    Ok(stem.to_owned())
}

/// Parses a user-supplied SHA-256 into lowercase hex.
pub(crate) fn parse_sha256(value: &str) -> Result<String> {
    let v = value.trim().to_ascii_lowercase();
    if v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(v)
    } else {
        Err(StoreError::BadSha256 {
            value: value.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugging_face_links_are_expanded() {
        assert_eq!(
            expand_url("hf.co/u/r/blob/main/m.gguf").as_deref(),
            Some("https://hf.co/u/r/resolve/main/m.gguf")
        );
        assert_eq!(expand_url("gemma3-270m"), None);
    }

    #[test]
    fn names_from_urls() {
        assert_eq!(
            name_from_url("https://x.org/a/Foo-Q4_K_M.gguf?download=1").ok(),
            Some("Foo-Q4_K_M".to_owned())
        );
        assert!(name_from_url("https://x.org/a/").is_err());
        assert!(name_from_url("https://x.org/a/.gguf").is_err());
    }
}
