//! The rotator's shape, checked from its source: the import graph of
//! `src/rotator` has no circle (a module's use of its parent's items, such as
//! `super::RotatorError`, is no edge), `impl Core` is written only in
//! `core.rs`, and every module, file and item ARCHITECTURE.md and
//! docs/library.md name exists.

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

/// Every backticked name in `text` (between single backticks).
fn backticked(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// ARCHITECTURE.md and docs/library.md name only what exists: each `file.rs`
/// (or `dir/file.rs`) is a file of the crate, each module of a module map a
/// module of the library, and each `module::Item` an item written in that
/// module.
#[test]
fn architecture_md_names_only_modules_and_items_that_exist() {
    for (doc, least) in [("ARCHITECTURE.md", 40), ("docs/library.md", 5)] {
        let text = std::fs::read_to_string(root().join(doc)).expect(doc);
        let (checked, missing) = names_that_do_not_exist(&text);
        assert!(
            checked > least,
            "{doc}: too little checked ({checked}): the scan is broken"
        );
        assert!(
            missing.is_empty(),
            "{doc} names what does not exist: {missing:?}"
        );
    }
}

/// How many names of `text` were checked, and those that do not exist.
fn names_that_do_not_exist(text: &str) -> (usize, Vec<String>) {
    let files: Vec<String> = sources(&root().join("src"))
        .into_iter()
        .chain(sources(&root().join("tests")))
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let mut missing = Vec::new();
    let mut checked = 0;
    for name in backticked(text) {
        let name = name.trim();
        let is_path = name.ends_with(".rs")
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_/.".contains(c));
        if is_path {
            checked += 1;
            if !files.iter().any(|f| f.ends_with(&format!("/{name}"))) {
                missing.push(format!("file {name}"));
            }
            continue;
        }
        // `module::Item` or `module::function`: the item is written in the module.
        let Some((module, item)) = name.split_once("::") else {
            continue;
        };
        let plain =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        let item = item.split("::").next().unwrap_or("");
        let item = item.split('(').next().unwrap_or("");
        if !plain(module) || !plain(item) || !module.starts_with(|c: char| c.is_ascii_lowercase()) {
            continue;
        }
        let in_module: Vec<&String> = files
            .iter()
            .filter(|f| f.contains("/src/"))
            .filter(|f| f.ends_with(&format!("/{module}.rs")) || f.contains(&format!("/{module}/")))
            .collect();
        if in_module.is_empty() {
            continue;
        }
        checked += 1;
        // Written there: defined, or re-exported by a `pub use`.
        let found = in_module.iter().any(|f| {
            std::fs::read_to_string(f).is_ok_and(|t| {
                t.lines().any(|line| {
                    let line = line.trim_start();
                    let defined = [
                        "fn", "struct", "enum", "trait", "type", "mod", "const", "static",
                    ]
                    .iter()
                    .any(|kind| {
                        line.split_whitespace()
                            .skip_while(|w| *w != *kind)
                            .nth(1)
                            .is_some_and(|w| {
                                w.trim_end_matches(|c: char| {
                                    !(c.is_ascii_alphanumeric() || c == '_')
                                })
                                .split(['<', '(', ':'])
                                .next()
                                    == Some(item)
                            })
                    });
                    let reexported = line.starts_with("pub use")
                        && line
                            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                            .any(|w| w == item);
                    defined || reexported
                })
            })
        });
        if !found {
            missing.push(format!("item {name}"));
        }
    }
    // The module map: the first column of each row names a module of the library.
    for line in text.lines().filter(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let Some(module) = cells
            .get(2)
            .and_then(|c| c.strip_prefix('`'))
            .and_then(|c| c.strip_suffix('`'))
        else {
            continue;
        };
        if module.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            checked += 1;
            let src = root().join("src");
            if !src.join(format!("{module}.rs")).exists() && !src.join(module).is_dir() {
                missing.push(format!("module {module}"));
            }
        }
    }
    (checked, missing)
}

#[test]
fn the_architecture_check_catches_a_name_that_is_gone() {
    let text = "`fanout::PreEncodedCodec` and `rotator/gone.rs`";
    assert_eq!(
        backticked(text),
        vec!["fanout::PreEncodedCodec", "rotator/gone.rs"]
    );
}

/// The domain speaks no protobuf: the core and the fleet name no `pb::` type
/// (the Admin API converts at its edge, `admin.rs`, and `calls.rs` the agents'
/// answers).
#[test]
fn the_core_and_the_fleet_name_no_protobuf_type() {
    for file in ["src/rotator/core.rs", "src/rotator/fleet.rs"] {
        let text = std::fs::read_to_string(root().join(file)).expect(file);
        assert!(
            !text.contains("pb::"),
            "{file} names a protobuf type: convert at the edge instead"
        );
    }
}
