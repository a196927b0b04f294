//! The rotator's shape, checked from its source: the import graph of
//! `src/rotator` has no circle (a module's use of its parent's items, such as
//! `super::RotatorError`, is no edge), `impl Core` is written only in
//! `core.rs`, and every module and file ARCHITECTURE.md names exists.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`, recursively.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The rotator's child modules, each with its files (`x.rs` and `x/**`).
fn rotator_modules() -> BTreeMap<String, Vec<PathBuf>> {
    let dir = root().join("src/rotator");
    let mut modules: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for file in sources(&dir) {
        let rel = file.strip_prefix(&dir).expect("under src/rotator");
        let first = rel.components().next().expect("component");
        let name = first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        modules.entry(name).or_default().push(file);
    }
    modules
}

/// The sibling modules `text` names through `super::`, `super::super::` or
/// `crate::rotator::` (including `super::{a, b}` groups).
fn named_modules(text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    for prefix in ["crate::rotator::", "super::super::", "super::"] {
        let mut rest = code.as_str();
        while let Some(at) = rest.find(prefix) {
            rest = &rest[at + prefix.len()..];
            let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                group[..end]
                    .split(',')
                    .map(|n| n.trim().split("::").next().unwrap_or("").trim())
                    .collect()
            } else {
                let end = rest
                    .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                vec![&rest[..end]]
            };
            for name in names {
                if modules.contains(name) {
                    named.insert(name.to_owned());
                }
            }
        }
    }
    named
}

/// Module -> the sibling modules it uses.
fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
    let modules = rotator_modules();
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    let mut graph = BTreeMap::new();
    for (module, files) in &modules {
        let mut uses = BTreeSet::new();
        for file in files {
            let text = std::fs::read_to_string(file).expect("read");
            uses.extend(named_modules(&text, &names));
        }
        uses.remove(module);
        graph.insert(module.clone(), uses);
    }
    graph
}

/// A circle of `graph`, if it has one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, graph, &mut Vec::new(), &mut done) {
            return Some(cycle);
        }
    }
    None
}

#[test]
fn the_rotators_import_graph_has_no_circle() {
    let graph = import_graph();
    assert!(graph.len() > 10, "too few modules found: {graph:?}");
    assert!(
        graph["fanout"].contains("core"),
        "the scan misses edges: {graph:?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "src/rotator has an import circle: {}\n{graph:#?}",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn the_cycle_check_finds_a_circle() {
    let mut graph = BTreeMap::new();
    graph.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    graph.insert("b".to_owned(), BTreeSet::from(["c".to_owned()]));
    graph.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(
        find_cycle(&graph),
        Some(
            vec!["a", "b", "c", "a"]
                .into_iter()
                .map(String::from)
                .collect()
        )
    );
    let names = BTreeSet::from(["core".to_owned(), "fleet".to_owned(), "ha".to_owned()]);
    let text = "use super::{core::Core, fleet};\nuse crate::rotator::ha::X;\n// super::nothing";
    assert_eq!(named_modules(text, &names), names);
}

#[test]
fn impl_core_is_written_only_in_core_rs() {
    let dir = root().join("src");
    for file in sources(&dir) {
        let text = std::fs::read_to_string(&file).expect("read");
        let rel = file.strip_prefix(root()).expect("under root");
        if rel == Path::new("src/rotator/core.rs") {
            continue;
        }
        assert!(
            !text.contains("impl Core {"),
            "{} has an `impl Core` block: Core's methods live in src/rotator/core.rs",
            rel.display()
        );
    }
}
