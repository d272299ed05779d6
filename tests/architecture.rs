//! The layering of `src/` is a rule, not a hope: this test reads every `crate::...`
//! path in the library's source and fails when a room imports a room that the table in
//! `docs/ARCHITECTURE.md` ("Layer rules") does not allow it to.
//!
//! The table lists, for every top-level room (`src/<room>.rs` or `src/<room>/`), its
//! layer and the rooms it may import. The test also checks the table itself: every room
//! of `src/` has a row, and every allowed import points to a lower layer, so that the
//! rules cannot describe a loop.
#![expect(
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code fails by panicking"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const START: &str = "<!-- layer-rules:start -->";
const END: &str = "<!-- layer-rules:end -->";

#[derive(Debug)]
struct Rule {
    layer: u32,
    may_import: BTreeSet<String>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The rules table of docs/ARCHITECTURE.md: room -> (layer, rooms it may import).
fn rules() -> BTreeMap<String, Rule> {
    let doc = std::fs::read_to_string(root().join("docs/ARCHITECTURE.md"))
        .unwrap_or_else(|e| panic!("docs/ARCHITECTURE.md: {e}"));
    let (Some(a), Some(b)) = (doc.find(START), doc.find(END)) else {
        panic!("docs/ARCHITECTURE.md has no {START} ... {END} table");
    };
    let mut rules = BTreeMap::new();
    for line in doc[a + START.len()..b].lines() {
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        if cells.len() < 3 || cells[0] == "room" || cells[0].starts_with("---") {
            continue;
        }
        let room = cells[0].trim_matches('`').to_owned();
        let layer = cells[1]
            .parse()
            .unwrap_or_else(|_| panic!("layer of {room} is not a number: {:?}", cells[1]));
        let may_import = cells[2]
            .split(',')
            .map(|s| s.trim().trim_matches('`').to_owned())
            .filter(|s| !s.is_empty() && s != "—" && s != "-")
            .collect();
        assert!(
            rules
                .insert(room.clone(), Rule { layer, may_import })
                .is_none(),
            "{room} has two rows"
        );
    }
    rules
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The room a source file belongs to (`None` for the crate root files).
fn room_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    match first.strip_suffix(".rs") {
        Some("lib" | "main") => None,
        Some(room) => Some(room.to_owned()),
        None => Some(first.to_owned()),
    }
}

/// The code of a line without its comment (`//` outside a string literal).
fn code_of(line: &str) -> &str {
    let mut in_str = false;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match c {
            '"' if prev != '\\' => in_str = !in_str,
            '/' if !in_str && prev == '/' => return &line[..i - 1],
            _ => {}
        }
        prev = c;
    }
    line
}

/// The rooms a piece of code names through `crate::room` paths, including grouped
/// imports (`use crate::{a::X, b};`).
fn named_rooms(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue; // `fieldkey_crate::`, `$crate::`: not this crate's path
        }
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of a group: split on commas at brace depth 0.
            let (mut depth, mut start) = (0usize, 0usize);
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        push_head(&group[start..j], &mut out);
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        push_head(&group[start..j], &mut out);
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            push_head(rest, &mut out);
        }
    }
    out
}

fn push_head(path: &str, out: &mut BTreeSet<String>) {
    let head: String = path
        .trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    if !head.is_empty() && head != "self" {
        out.insert(head);
    }
}

/// Every (file:line, from room, to room) import in src/.
fn imports() -> Vec<(String, String, String)> {
    let src = root().join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let Some(room) = room_of(&src, &file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{e}"));
        // Join lines so that a grouped `use crate::{...}` over several lines is seen
        // whole; remember where each line starts to report it.
        let mut code = String::new();
        let mut starts = Vec::new();
        for line in text.lines() {
            starts.push(code.len());
            code.push_str(code_of(line));
            code.push('\n');
        }
        let mut rest = code.as_str();
        let mut offset = 0;
        while let Some(i) = rest.find("crate::") {
            let end = rest[i..].find(';').map_or(rest.len(), |e| i + e);
            let line = starts.partition_point(|&s| s <= offset + i);
            let at = format!(
                "src/{}:{line}",
                file.strip_prefix(&src).unwrap_or(&file).display()
            );
            for to in named_rooms(&rest[i.saturating_sub(1)..end]) {
                if to != room {
                    out.push((at.clone(), room.clone(), to));
                }
            }
            offset += end.max(i + 1);
            rest = &code[offset..];
        }
    }
    out
}

#[test]
fn the_rules_table_covers_every_room_and_only_points_down() {
    let rules = rules();
    let src = root().join("src");
    let mut rooms = BTreeSet::new();
    for entry in std::fs::read_dir(&src).unwrap_or_else(|e| panic!("{e}")) {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        if let Some(room) = room_of(&src, &path.join("x")).filter(|_| path.is_dir()) {
            rooms.insert(room);
        } else if let Some(room) = room_of(&src, &path).filter(|_| path.is_file()) {
            rooms.insert(room);
        }
    }
    rooms.remove("x");
    for room in &rooms {
        assert!(
            rules.contains_key(room),
            "src/{room} has no row in the layer rules of docs/ARCHITECTURE.md"
        );
    }
    for (room, rule) in &rules {
        assert!(
            rooms.contains(room),
            "the layer rules name {room}, which src/ does not have"
        );
        for to in &rule.may_import {
            let target = rules
                .get(to)
                .unwrap_or_else(|| panic!("{room} may import {to}, which has no row"));
            assert!(
                target.layer < rule.layer,
                "{room} (layer {}) may import {to} (layer {}): allowed imports must point to a lower layer",
                rule.layer,
                target.layer
            );
        }
    }
}

#[test]
fn every_import_in_src_follows_the_layer_rules() {
    let rules = rules();
    let mut broken = Vec::new();
    for (at, from, to) in imports() {
        match rules.get(&from) {
            Some(rule) if rule.may_import.contains(&to) => {}
            Some(rule) => broken.push(format!(
                "{at}: {from} imports {to}; {from} may import only: {}",
                rule.may_import
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            None => broken.push(format!("{at}: {from} has no row in the layer rules")),
        }
    }
    assert!(
        broken.is_empty(),
        "imports that break the layer rules of docs/ARCHITECTURE.md:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_scanner_sees_every_form_of_import() {
    let seen = |code: &str| named_rooms(code).into_iter().collect::<Vec<_>>();
    assert_eq!(seen("use crate::store::KeyStore;"), ["store"]);
    assert_eq!(
        seen("use crate::{keyring::Keyring, store::{A, B}, error};"),
        ["error", "keyring", "store"]
    );
    assert_eq!(seen("let x = crate::audit::mask_ip(ip);"), ["audit"]);
    assert_eq!(seen("pub(crate) use crate::model::now_ms;"), ["model"]);
    assert_eq!(
        seen("macro_rules! m { () => { $crate::x::Y } }"),
        Vec::<String>::new()
    );
    assert_eq!(code_of("let a = 1; // see crate::store"), "let a = 1; ");
    assert_eq!(
        code_of(r#"let s = "http://x"; // crate::a"#),
        r#"let s = "http://x"; "#
    );
}
