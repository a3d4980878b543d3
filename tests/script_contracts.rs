//! Each Lua script's header table against its typed contract in `limits::scripts`: the
//! KEYS and ARGV (by position and name, and how many) and the reply codes. The types are
//! the only way the store, tests and benches call a script, so if this passes, nobody
//! sends a script arguments it does not read where it reads them.
//!
//! The header format (see `lua/admit.lua`): a section starts with a line `-- KEYS…:`,
//! `-- ARGV…:` or `-- CODES:` (`per provider key` or `per quota entry` in the heading:
//! the group repeated per key or entry); each entry is `--`, 1 to 3 spaces, its number,
//! spaces and its name; a line indented further continues the entry above; any other
//! comment line ends the section.
#![allow(clippy::unwrap_used)]

use keyward::limits::scripts::{Contract, CONTRACTS};

#[derive(Debug, Default, PartialEq)]
struct Header {
    keys: Vec<(i64, String)>,
    keys_repeated: Vec<(i64, String)>,
    argv: Vec<(i64, String)>,
    argv_repeated: Vec<(i64, String)>,
    codes: Vec<(i64, String)>,
}

fn parse(source: &str) -> Header {
    let mut header = Header::default();
    let mut section: Option<&mut Vec<(i64, String)>> = None;
    for line in source.lines() {
        let Some(text) = line.strip_prefix("--") else {
            break; // the header ends with the first line of code
        };
        let indent = text.len() - text.trim_start().len();
        let body = text.trim();
        let heading = |word: &str| indent == 1 && body.starts_with(word) && body.ends_with(':');
        if heading("KEYS") || heading("ARGV") || heading("CODES") {
            let repeated = body.contains("per provider key") || body.contains("per quota entry");
            section = Some(match (&body[..4], repeated) {
                ("KEYS", false) => &mut header.keys,
                ("KEYS", true) => &mut header.keys_repeated,
                ("ARGV", false) => &mut header.argv,
                ("ARGV", true) => &mut header.argv_repeated,
                _ => &mut header.codes,
            });
            continue;
        }
        let Some(entries) = section.as_mut() else {
            continue;
        };
        if (1..=3).contains(&indent) {
            let mut words = body.split_whitespace();
            let number = words.next().and_then(|w| w.parse::<i64>().ok());
            let name = words
                .next()
                .filter(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
            match (number, name) {
                (Some(n), Some(name)) => entries.push((n, name.to_string())),
                // Prose at the section's level: the section is over.
                _ => section = None,
            }
        } else if indent == 0 || body.is_empty() {
            section = None;
        }
        // Further indented: the entry above continues.
    }
    header
}

/// Names numbered from 1, as the header numbers them.
fn numbered(names: &[&str]) -> Vec<(i64, String)> {
    (1..).zip(names.iter().map(|n| n.to_string())).collect()
}

fn check(contract: &Contract) {
    let header = parse(contract.source);
    let file = contract.file;
    assert_eq!(header.keys, numbered(contract.keys), "{file}: KEYS");
    assert_eq!(
        header.keys_repeated,
        numbered(contract.keys_repeated),
        "{file}: KEYS per provider key"
    );
    assert_eq!(header.argv, numbered(contract.argv), "{file}: ARGV");
    assert_eq!(
        header.argv_repeated,
        numbered(contract.argv_repeated),
        "{file}: ARGV per provider key"
    );
    let codes: Vec<(i64, String)> = contract
        .codes
        .iter()
        .map(|(n, name)| (*n, name.to_string()))
        .collect();
    assert_eq!(header.codes, codes, "{file}: CODES");
}

#[test]
fn every_script_header_matches_its_typed_contract() {
    let files: Vec<&str> = CONTRACTS.iter().map(|c| c.file).collect();
    let mut on_disk: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/lua"))
        .unwrap()
        .map(|e| format!("lua/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    on_disk.sort();
    let mut typed: Vec<String> = files.iter().map(|f| f.to_string()).collect();
    typed.sort();
    assert_eq!(on_disk, typed, "every script has a typed contract");
    for contract in &CONTRACTS {
        check(contract);
    }
}

#[test]
fn the_check_fails_on_a_header_that_drifted() {
    // The test must be able to fail: swap two ARGV names, drop one, rename a code.
    let admit = CONTRACTS[0];
    assert_eq!(admit.file, "lua/admit.lua");
    let swapped = admit
        .source
        .replacen("--   1  rpm_limit", "--   1  tpm_limit", 1)
        .replacen("--   2  tpm_limit", "--   2  rpm_limit", 1);
    let dropped = admit.source.replacen("--   14 now_ms", "--   ", 1);
    let renamed = admit
        .source
        .replacen("--   8  quota", "--   8  quota_old", 1);
    for source in [swapped, dropped, renamed] {
        let leaked: &'static str = Box::leak(source.into_boxed_str());
        let drifted = Contract {
            source: leaked,
            ..admit
        };
        assert!(std::panic::catch_unwind(|| check(&drifted)).is_err());
    }
}

#[test]
fn headers_parse_into_every_entry() {
    let header = parse(CONTRACTS[0].source);
    assert_eq!(header.keys.len(), 5);
    assert_eq!(header.argv.len(), 16);
    assert_eq!(header.codes.len(), 7);
    assert_eq!(
        (header.keys_repeated.len(), header.argv_repeated.len()),
        (1, 4)
    );
    let sync = parse(CONTRACTS[4].source);
    assert_eq!((sync.argv.len(), sync.argv_repeated.len()), (2, 5));
    let read = parse(CONTRACTS[5].source);
    assert_eq!(CONTRACTS[5].file, "lua/quota_read.lua");
    assert_eq!(
        (
            read.keys.len(),
            read.keys_repeated.len(),
            read.argv.len(),
            read.argv_repeated.len()
        ),
        (0, 1, 2, 3)
    );
}
