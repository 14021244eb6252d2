//! `strata run`'s three ways of talking to a model, as llama-cli has them: complete a prompt;
//! converse (`-cnv`) through the model's chat template; and interactive (`-i`/`-if`) raw text,
//! where you take over whenever generation stops.

use std::io::{BufRead, Write};

use anyhow::Context as _;
use strata_engine::chat::{ChatMessage, ChatTemplate};

use super::generate::{Generator, Stop};
use super::text::Palette;

/// What the modes need beside the generator.
pub struct Io<'a> {
    pub palette: Palette,
    pub display_prompt: bool,
    /// `--prompt-cache FILE` and whether it is read-only (completion only).
    pub prompt_cache: Option<(&'a std::path::Path, bool)>,
}

/// Completes `prompt` and ends.
pub fn complete(g: &mut Generator<'_>, io: &Io<'_>, prompt: &str) -> anyhow::Result<()> {
    let tokens = g.model.tokenizer.encode(prompt, true, true);
    if tokens.is_empty() {
        anyhow::bail!("the prompt is empty and this model adds no BOS token; give one with -p");
    }
    let mut out = std::io::stdout().lock();
    if io.display_prompt {
        write!(out, "{}{prompt}{}", io.palette.prompt, io.palette.reset)?;
        out.flush()?;
    }
    let start = match io.prompt_cache {
        Some((path, read_only)) => g.prompt_cache(path, &tokens, read_only)?,
        None => 0,
    };
    g.generate(&tokens[start..], &mut out)?;
    writeln!(out)?;
    Ok(())
}

/// Reads one line of input after printing `prompt`, coloured as the user's text; `None` at
/// the end of input.
fn read_line(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    out: &mut impl Write,
    prompt: &str,
    palette: Palette,
) -> anyhow::Result<Option<String>> {
    write!(out, "{prompt}{}", palette.input)?;
    out.flush()?;
    let line = lines.next().transpose().context("reading standard input");
    write!(out, "{}", palette.reset)?;
    out.flush()?;
    line
}

/// Chat through `template`: the system prompt first, then `first` (llama-cli's `-p` in
/// conversation mode) and each line of standard input as your turns. Ctrl-C stops an answer;
/// `single_turn` (`-st`) ends after the first answer.
pub fn converse(
    g: &mut Generator<'_>,
    io: &Io<'_>,
    template: &ChatTemplate,
    system: Option<String>,
    mut first: Option<String>,
    single_turn: bool,
) -> anyhow::Result<()> {
    let mut history = Vec::new();
    if let Some(sys) = system {
        history.push(ChatMessage::new("system", sys));
    }
    // Tokens the context holds, so each turn only evaluates what is new.
    let mut cached: Vec<u32> = Vec::new();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut out = std::io::stdout().lock();
    loop {
        let line = match first.take() {
            Some(text) => {
                if io.display_prompt {
                    write!(out, "\n> {}{text}{}\n", io.palette.input, io.palette.reset)?;
                }
                text
            }
            None => match read_line(&mut lines, &mut out, "\n> ", io.palette)? {
                Some(l) => l,
                None => break,
            },
        };
        if line.trim().is_empty() {
            continue;
        }
        history.push(ChatMessage::new("user", line));
        let rendered = template.render(&history, true)?;
        // The tokenizer adds BOS itself; drop the template's copy so there is only one.
        let text = template
            .bos_prefix()
            .and_then(|p| rendered.strip_prefix(p))
            .unwrap_or(&rendered);
        let tokens = g.model.tokenizer.encode(text, true, true);
        let common = cached
            .iter()
            .zip(&tokens)
            .take_while(|(a, b)| a == b)
            .count()
            .min(tokens.len().saturating_sub(1));
        g.truncate(common)?;
        let a = g.generate(&tokens[common..], &mut out)?;
        writeln!(out)?;
        if a.stop == Stop::Interrupted && a.text.is_empty() {
            // Nothing was said; the question goes too, so it can be asked again.
            history.pop();
            cached = tokens[..common].to_vec();
        } else {
            cached = tokens;
            history.push(ChatMessage::new("assistant", a.text));
        }
        // The answer's own tokens are re-derived from the template on the next turn.
        cached.truncate(g.ctx.n_past());
        if single_turn {
            break;
        }
    }
    Ok(())
}

/// llama-cli's `-i`: `prompt` is read and continued as plain text; whenever generation stops
/// (the model ends, `-n` tokens, a reverse prompt, Ctrl-C) a line of yours is appended and
/// generation goes on. With `first` (`-if`) you type before anything is generated.
pub fn interactive(
    g: &mut Generator<'_>,
    io: &Io<'_>,
    prompt: Option<&str>,
    first: bool,
) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut out = std::io::stdout().lock();
    let mut pending = prompt.unwrap_or_default().to_owned();
    if io.display_prompt && !pending.is_empty() {
        write!(out, "{}{pending}{}", io.palette.prompt, io.palette.reset)?;
        out.flush()?;
    }
    let mut wait = first || pending.is_empty();
    let mut unfed: Option<u32> = None;
    loop {
        if wait {
            match read_line(&mut lines, &mut out, "", io.palette)? {
                // The line's newline is part of what you typed, as in llama-cli.
                Some(l) => pending.push_str(&format!("{l}\n")),
                None => break,
            }
        }
        wait = true;
        // Only the very first text gets BOS.
        let first_text = g.ctx.n_past() == 0;
        let mut tokens: Vec<u32> = unfed.take().into_iter().collect();
        tokens.extend(g.model.tokenizer.encode(&pending, first_text, true));
        pending.clear();
        if tokens.is_empty() {
            continue;
        }
        let a = g.generate(&tokens, &mut out)?;
        match a.stop {
            Stop::ContextFull => break,
            Stop::Eog => writeln!(out)?,
            _ => {}
        }
        unfed = a.unfed;
    }
    writeln!(out)?;
    Ok(())
}
