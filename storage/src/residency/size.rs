//! Sizes as people write them: `--ram-budget 300M`, `ram_budget = "30%"`.

/// `"300M"`, `"1.5G"`, `"123456"` or `"30%"` (of `whole`) as bytes.
pub fn parse_size(s: &str, whole: u64) -> Result<u64, String> {
    let t = s.trim();
    if let Some(p) = t.strip_suffix('%') {
        let pct: f64 = p
            .trim()
            .parse()
            .map_err(|_| format!("{p:?} is not a number"))?;
        if !(pct > 0.0 && pct <= 100.0) {
            return Err("a percentage must be in (0, 100]".into());
        }
        return Ok((whole as f64 * pct / 100.0) as u64);
    }
    let lower = t.to_ascii_lowercase();
    let body = lower.trim_end_matches("ib").trim_end_matches('b');
    let (num, mul) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 1u64 << 10),
        Some('m') => (&body[..body.len() - 1], 1 << 20),
        Some('g') => (&body[..body.len() - 1], 1 << 30),
        Some('t') => (&body[..body.len() - 1], 1 << 40),
        _ => (body, 1),
    };
    let v: f64 = num.trim().parse().map_err(|_| {
        "expected bytes with an optional K/M/G/T suffix, or a percentage".to_string()
    })?;
    if !(v.is_finite() && v > 0.0) || v * mul as f64 > 1e18 {
        return Err("must be a positive size".into());
    }
    Ok((v * mul as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_in_every_spelling_and_nonsense_is_refused() {
        assert_eq!(parse_size("1024", 0), Ok(1024));
        assert_eq!(parse_size("300M", 0), Ok(300 << 20));
        assert_eq!(parse_size("300MiB", 0), Ok(300 << 20));
        assert_eq!(parse_size("1.5g", 0), Ok(3 << 29));
        assert_eq!(parse_size("30%", 1000), Ok(300));
        for bad in ["", "x", "-5M", "0", "150%", "0%", "1e30", "NaNG"] {
            assert!(parse_size(bad, 1000).is_err(), "{bad}");
        }
    }
}
