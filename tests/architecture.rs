//! The house's shape: the import graph between the top-level modules of `src/` has no
//! circle, and the edges that would make one (a low module reaching up) stay cut.
//!
//! The graph is read from the source text: every `crate::<module>` a file names in code
//! (comments left out), grouped imports (`use crate::{a, b::c}`) included, is an edge
//! from the file's top-level module to `<module>`.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Edges known to close a circle today, each left to the change that owns its file.
/// Remove an entry when its edge goes: the test then keeps it gone.
const KNOWN: &[(&str, &str, &str)] = &[];

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The text of `source` without its `//` comments (doc comments included): a link in a
/// comment is not an import.
fn code_of(source: &str) -> String {
    source
        .lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident(text: &str) -> String {
    text.chars()
        .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
        .collect()
}

/// The top-level modules a piece of code names through `crate::`.
fn targets(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for rest in code.split("crate::").skip(1) {
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::{c, d}, e}`: the names at depth 0 of the group.
            let mut depth = 0;
            let mut at_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => at_start = true,
                    c if at_start && !c.is_whitespace() => {
                        at_start = false;
                        found.insert(ident(&group[i..]));
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found.retain(|m| !m.is_empty() && m != "self");
    found
}

fn graph() -> Graph {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let first = relative.components().next().unwrap().as_os_str();
        let module = first.to_str().unwrap().trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let source = std::fs::read_to_string(&file).unwrap();
        let edges = graph.entry(module.clone()).or_default();
        edges.extend(
            targets(&code_of(&source))
                .into_iter()
                .filter(|t| *t != module),
        );
    }
    graph
}

/// The circles of `graph`: its strongly connected components of more than one module
/// (Tarjan's algorithm).
fn circles(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        for w in s.graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.stack.contains(&w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                component.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v.as_str()) {
            visit(&mut state, v);
        }
    }
    state.found
}

fn without_known(mut graph: Graph) -> Graph {
    for (from, to, _) in KNOWN {
        if let Some(edges) = graph.get_mut(*from) {
            edges.remove(*to);
        }
    }
    graph
}

#[test]
fn the_reader_sees_real_imports_only() {
    let code =
        code_of("use crate::{a, b::{c, d}, e::f};\n/// [`crate::g`]\nlet x = crate::h::i();");
    let found: Vec<String> = targets(&code).into_iter().collect();
    assert_eq!(found, ["a", "b", "e", "h"]);
    let mut circular = Graph::new();
    circular.entry("x".into()).or_default().insert("y".into());
    circular.entry("y".into()).or_default().insert("x".into());
    circular.entry("z".into()).or_default().insert("x".into());
    assert_eq!(
        circles(&circular),
        vec![vec!["x".to_string(), "y".to_string()]]
    );
}

#[test]
fn no_circle_between_top_level_modules() {
    let graph = graph();
    assert!(graph.len() >= 20, "too few modules read: {graph:?}");
    let found = circles(&without_known(graph.clone()));
    assert!(
        found.is_empty(),
        "modules that import each other (directly or around a circle): {found:?}\n\
         graph: {graph:#?}"
    );
    for (from, to, why) in KNOWN {
        assert!(
            graph.get(*from).is_some_and(|e| e.contains(*to)),
            "{from} -> {to} ({why}) is gone: remove it from KNOWN"
        );
    }
}

/// The edges that used to run upward stay cut: the lowest modules import nothing of the
/// domain, the HTTP layer is reached only from start-up, and nothing reaches start-up.
#[test]
fn low_modules_do_not_reach_up() {
    let graph = graph();
    let imports = |m: &str| graph.get(m).cloned().unwrap_or_default();
    let importers = |m: &str| -> BTreeSet<String> {
        graph
            .iter()
            .filter(|(_, to)| to.contains(m))
            .map(|(from, _)| from.clone())
            .collect()
    };
    assert!(importers("app").is_empty(), "{:?}", importers("app"));
    assert_eq!(importers("http"), BTreeSet::from(["app".to_string()]));
    // Services are given the narrow interface; only start-up knows the bus.
    assert!(
        imports("invalidation").is_empty(),
        "{:?}",
        imports("invalidation")
    );
    assert_eq!(importers("bus"), BTreeSet::from(["app".to_string()]));
    // Metrics and the generic cache sit under everything that counts or caches.
    let metrics: BTreeSet<String> = imports("metrics");
    assert!(metrics.iter().all(|m| m == "clock"), "{metrics:?}");
    for low in ["usage", "pool", "client_keys", "prices"] {
        for high in ["http", "app", "admission", "reporting", "accounting", "bus"] {
            assert!(
                !imports(low).contains(high),
                "{low} imports {high}, a module above it"
            );
        }
    }
}
