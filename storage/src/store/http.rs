//! Blocking HTTPS downloads: one agent with timeouts, status checks, streaming into a file
//! while hashing, and a few retries for connections that break mid-transfer.

use std::io::{Seek, SeekFrom};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::error::{IoContext, Result, StoreError};
use super::files::{Copied, ReadSide, TempFile, copy_hashed, hex};
use super::progress::{Progress, Transfer};

/// Attempts per download; model files are large and a broken connection is common enough that
/// one retry saves a user a manual re-run.
const ATTEMPTS: u32 = 3;

/// An HTTP client for the store. Timeouts bound connecting and each read, not the whole
/// transfer, since a multi-gigabyte model may legitimately take an hour.
pub(crate) fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(120))
        .timeout_write(Duration::from_secs(60))
        .user_agent(concat!("strata/", env!("CARGO_PKG_VERSION")))
        .redirects(10)
        .build()
}

/// GETs `url`, turning error statuses and transport failures into errors that name the URL.
pub(crate) fn get(agent: &ureq::Agent, url: &str) -> Result<ureq::Response> {
    match agent.get(url).call() {
        Ok(resp) => Ok(resp),
        Err(ureq::Error::Status(status, _)) => Err(StoreError::Http {
            url: url.to_owned(),
            status,
        }),
        Err(ureq::Error::Transport(t)) => Err(transport_error(url, &t)),
    }
}

/// A transport failure, told without the URL (ureq's own message starts with it, and the
/// error names it already). A name that does not resolve is final; the rest may be retried.
fn transport_error(url: &str, t: &ureq::Transport) -> StoreError {
    let mut reason = t.kind().to_string();
    if let Some(m) = t.message() {
        reason = format!("{reason}: {m}");
    }
    if let Some(cause) = std::error::Error::source(t) {
        let cause = cause.to_string();
        if !reason.contains(&cause) {
            reason = format!("{reason}: {cause}");
        }
    }
    match t.kind() {
        ureq::ErrorKind::Dns => StoreError::Unreachable {
            url: url.to_owned(),
            reason,
        },
        _ => StoreError::Network {
            url: url.to_owned(),
            source: reason.into(),
        },
    }
}

/// GETs `url` as text (index pages), capped at `limit` bytes.
pub(crate) fn get_text(agent: &ureq::Agent, url: &str, limit: u64) -> Result<String> {
    let resp = get(agent, url)?;
    let mut body = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(resp.into_reader(), limit),
        &mut body,
    )
    .map_err(|e| StoreError::Network {
        url: url.to_owned(),
        source: Box::new(e),
    })?;
    Ok(body)
}

/// Downloads `url` into `dest` (truncating it first), hashing as it goes and reporting progress
/// as `label`. Retries transport failures from the start; an HTTP error status or an
/// over-long body is final.
pub(crate) fn download(
    agent: &ureq::Agent,
    url: &str,
    dest: &mut TempFile,
    label: &str,
    limit: Option<u64>,
    progress: &mut dyn Progress,
) -> Result<Copied> {
    let mut attempt = 1;
    loop {
        match download_once(agent, url, dest, label, limit, progress) {
            Err(StoreError::Network { .. }) if attempt < ATTEMPTS => {
                progress.message(&format!(
                    "connection to {url} failed; retrying ({attempt}/{})",
                    ATTEMPTS - 1
                ));
                std::thread::sleep(Duration::from_secs(u64::from(attempt) * 2));
                attempt += 1;
            }
            other => return other,
        }
    }
}

fn download_once(
    agent: &ureq::Agent,
    url: &str,
    dest: &mut TempFile,
    label: &str,
    limit: Option<u64>,
    progress: &mut dyn Progress,
) -> Result<Copied> {
    let path = dest.path().to_path_buf();
    let file = dest.file()?;
    file.set_len(0).io("truncate", &path)?;
    file.seek(SeekFrom::Start(0)).io("seek", &path)?;

    let resp = get(agent, url)?;
    // A compressed body's length says nothing about the bytes we will read after decoding.
    let encoded = resp
        .header("Content-Encoding")
        .is_some_and(|e| !e.eq_ignore_ascii_case("identity"));
    let declared = resp
        .header("Content-Length")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|_| !encoded);
    if let (Some(declared), Some(limit)) = (declared, limit)
        && declared > limit
    {
        return Err(StoreError::TooLarge {
            what: url.to_owned(),
            limit,
        });
    }
    let mut reader = resp.into_reader();
    let mut transfer = Transfer::start(progress, label, declared);
    let mut hasher = Sha256::new();
    let bytes = copy_hashed(
        &mut reader,
        ReadSide::Url(url),
        Some((file, &path)),
        &mut hasher,
        limit.map(|l| (l, url)),
        &mut Some(&mut transfer),
    )?;
    if let Some(declared) = declared
        && bytes != declared
    {
        return Err(StoreError::Network {
            url: url.to_owned(),
            source: format!("body ended after {bytes} of {declared} bytes").into(),
        });
    }
    Ok(Copied {
        bytes,
        sha256: hex(&hasher.finalize()),
    })
}
