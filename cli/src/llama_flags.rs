//! llama.cpp's spelling of flags, read before clap parses the command line.
//!
//! llama.cpp's tools spell many flags with one dash and several letters (`-ngl`, `-tb`, `-cnv`,
//! llama-bench's `-pg`) and never group single-letter flags, while clap reads `-tb` as `-t b`
//! and `-hf` as `-h f`. So before clap sees the arguments, every single-dash word of two or more
//! letters in a flag position is looked up in [`SPELLINGS`], llama.cpp's own table of such words
//! and the long flags they stand for, and becomes that long flag when the subcommand has it. A
//! word the subcommand does not have is refused by its own name, with the reason from
//! [`UNSUPPORTED`] where strata knows why; so is any other single-dash word, since clap would
//! read it as a group of letters. Values are never rewritten: the subcommand's clap definition
//! says which flags take one, so `-p -cnv` keeps its prompt. Numbers attached to a short flag
//! (`-n32`, `-t2`) are left for clap.

use std::ffi::OsString;

/// llama.cpp's single-dash multi-letter words and the long flag each stands for (as in
/// llama.cpp's `common/arg.cpp` and llama-bench). A subcommand accepts a word by defining the
/// long flag; the rewrite needs no other change.
const SPELLINGS: &[(&str, &str)] = &[
    ("-cnv", "conversation"),
    ("-no-cnv", "no-conversation"),
    ("-sys", "system-prompt"),
    ("-st", "single-turn"),
    ("-co", "color"),
    ("-tb", "threads-batch"),
    ("-ub", "ubatch-size"),
    ("-fa", "flash-attn"),
    ("-ctk", "cache-type-k"),
    ("-ctv", "cache-type-v"),
    ("-ot", "override-tensor"),
    ("-cmoe", "cpu-moe"),
    ("-ncmoe", "n-cpu-moe"),
    ("-ngl", "n-gpu-layers"),
    ("-nkvo", "no-kv-offload"),
    ("-sm", "split-mode"),
    ("-mg", "main-gpu"),
    ("-ts", "tensor-split"),
    ("-dev", "device"),
    ("-hf", "hf-repo"),
    ("-hfr", "hf-repo"),
    ("-hff", "hf-file"),
    ("-hft", "hf-token"),
    ("-mu", "model-url"),
    ("-mli", "multiline-input"),
    ("-np", "parallel"),
    ("-cb", "cont-batching"),
    ("-nocb", "no-cont-batching"),
    ("-md", "model-draft"),
    ("-ngld", "n-gpu-layers-draft"),
    ("-mm", "mmproj"),
    ("-lcs", "lookup-cache-static"),
    ("-lcd", "lookup-cache-dynamic"),
    ("-dt", "defrag-thold"),
    ("-gan", "grp-attn-n"),
    ("-gaw", "grp-attn-w"),
    ("-kvu", "kv-unified"),
    ("-lv", "verbosity"),
    ("-to", "timeout"),
    ("-pg", "prompt-gen"),
    ("-nopo", "no-op-offload"),
];

/// llama.cpp flags strata does not take, and why (by long name, without dashes).
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "main-gpu",
        "strata uses one GPU per model; choose it with --device cuda:N",
    ),
    (
        "tensor-split",
        "strata uses one GPU per model (one daemon per GPU serves more); there is no split",
    ),
    (
        "n-gpu-layers-draft",
        "strata keeps the draft model (-md) in RAM and computes it on the CPU",
    ),
    (
        "no-op-offload",
        "strata's planner decides per layer what the GPU computes (see `strata plan`)",
    ),
    (
        "hf-repo",
        "strata does not search Hugging Face repositories; give the file's URL instead: \
         -m https://huggingface.co/USER/REPO/resolve/main/FILE.gguf",
    ),
    (
        "hf-file",
        "strata does not search Hugging Face repositories; give the file's URL with -m",
    ),
    (
        "hf-token",
        "strata downloads only public files; give the file's URL with -m",
    ),
    ("model-url", "give the URL with -m, which takes URLs"),
    ("mmproj", "strata runs text models only"),
    (
        "multiline-input",
        "strata run reads one line per message; `strata chat` takes multi-line input",
    ),
    (
        "parallel",
        "strata run generates one sequence; stratad batches parallel requests (--parallel)",
    ),
    (
        "cont-batching",
        "strata run generates one sequence; stratad batches continuously",
    ),
    (
        "no-cont-batching",
        "strata run generates one sequence; stratad batches continuously",
    ),
    (
        "lookup-cache-static",
        "strata's lookup drafts keep no cache file; use --spec-type ngram-map-k",
    ),
    (
        "lookup-cache-dynamic",
        "strata's lookup drafts keep no cache file; use --spec-type ngram-map-k",
    ),
    (
        "defrag-thold",
        "strata's KV cache is paged and never needs defragmenting",
    ),
    ("grp-attn-n", "strata has no self-extend (group attention)"),
    ("grp-attn-w", "strata has no self-extend (group attention)"),
    (
        "kv-unified",
        "strata run has one sequence, whose KV cache is its own",
    ),
    (
        "verbosity",
        "use -v, or STRATA_LOG=info|debug for strata's logs",
    ),
    ("timeout", "strata run is not a server; see stratad"),
];

/// The reason strata gives for not taking llama.cpp's `--long`, if it knows one.
fn unsupported(long: &str) -> Option<&'static str> {
    UNSUPPORTED
        .iter()
        .find(|(l, _)| *l == long)
        .map(|(_, why)| *why)
}

/// What the subcommand knows about a flag: whether it exists and whether it takes a value
/// that must be the next word.
fn lookup_long<'c>(cmd: &'c clap::Command, long: &str) -> Option<&'c clap::Arg> {
    cmd.get_arguments().find(|a| {
        a.get_long() == Some(long) || a.get_all_aliases().is_some_and(|al| al.contains(&long))
    })
}

fn lookup_short(cmd: &clap::Command, short: char) -> Option<&clap::Arg> {
    cmd.get_arguments().find(|a| {
        a.get_short() == Some(short)
            || a.get_all_short_aliases()
                .is_some_and(|al| al.contains(&short))
    })
}

/// Whether `arg` takes the next word as its value (not optional values, which clap decides).
fn takes_next(arg: &clap::Arg) -> bool {
    arg.get_num_args()
        .is_some_and(|r| r.min_values() > 0 && r.takes_values())
}

/// Rewrites llama.cpp's spellings in `args` (the program name first) for clap, or says which
/// word strata does not take and why. `cli` is the whole command; the subcommand is found in
/// `args`.
pub fn rewrite(cli: &clap::Command, args: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let mut out = Vec::with_capacity(args.len());
    let mut words = args.into_iter();
    out.extend(words.next());
    // The subcommand: the first word that is not a flag (`strata` itself has only -h/-V).
    let mut sub: Option<&clap::Command> = None;
    for w in words.by_ref() {
        let name = w.to_str().map(str::to_owned);
        out.push(w);
        if let Some(name) = name
            && !name.starts_with('-')
        {
            sub = cli.find_subcommand(&name);
            break;
        }
    }
    // A subcommand that passes its words on (`serve`'s flags for stratad) is not read here.
    let Some(sub) = sub.filter(|s| !s.get_arguments().any(|a| a.is_trailing_var_arg_set())) else {
        out.extend(words);
        return Ok(out);
    };
    let sub_name = sub.get_name();
    let mut value_next = false;
    while let Some(w) = words.next() {
        let Some(word) = w.to_str() else {
            value_next = false;
            out.push(w);
            continue;
        };
        if value_next {
            value_next = false;
            out.push(w);
            continue;
        }
        if word == "--" {
            out.push(w);
            out.extend(words);
            break;
        }
        if let Some(long) = word.strip_prefix("--") {
            let (name, inline) = split_value(long);
            match lookup_long(sub, name) {
                Some(arg) => value_next = inline.is_none() && takes_next(arg),
                None => {
                    if let Some(why) = unsupported(name) {
                        return Err(format!(
                            "--{name} is not supported by strata {sub_name}: {why}"
                        ));
                    }
                }
            }
            out.push(w);
            continue;
        }
        let Some(short) = word.strip_prefix('-') else {
            out.push(w);
            continue;
        };
        let mut chars = short.chars();
        let Some(first) = chars.next() else {
            // A lone `-` (standard input, to some tools) is a value clap judges.
            out.push(w);
            continue;
        };
        if chars.as_str().is_empty() {
            value_next = lookup_short(sub, first).is_some_and(takes_next);
            out.push(w);
            continue;
        }
        // A negative number in a flag position is a positional value (or clap's error).
        if short.parse::<f64>().is_ok() {
            out.push(w);
            continue;
        }
        let (name, inline) = split_value(short);
        if let Some((_, long)) = SPELLINGS.iter().find(|(s, _)| s[1..] == *name) {
            match lookup_long(sub, long) {
                Some(arg) => {
                    value_next = inline.is_none() && takes_next(arg);
                    out.push(match inline {
                        Some(v) => format!("--{long}={v}").into(),
                        None => format!("--{long}").into(),
                    });
                    continue;
                }
                None => {
                    let why = unsupported(long).map_or_else(String::new, |why| format!(": {why}"));
                    return Err(format!(
                        "-{name} (llama.cpp's --{long}) is not supported by strata {sub_name}{why}"
                    ));
                }
            }
        }
        // A short flag with its number attached, as clap allows: `-n32`, `-t2`, `-n-1`.
        let rest = chars.as_str();
        if lookup_short(sub, first).is_some_and(takes_next) && rest.parse::<f64>().is_ok() {
            out.push(w);
            continue;
        }
        return Err(format!(
            "unknown flag -{name} for strata {sub_name}: flags are read whole, as llama.cpp reads \
             them (write -a -b, not -ab); `strata {sub_name} --help` lists them"
        ));
    }
    Ok(out)
}

/// `name=value` → (`name`, `Some(value)`).
fn split_value(s: &str) -> (&str, Option<&str>) {
    match s.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (s, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command};

    fn cli() -> Command {
        let run = Command::new("run")
            .arg(Arg::new("threads").short('t').long("threads"))
            .arg(Arg::new("threads-batch").long("threads-batch"))
            .arg(Arg::new("n-gpu-layers").long("n-gpu-layers"))
            .arg(Arg::new("prompt").short('p').long("prompt"))
            .arg(Arg::new("n").short('n').long("n-predict"))
            .arg(
                Arg::new("conversation")
                    .long("conversation")
                    .action(ArgAction::SetTrue),
            )
            .arg(
                Arg::new("flash-attn")
                    .long("flash-attn")
                    .num_args(0..=1)
                    .default_missing_value("on"),
            );
        let mut c = Command::new("strata").subcommand(run);
        c.build();
        c
    }

    fn rw(args: &[&str]) -> Result<Vec<String>, String> {
        let args = std::iter::once("strata")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        rewrite(&cli(), args).map(|v| {
            v.into_iter()
                .skip(1)
                .map(|s| s.into_string().expect("utf-8"))
                .collect()
        })
    }

    #[test]
    fn multi_letter_words_become_the_long_flags_they_stand_for() {
        assert_eq!(
            rw(&["run", "-tb", "2", "-cnv", "-t", "4"]),
            Ok(vec![
                "run".into(),
                "--threads-batch".into(),
                "2".into(),
                "--conversation".into(),
                "-t".into(),
                "4".into()
            ])
        );
        assert_eq!(
            rw(&["run", "-tb=3"]),
            Ok(vec!["run".into(), "--threads-batch=3".into()])
        );
        // An optional value is clap's to take: the next word stays a word.
        assert_eq!(
            rw(&["run", "-fa", "-cnv"]),
            Ok(vec![
                "run".into(),
                "--flash-attn".into(),
                "--conversation".into()
            ])
        );
    }

    #[test]
    fn values_are_never_rewritten() {
        let got = rw(&["run", "-p", "-cnv", "--prompt", "-tb", "-n", "-1"]).expect("rewrites");
        assert_eq!(got, ["run", "-p", "-cnv", "--prompt", "-tb", "-n", "-1"]);
        let got = rw(&["run", "--", "-tb"]).expect("rewrites");
        assert_eq!(got, ["run", "--", "-tb"]);
    }

    #[test]
    fn attached_numbers_stay_for_clap() {
        assert_eq!(
            rw(&["run", "-n32", "-t2"]).expect("ok"),
            ["run", "-n32", "-t2"]
        );
    }

    #[test]
    fn words_the_subcommand_lacks_are_refused_by_their_own_name() {
        assert_eq!(
            rw(&["run", "-ngl", "99"]).expect("a GPU flag"),
            ["run", "--n-gpu-layers", "99"]
        );
        let e = rw(&["run", "-ts", "1,1"]).expect_err("no split");
        assert!(e.starts_with("-ts (llama.cpp's --tensor-split)"), "{e}");
        assert!(e.contains("one GPU"), "{e}");
        let e = rw(&["run", "-hf", "user/repo"]).expect_err("no hf");
        assert!(e.contains("-hf") && e.contains("resolve/main"), "{e}");
        let e = rw(&["run", "--hf-repo", "user/repo"]).expect_err("no hf");
        assert!(e.starts_with("--hf-repo is not supported"), "{e}");
        let e = rw(&["run", "-xyz"]).expect_err("unknown");
        assert!(e.starts_with("unknown flag -xyz for strata run"), "{e}");
        // A long flag nobody knows is clap's to refuse (with its suggestions).
        assert!(rw(&["run", "--bogus"]).is_ok());
    }

    #[test]
    fn every_spelling_is_a_flag_of_strata_or_has_a_reason() {
        use clap::CommandFactory as _;
        let mut cli = crate::Cli::command();
        cli.build();
        for (short, long) in SPELLINGS {
            let defined = cli
                .get_subcommands()
                .any(|sub| lookup_long(sub, long).is_some());
            assert!(
                defined || unsupported(long).is_some(),
                "{short} → --{long}: no subcommand has it and no reason is given"
            );
        }
        for (long, _) in UNSUPPORTED {
            assert!(
                cli.get_subcommands()
                    .all(|sub| sub.get_name() == "serve" || lookup_long(sub, long).is_none()),
                "--{long} is defined but listed as unsupported"
            );
        }
    }

    #[test]
    fn commands_without_a_subcommand_pass_through() {
        assert_eq!(rw(&["--version"]).expect("ok"), ["--version"]);
        assert_eq!(rw(&["nope", "-tb"]).expect("ok"), ["nope", "-tb"]);
    }

    #[test]
    fn words_passed_on_to_another_program_are_left_alone() {
        use clap::CommandFactory as _;
        let mut cli = crate::Cli::command();
        cli.build();
        let args = ["strata", "serve", "--model", "m", "-ngl", "9"];
        let got = rewrite(&cli, args.iter().map(OsString::from).collect()).expect("passes");
        assert_eq!(got, args.map(OsString::from));
    }
}
