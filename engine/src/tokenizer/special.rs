//! Carving special tokens out of text before the subword algorithm sees it — llama.cpp's
//! `tokenizer_st_partition`.
//!
//! llama.cpp takes the special tokens longest first and, for each, splits every remaining
//! text fragment at its occurrences. We keep that exact order (it decides overlaps), but first
//! find which special tokens occur in the text at all with one pass over a byte trie, so a
//! 262k vocabulary with thousands of control tokens costs nothing for ordinary prompts.

use std::ops::Range;

/// A piece of the input: text still to tokenize, or a special token already decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Fragment {
    Text(Range<usize>),
    Token(u32),
}

struct Node {
    /// Sorted by byte.
    children: Vec<(u8, u32)>,
    /// The token ending here, if any.
    token: Option<u32>,
}

struct Special {
    id: u32,
    text: Box<str>,
    /// User-defined tokens are split out even when special tokens are not parsed.
    always: bool,
}

pub(super) struct SpecialMatcher {
    nodes: Vec<Node>,
    /// Indexed by position in this list from trie terminals; sorted longest text first, then
    /// by id, which is the order llama.cpp applies them in.
    specials: Vec<Special>,
}

impl SpecialMatcher {
    /// `tokens`: (id, text, always-matched) of every control, user-defined and unknown token.
    pub(super) fn new<'a>(tokens: impl Iterator<Item = (u32, &'a str, bool)>) -> Self {
        let mut specials: Vec<Special> = tokens
            .filter(|(_, text, _)| !text.is_empty())
            .map(|(id, text, always)| Special {
                id,
                text: text.into(),
                always,
            })
            .collect();
        specials.sort_by(|a, b| b.text.len().cmp(&a.text.len()).then(a.id.cmp(&b.id)));
        let mut nodes = vec![Node {
            children: Vec::new(),
            token: None,
        }];
        for (idx, s) in specials.iter().enumerate() {
            let mut cur = 0usize;
            for &b in s.text.as_bytes() {
                cur = match nodes[cur].children.binary_search_by_key(&b, |&(k, _)| k) {
                    Ok(i) => nodes[cur].children[i].1 as usize,
                    Err(i) => {
                        let next = nodes.len();
                        nodes.push(Node {
                            children: Vec::new(),
                            token: None,
                        });
                        nodes[cur].children.insert(i, (b, next as u32));
                        next
                    }
                };
            }
            // Duplicate texts: keep the first in application order.
            if nodes[cur].token.is_none() {
                nodes[cur].token = Some(idx as u32);
            }
        }
        SpecialMatcher { nodes, specials }
    }

    /// Indices (into `specials`) of the special tokens occurring anywhere in `text`, sorted.
    fn present(&self, text: &[u8], parse_special: bool) -> Vec<usize> {
        let mut found = vec![false; self.specials.len()];
        let mut any = false;
        for start in 0..text.len() {
            let mut cur = 0usize;
            for &b in &text[start..] {
                match self.nodes[cur]
                    .children
                    .binary_search_by_key(&b, |&(k, _)| k)
                {
                    Ok(i) => cur = self.nodes[cur].children[i].1 as usize,
                    Err(_) => break,
                }
                if let Some(idx) = self.nodes[cur].token {
                    let idx = idx as usize;
                    if parse_special || self.specials[idx].always {
                        found[idx] = true;
                        any = true;
                    }
                }
            }
        }
        if !any {
            return Vec::new();
        }
        found
            .iter()
            .enumerate()
            .filter_map(|(i, &f)| f.then_some(i))
            .collect()
    }

    /// Splits `text` into text fragments and special tokens.
    pub(super) fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let mut frags = Vec::new();
        if text.is_empty() {
            return frags;
        }
        frags.push(Fragment::Text(0..text.len()));
        for idx in self.present(text.as_bytes(), parse_special) {
            let special = &self.specials[idx];
            let needle = &*special.text;
            let mut next = Vec::with_capacity(frags.len() + 2);
            for frag in frags {
                let Fragment::Text(range) = frag else {
                    next.push(frag);
                    continue;
                };
                let mut start = range.start;
                // Special token texts are valid UTF-8 and matched on char boundaries of the
                // haystack because `str::find` only reports those.
                while let Some(pos) = text[start..range.end].find(needle) {
                    let at = start + pos;
                    if at > start {
                        next.push(Fragment::Text(start..at));
                    }
                    next.push(Fragment::Token(special.id));
                    start = at + needle.len();
                }
                if start < range.end {
                    next.push(Fragment::Text(start..range.end));
                }
            }
            frags = next;
        }
        frags
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_first_and_user_defined_always() {
        let m = SpecialMatcher::new(
            [(1, "<a>", false), (2, "<a><b>", false), (3, "  ", true)].into_iter(),
        );
        let text = "x<a><b>  <a>";
        assert_eq!(
            m.partition(text, true),
            vec![
                Fragment::Text(0..1),
                Fragment::Token(2),
                Fragment::Token(3),
                Fragment::Token(1)
            ]
        );
        assert_eq!(
            m.partition(text, false),
            vec![
                Fragment::Text(0..7),
                Fragment::Token(3),
                Fragment::Text(9..12)
            ]
        );
        assert!(m.partition("", true).is_empty());
    }
}
