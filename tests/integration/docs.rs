//! The documentation checked against the code, without network, Keystone or a
//! running daemon:
//!
//! - `docs/configuration.md` documents exactly the keys that `RotatorConfig`,
//!   `AgentConfig` and `AdminConfig` accept, in both directions, and its example
//!   files parse and pass the start-up checks;
//! - every relative link in `README.md`, `ARCHITECTURE.md` and `docs/` resolves
//!   (and, for `#anchor` links into Markdown, to a heading);
//! - the README stays a front door: under 200 lines, opening with the two
//!   commands.
//!
//! The accepted keys are read from the types' `Deserialize` implementations by
//! [`keys::accepted`], a small tracing deserializer. `serde-reflection` was the
//! first choice but cannot trace these types: it refuses `deserialize_any`
//! (which the duration fields use, to take `"90s"` or `90`), and it pairs field
//! names with values by position, which goes wrong as soon as a struct has an
//! alias (serde lists aliases among the field names; `AgentConfig` has two).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use fernetd::config::{AdminConfig, AgentConfig, RotatorConfig};

/// The three files `docs/configuration.md` documents, each in its own
/// `## \`FILE\`` section.
const ROTATOR: &str = "rotator.toml";
const AGENT: &str = "agent.toml";
const ADMIN: &str = "admin.toml";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

// ---------------------------------------------------------------- the configuration reference

#[test]
fn configuration_reference_documents_every_rotator_key_and_no_other() {
    let page = read("docs/configuration.md");
    let result = compare(
        ROTATOR,
        &keys::accepted::<RotatorConfig>(),
        &documented(&page, ROTATOR),
    );
    if let Err(report) = result {
        panic!("{report}");
    }
}

#[test]
fn configuration_reference_documents_every_agent_key_and_no_other() {
    let page = read("docs/configuration.md");
    let result = compare(
        AGENT,
        &keys::accepted::<AgentConfig>(),
        &documented(&page, AGENT),
    );
    if let Err(report) = result {
        panic!("{report}");
    }
}

#[test]
fn configuration_reference_documents_every_admin_key_and_no_other() {
    let page = read("docs/configuration.md");
    let result = compare(
        ADMIN,
        &keys::accepted::<AdminConfig>(),
        &documented(&page, ADMIN),
    );
    if let Err(report) = result {
        panic!("{report}");
    }
}

/// The check itself: a key row removed from the page, or a row for a key the
/// types do not accept, is reported by name.
#[test]
fn configuration_check_reports_a_missing_and_an_unknown_key() {
    let page = read("docs/configuration.md");
    let accepted = keys::accepted::<RotatorConfig>();
    let row = page
        .lines()
        .find(|line| line.starts_with("| `fanout.ack_wait` |"))
        .expect("the page documents fanout.ack_wait in a table row");
    let without = page.replace(&format!("{row}\n"), "");
    let report = compare(ROTATOR, &accepted, &documented(&without, ROTATOR))
        .expect_err("a removed row must be reported");
    assert!(
        report.contains("not documented: `fanout.ack_wait`"),
        "{report}"
    );

    let extra = page.replacen(
        &format!("{row}\n"),
        &format!("{row}\n| `fanout.retries` | integer | 3 | made up | never |\n"),
        1,
    );
    let report = compare(ROTATOR, &accepted, &documented(&extra, ROTATOR))
        .expect_err("an unknown key must be reported");
    assert!(
        report.contains("not accepted by the configuration: `fanout.retries`"),
        "{report}"
    );
}

/// Every `toml` example in a file's section is a whole, valid file of that kind.
#[test]
fn configuration_examples_parse_and_pass_the_start_up_checks() {
    let page = read("docs/configuration.md");
    let examples = |file: &str| {
        let blocks = toml_blocks(section(&page, file));
        assert!(!blocks.is_empty(), "no ```toml example in `{file}`");
        blocks
    };
    for example in examples(ROTATOR) {
        let config: RotatorConfig = toml::from_str(&example)
            .unwrap_or_else(|e| panic!("rotator.toml example does not parse: {e}\n{example}"));
        fernetd::rotator::check(config)
            .unwrap_or_else(|e| panic!("rotator.toml example is refused: {e}\n{example}"));
    }
    for example in examples(AGENT) {
        let config: AgentConfig = toml::from_str(&example)
            .unwrap_or_else(|e| panic!("agent.toml example does not parse: {e}\n{example}"));
        config
            .validate()
            .unwrap_or_else(|e| panic!("agent.toml example is refused: {e}\n{example}"));
    }
    for example in examples(ADMIN) {
        toml::from_str::<AdminConfig>(&example)
            .unwrap_or_else(|e| panic!("admin.toml example does not parse: {e}\n{example}"));
    }
}

/// The tracer on a type that has what the real ones have (aliases, a renamed
/// field, tables, arrays of tables, options, enums, a field deserialized
/// through `deserialize_any`), so a failure of the real tests is the page's.
#[test]
fn key_tracer_sees_aliases_tables_and_arrays_of_tables() {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Top {
        plain: String,
        #[serde(rename = "new_name", alias = "old_name")]
        renamed: Option<std::net::SocketAddr>,
        #[serde(default)]
        list: Vec<String>,
        #[serde(deserialize_with = "any_number")]
        any: u64,
        mode: Mode,
        table: Inner,
        optional_table: Option<Inner>,
        #[serde(default)]
        array: Vec<Inner>,
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        path: PathBuf,
        #[serde(alias = "n")]
        number: usize,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "lowercase")]
    #[allow(dead_code)]
    enum Mode {
        One,
        Two,
    }
    fn any_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        Ok(match <Raw as serde::Deserialize>::deserialize(d)? {
            Raw::Number(n) => n,
            Raw::Text(t) => t.len() as u64,
        })
    }

    let expected: BTreeSet<String> = [
        "plain",
        "new_name",
        "old_name",
        "list",
        "any",
        "mode",
        "[table]",
        "table.path",
        "table.number",
        "table.n",
        "[optional_table]",
        "optional_table.path",
        "optional_table.number",
        "optional_table.n",
        "[[array]]",
        "[[array]].path",
        "[[array]].number",
        "[[array]].n",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(keys::accepted::<Top>(), expected);
}

/// The keys documented in `file`'s section: the first cell of every table row
/// when that cell is one code span (`` `tls.ca` ``, `` `[[agents]]` ``).
fn documented(page: &str, file: &str) -> Documented {
    let mut keys = BTreeSet::new();
    let mut twice = BTreeSet::new();
    for line in prose_lines(section(page, file)) {
        let Some(row) = line.trim().strip_prefix('|') else {
            continue;
        };
        let first = row.split('|').next().unwrap_or("").trim();
        let Some(key) = first
            .strip_prefix('`')
            .and_then(|k| k.strip_suffix('`'))
            .filter(|k| !k.is_empty() && !k.contains('`'))
        else {
            continue;
        };
        if !keys.insert(key.to_owned()) {
            twice.insert(key.to_owned());
        }
    }
    Documented { keys, twice }
}

struct Documented {
    keys: BTreeSet<String>,
    twice: BTreeSet<String>,
}

/// Both directions for one file; the error names every difference.
fn compare(file: &str, accepted: &BTreeSet<String>, page: &Documented) -> Result<(), String> {
    let quote = |keys: Vec<&String>| {
        keys.iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut problems = Vec::new();
    let missing: Vec<_> = accepted.difference(&page.keys).collect();
    if !missing.is_empty() {
        problems.push(format!("not documented: {}", quote(missing)));
    }
    let unknown: Vec<_> = page.keys.difference(accepted).collect();
    if !unknown.is_empty() {
        problems.push(format!(
            "not accepted by the configuration: {}",
            quote(unknown)
        ));
    }
    if !page.twice.is_empty() {
        problems.push(format!(
            "documented twice: {}",
            quote(page.twice.iter().collect())
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "docs/configuration.md, section `{file}`, against the {file} types:\n  {}\n\
             (a key is written as in TOML: `listen`, `tls.ca`, `[tls]`, `[[agents]]`, \
             `[[agents]].endpoint`; aliases are keys too)",
            problems.join("\n  ")
        ))
    }
}

/// The text of the `## ...` section whose heading names `file` in a code span,
/// up to the next level-2 heading.
fn section<'p>(page: &'p str, file: &str) -> &'p str {
    let heading = format!("`{file}`");
    let mut start = None;
    let mut offset = 0;
    for line in page.split_inclusive('\n') {
        let is_h2 = line.starts_with("## ");
        match start {
            None if is_h2 && line.contains(&heading) => start = Some(offset + line.len()),
            Some(from) if is_h2 => return &page[from..offset],
            _ => {}
        }
        offset += line.len();
    }
    let from = start
        .unwrap_or_else(|| panic!("docs/configuration.md has no `## ` heading naming {heading}"));
    &page[from..]
}

/// The bodies of the ```toml blocks in `text`.
fn toml_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match current.as_mut() {
            None if line.trim_start().starts_with("```toml") => current = Some(String::new()),
            Some(_) if line.trim_start().starts_with("```") => {
                blocks.extend(current.take());
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    blocks
}

/// The lines of `text` outside fenced code blocks.
fn prose_lines(text: &str) -> Vec<&str> {
    let mut fence: Option<&str> = None;
    let mut lines = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        match fence {
            Some(f) if trimmed.starts_with(f) => fence = None,
            Some(_) => {}
            None if trimmed.starts_with("```") => fence = Some("```"),
            None if trimmed.starts_with("~~~") => fence = Some("~~~"),
            None => lines.push(line),
        }
    }
    lines
}

/// Reads the keys a `Deserialize` type accepts by deserializing it from a
/// deserializer that answers every question with a harmless value and writes
/// down every struct's field names (serde lists aliases among them).
mod keys {
    use std::cell::RefCell;
    use std::collections::{BTreeMap, BTreeSet};
    use std::fmt;

    use serde::de::{
        self, DeserializeOwned, DeserializeSeed, EnumAccess, IntoDeserializer, MapAccess,
        SeqAccess, VariantAccess, Visitor,
    };

    /// Every key `T` accepts, spelled as `docs/configuration.md` spells it:
    /// `listen`, `[tls]`, `tls.ca`, `[[agents]]`, `[[agents]].endpoint`.
    pub fn accepted<T: DeserializeOwned>() -> BTreeSet<String> {
        let trace = RefCell::new(Trace::default());
        // serde refuses a field given under two of its names: each pass that
        // fails so learns one alias to leave out of the next pass.
        for _ in 0..64 {
            trace.borrow_mut().last_fed = None;
            let result = T::deserialize(Tracer {
                trace: &trace,
                path: Vec::new(),
            });
            match result {
                Ok(_) => {
                    let trace = trace.into_inner();
                    return trace
                        .declared
                        .iter()
                        .map(|key| trace.tables.get(key).unwrap_or(key).clone())
                        .collect();
                }
                Err(Error(message)) if message.starts_with("duplicate field") => {
                    let mut trace = trace.borrow_mut();
                    let fed = trace.last_fed.clone().expect("a key was fed");
                    assert!(trace.skip.insert(fed), "{message} again");
                }
                Err(Error(message)) => panic!(
                    "cannot list the keys of {}: {message}",
                    std::any::type_name::<T>()
                ),
            }
        }
        panic!(
            "cannot list the keys of {}: too many aliases",
            std::any::type_name::<T>()
        );
    }

    #[derive(Debug)]
    pub struct Error(String);

    impl fmt::Display for Error {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for Error {}

    impl de::Error for Error {
        fn custom<T: fmt::Display>(message: T) -> Self {
            Error(message.to_string())
        }
    }

    /// One step of a key's path: a field name, and whether its value is an
    /// array (of tables, when the elements are structs).
    #[derive(Debug, Clone)]
    struct Step {
        name: &'static str,
        array: bool,
    }

    #[derive(Default)]
    struct Trace {
        /// Every field name and alias of every struct reached, spelled as a key.
        declared: BTreeSet<String>,
        /// Keys whose value is a table: key → `[key]` or `[[key]]`.
        tables: BTreeMap<String, String>,
        /// Keys left out: an alias of a key fed earlier in the same struct.
        skip: BTreeSet<String>,
        last_fed: Option<String>,
    }

    /// `tls.ca`, `[[agents]].endpoint`: the path to the enclosing table, then
    /// the name.
    fn key(path: &[Step], name: &str) -> String {
        let mut key = String::new();
        for step in path {
            if step.array {
                key.push_str(&format!("[[{}]].", step.name));
            } else {
                key.push_str(&format!("{}.", step.name));
            }
        }
        key.push_str(name);
        key
    }

    /// Any string value: it parses as an address, a path and a name alike.
    const TEXT: &str = "127.0.0.1:7443";

    struct Tracer<'t> {
        trace: &'t RefCell<Trace>,
        /// The keys leading to the value being deserialized (empty: the file).
        path: Vec<Step>,
    }

    impl<'t> Tracer<'t> {
        fn at(&self, path: Vec<Step>) -> Tracer<'t> {
            Tracer {
                trace: self.trace,
                path,
            }
        }

        fn here(&self) -> String {
            match self.path.split_last() {
                Some((last, parents)) => key(parents, last.name),
                None => "the top level".into(),
            }
        }
    }

    macro_rules! answer {
        ($($method:ident => $visit:ident($($value:expr)?);)*) => {
            $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
                visitor.$visit($($value)?)
            })*
        };
    }

    impl<'de> de::Deserializer<'de> for Tracer<'_> {
        type Error = Error;

        answer! {
            deserialize_bool => visit_bool(false);
            deserialize_i8 => visit_i64(1);
            deserialize_i16 => visit_i64(1);
            deserialize_i32 => visit_i64(1);
            deserialize_i64 => visit_i64(1);
            deserialize_i128 => visit_i128(1);
            deserialize_u8 => visit_u64(1);
            deserialize_u16 => visit_u64(1);
            deserialize_u32 => visit_u64(1);
            deserialize_u64 => visit_u64(1);
            deserialize_u128 => visit_u128(1);
            deserialize_f32 => visit_f64(1.0);
            deserialize_f64 => visit_f64(1.0);
            deserialize_char => visit_char('x');
            deserialize_str => visit_str(TEXT);
            deserialize_string => visit_str(TEXT);
            deserialize_identifier => visit_str(TEXT);
            deserialize_bytes => visit_bytes(b"x");
            deserialize_byte_buf => visit_bytes(b"x");
            deserialize_unit => visit_unit();
            deserialize_ignored_any => visit_unit();
            // A self-describing format would say what it holds: a number is
            // what every `deserialize_any` field of the configuration takes.
            deserialize_any => visit_u64(1);
        }

        fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            visitor.visit_some(self)
        }

        fn deserialize_unit_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            visitor: V,
        ) -> Result<V::Value, Error> {
            visitor.visit_unit()
        }

        fn deserialize_newtype_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            visitor: V,
        ) -> Result<V::Value, Error> {
            visitor.visit_newtype_struct(self)
        }

        fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            let mut path = self.path.clone();
            if let Some(last) = path.last_mut() {
                last.array = true;
            }
            visitor.visit_seq(Elements {
                element: Some(self.at(path)),
                left: 1,
            })
        }

        fn deserialize_tuple<V: Visitor<'de>>(
            self,
            len: usize,
            visitor: V,
        ) -> Result<V::Value, Error> {
            visitor.visit_seq(Elements {
                element: Some(self),
                left: len,
            })
        }

        fn deserialize_tuple_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            len: usize,
            visitor: V,
        ) -> Result<V::Value, Error> {
            self.deserialize_tuple(len, visitor)
        }

        fn deserialize_map<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
            Err(Error(format!(
                "{} is a free-form table or has a #[serde(flatten)] field: its keys \
                 cannot be listed; teach tests/integration/docs.rs about it",
                self.here()
            )))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Error> {
            {
                let mut trace = self.trace.borrow_mut();
                if let Some((last, parents)) = self.path.split_last() {
                    let names: Vec<_> = self.path.iter().map(|s| s.name).collect();
                    let table = if last.array {
                        format!("[[{}]]", names.join("."))
                    } else {
                        format!("[{}]", names.join("."))
                    };
                    trace.tables.insert(key(parents, last.name), table);
                }
                for name in fields {
                    trace.declared.insert(key(&self.path, name));
                }
            }
            visitor.visit_map(Fields {
                tracer: self,
                fields: fields.iter(),
                current: None,
            })
        }

        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _: &'static str,
            variants: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Error> {
            let variant = variants
                .first()
                .ok_or_else(|| Error(format!("{}: an enum without variants", self.here())))?;
            visitor.visit_enum(Variant {
                name: variant,
                tracer: self,
            })
        }
    }

    /// A struct's fields as a map: each name once, aliases learnt to clash left out.
    struct Fields<'t> {
        tracer: Tracer<'t>,
        fields: std::slice::Iter<'static, &'static str>,
        current: Option<&'static str>,
    }

    impl<'de> MapAccess<'de> for Fields<'_> {
        type Error = Error;

        fn next_key_seed<K: DeserializeSeed<'de>>(
            &mut self,
            seed: K,
        ) -> Result<Option<K::Value>, Error> {
            for &name in self.fields.by_ref() {
                let key = key(&self.tracer.path, name);
                let mut trace = self.tracer.trace.borrow_mut();
                if trace.skip.contains(&key) {
                    continue;
                }
                trace.last_fed = Some(key);
                drop(trace);
                self.current = Some(name);
                return seed
                    .deserialize(IntoDeserializer::<Error>::into_deserializer(name))
                    .map(Some);
            }
            Ok(None)
        }

        fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, Error> {
            let name = self.current.take().expect("a key before its value");
            let mut path = self.tracer.path.clone();
            path.push(Step { name, array: false });
            seed.deserialize(self.tracer.at(path))
        }
    }

    /// The elements of an array: one is enough to reach the element type.
    struct Elements<'t> {
        element: Option<Tracer<'t>>,
        left: usize,
    }

    impl<'de> SeqAccess<'de> for Elements<'_> {
        type Error = Error;

        fn next_element_seed<S: DeserializeSeed<'de>>(
            &mut self,
            seed: S,
        ) -> Result<Option<S::Value>, Error> {
            if self.left == 0 {
                return Ok(None);
            }
            self.left -= 1;
            let Some(element) = self.element.as_ref() else {
                return Ok(None);
            };
            seed.deserialize(element.at(element.path.clone())).map(Some)
        }
    }

    /// An enum answered with its first variant.
    struct Variant<'t> {
        name: &'static str,
        tracer: Tracer<'t>,
    }

    impl<'de, 't> EnumAccess<'de> for Variant<'t> {
        type Error = Error;
        type Variant = Tracer<'t>;

        fn variant_seed<S: DeserializeSeed<'de>>(
            self,
            seed: S,
        ) -> Result<(S::Value, Tracer<'t>), Error> {
            let value =
                seed.deserialize(IntoDeserializer::<Error>::into_deserializer(self.name))?;
            Ok((value, self.tracer))
        }
    }

    impl<'de> VariantAccess<'de> for Tracer<'_> {
        type Error = Error;

        fn unit_variant(self) -> Result<(), Error> {
            Ok(())
        }

        fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, Error> {
            seed.deserialize(self)
        }

        fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, Error> {
            de::Deserializer::deserialize_tuple(self, len, visitor)
        }

        fn struct_variant<V: Visitor<'de>>(
            self,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Error> {
            de::Deserializer::deserialize_struct(self, "", fields, visitor)
        }
    }
}

// ---------------------------------------------------------------- links

/// The Markdown files whose links must resolve.
fn markdown_files() -> Vec<PathBuf> {
    let root = root();
    let mut files = vec![root.join("README.md")];
    let architecture = root.join("ARCHITECTURE.md");
    if architecture.exists() {
        files.push(architecture);
    }
    let mut dirs = vec![root.join("docs")];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_relative_link_resolves() {
    let root = root();
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).expect("read markdown");
        let shown = file
            .strip_prefix(&root)
            .unwrap_or(&file)
            .display()
            .to_string();
        for (line, target) in links(&text) {
            if target.starts_with("http://")
                || target.starts_with("https://")
                || target.starts_with("mailto:")
            {
                continue;
            }
            checked += 1;
            if let Err(why) = resolve(&root, &file, &text, &target) {
                broken.push(format!("{shown}:{line}: ({target}) {why}"));
            }
        }
    }
    assert!(checked > 0, "no relative link found at all");
    assert!(
        broken.is_empty(),
        "broken links:\n  {}",
        broken.join("\n  ")
    );
}

/// Checks one relative link from `file` (whose text is `text`).
fn resolve(root: &Path, file: &Path, text: &str, target: &str) -> Result<(), String> {
    let (path, anchor) = match target.split_once('#') {
        Some((path, anchor)) => (path, Some(anchor)),
        None => (target, None),
    };
    let (resolved, body) = if path.is_empty() {
        (file.to_path_buf(), text.to_owned())
    } else {
        let base = if let Some(from_root) = path.strip_prefix('/') {
            root.join(from_root)
        } else {
            file.parent().expect("file in a directory").join(path)
        };
        let resolved = normalize(&base);
        if !resolved.starts_with(root) {
            return Err("points outside the repository".into());
        }
        if !resolved.exists() {
            return Err(format!(
                "{} does not exist",
                resolved.strip_prefix(root).unwrap_or(&resolved).display()
            ));
        }
        let body = if resolved.extension().is_some_and(|e| e == "md") {
            std::fs::read_to_string(&resolved).unwrap_or_default()
        } else {
            String::new()
        };
        (resolved, body)
    };
    match anchor {
        Some(anchor) if resolved.extension().is_some_and(|e| e == "md") => {
            if anchors(&body).contains(anchor) {
                Ok(())
            } else {
                Err(format!("no heading with the anchor #{anchor}"))
            }
        }
        _ => Ok(()),
    }
}

/// `a/./b/../c` → `a/c`, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Every link target in `text` outside code, with its line number: inline
/// links and images `[text](target "title")`, and reference definitions
/// `[name]: target`.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let mut fence: Option<&str> = None;
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let trimmed = line.trim_start();
        match fence {
            Some(f) if trimmed.starts_with(f) => {
                fence = None;
                continue;
            }
            Some(_) => continue,
            None if trimmed.starts_with("```") => {
                fence = Some("```");
                continue;
            }
            None if trimmed.starts_with("~~~") => {
                fence = Some("~~~");
                continue;
            }
            None => {}
        }
        let line = without_code_spans(line);
        if let Some(rest) = line.trim_start().strip_prefix('[') {
            if let Some((_, target)) = rest.split_once("]:") {
                if let Some(target) = target.split_whitespace().next() {
                    found.push((number, target.trim_matches(['<', '>']).to_owned()));
                }
            }
        }
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let end = after.find(')').unwrap_or(after.len());
            let inside = after[..end].trim();
            let target = inside.split_whitespace().next().unwrap_or("");
            let target = target.trim_matches(['<', '>']);
            if !target.is_empty() {
                found.push((number, target.to_owned()));
            }
            rest = &after[end..];
        }
    }
    found
}

/// `line` with every `` `code` `` span blanked out.
fn without_code_spans(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut in_code = false;
    for c in line.chars() {
        if c == '`' {
            in_code = !in_code;
            out.push(' ');
        } else if in_code {
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    out
}

/// The anchors a forge gives the headings of `text` (GitHub's and GitLab's
/// rule): lower case, punctuation dropped, spaces to hyphens, `-1`, `-2` for
/// repeats.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut anchors = BTreeSet::new();
    for line in prose_lines(text) {
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let title = line[hashes..].trim().trim_end_matches('#').trim();
        let title = unlink(title);
        let slug: String = title
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let count = seen.entry(slug.clone()).or_insert(0);
        let anchor = if *count == 0 {
            slug.clone()
        } else {
            format!("{slug}-{count}")
        };
        *count += 1;
        anchors.insert(anchor);
    }
    anchors
}

/// `[text](target)` → `text`, for heading titles.
fn unlink(title: &str) -> String {
    let mut out = String::new();
    let mut rest = title;
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find("](").map(|c| open + c) else {
            break;
        };
        let Some(end) = rest[close..].find(')').map(|e| close + e) else {
            break;
        };
        out.push_str(&rest[..open]);
        out.push_str(&rest[open + 1..close]);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

#[test]
fn link_checker_finds_links_and_anchors() {
    let text = "# Title\n\n## The `cache` rule, again\n\n```\n[not](a-link.md)\n```\n\
                See [a](docs/x.md#the-cache-rule-again) and ![b](img.png \"t\") but \
                not `[c](code.md)`.\n[ref]: ../y.md\n## Title\n";
    let found: Vec<String> = links(text).into_iter().map(|(_, t)| t).collect();
    assert_eq!(
        found,
        ["docs/x.md#the-cache-rule-again", "img.png", "../y.md"]
    );
    let anchors = anchors(text);
    for expected in ["title", "title-1", "the-cache-rule-again"] {
        assert!(anchors.contains(expected), "{expected} in {anchors:?}");
    }
}

// ---------------------------------------------------------------- the README

#[test]
fn readme_is_short_and_opens_with_the_two_commands() {
    let readme = read("README.md");
    let lines = readme.lines().count();
    assert!(
        lines < 200,
        "README.md has {lines} lines; keep it under 200"
    );
    let mut body = readme
        .lines()
        .skip_while(|l| l.starts_with("# ") || l.trim().is_empty());
    let fence = body.next().unwrap_or("");
    assert!(
        fence.starts_with("```"),
        "README.md must open (after its title) with a code block, not {fence:?}"
    );
    let block: Vec<&str> = body.take_while(|l| !l.starts_with("```")).collect();
    for command in ["cargo run --release -- demo", "cargo test"] {
        assert!(
            block.iter().any(|l| l.trim_start().starts_with(command)),
            "README.md's opening block lacks `{command}`: {block:?}"
        );
    }
}
