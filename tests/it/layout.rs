//! The layering rules of `lib.rs` and ARCHITECTURE.md, checked on the source:
//! services never import the server, the s2s layer or a store backend; routing
//! knows no socket and no store; the s2s layer never imports services or the
//! store; no two modules import each other in a cycle (top-level modules, and
//! the submodules of each); only negotiation makes an authenticated peer; the
//! routing path builds no DOM; and every module is in ARCHITECTURE.md's codemap.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `src/`, with its module path (`["s2s", "inbound"]`).
fn sources() -> Vec<(Vec<String>, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&root, &mut files);
    files.sort();
    files
        .into_iter()
        .filter_map(|p| {
            let rel = p.strip_prefix(&root).unwrap().with_extension("");
            let module: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if module == ["lib"] || module == ["main"] {
                return None;
            }
            Some((module, std::fs::read_to_string(&p).unwrap()))
        })
        .collect()
}

/// The code of a file without comments (line comments and doc comments).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `crate::a::b...` paths a file names (also inside `use crate::{a, b}`).
fn crate_paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let mut i = 0;
    while let Some(pos) = code[i..].find("crate::") {
        let start = i + pos;
        i = start + "crate::".len();
        // `xmpp_federator_crate::` and the like are not ours.
        if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            continue;
        }
        if code[i..].starts_with('{') {
            let end = code[i..].find('}').map_or(code.len(), |e| i + e);
            for part in code[i + 1..end].split(',') {
                let seg: Vec<String> = part
                    .trim()
                    .split("::")
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                if !seg.is_empty() {
                    out.push(seg);
                }
            }
            continue;
        }
        let seg: Vec<String> = code[i..]
            .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .next()
            .unwrap_or("")
            .split("::")
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if !seg.is_empty() {
            out.push(seg);
        }
    }
    out
}

/// The sibling modules a submodule names through `super::x` (not the parent's
/// own items, which are not modules).
fn super_paths(code: &str, siblings: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (pos, _) in code.match_indices("super::") {
        let rest = &code[pos + "super::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let first = part.trim().split("::").next().unwrap_or("").trim();
                if siblings.contains(first) {
                    out.insert(first.to_string());
                }
            }
        } else {
            let first = rest
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .next()
                .unwrap_or("");
            if siblings.contains(first) {
                out.insert(first.to_string());
            }
        }
    }
    out
}

fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(n) {
            Some(2) => return None,
            Some(1) => {
                let i = stack.iter().position(|s| s == n).unwrap();
                let mut c = stack[i..].to_vec();
                c.push(n.to_string());
                return Some(c);
            }
            _ => {}
        }
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in edges.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, edges, state, stack) {
                return Some(c);
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in edges.keys() {
        if let Some(c) = visit(n, edges, &mut state, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

/// Top-level module -> the top-level modules it names.
fn top_level_edges() -> BTreeMap<String, BTreeSet<String>> {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, text) in sources() {
        let from = module[0].clone();
        let e = edges.entry(from.clone()).or_default();
        for p in crate_paths(&code(&text)) {
            if p[0] != from {
                e.insert(p[0].clone());
            }
        }
    }
    edges
}

#[test]
fn layers_import_only_downwards() {
    let rules: &[(&str, &[&str])] = &[
        (
            "services",
            &["server", "s2s", "api", "check", "load", "ctl", "demo"],
        ),
        (
            "routing",
            &[
                "server", "s2s", "services", "store", "api", "check", "load", "ctl", "demo",
            ],
        ),
        (
            "s2s",
            &[
                "server", "services", "store", "api", "check", "load", "ctl", "demo",
            ],
        ),
        (
            "store",
            &[
                "server", "s2s", "services", "routing", "api", "check", "load", "ctl", "demo",
            ],
        ),
    ];
    let mut broken = Vec::new();
    for (module, text) in sources() {
        let code = code(&text);
        for (layer, forbidden) in rules {
            if module[0] != *layer {
                continue;
            }
            for p in crate_paths(&code) {
                if forbidden.contains(&p[0].as_str()) {
                    broken.push(format!(
                        "{} names crate::{}",
                        module.join("/"),
                        p.join("::")
                    ));
                }
            }
            // Only store/ touches a store backend.
            if *layer != "store" {
                for needle in ["sled_kv", "redb_kv", "sled::", "redb::"] {
                    if code.contains(needle) {
                        broken.push(format!("{} names {needle}", module.join("/")));
                    }
                }
            }
        }
    }
    assert!(broken.is_empty(), "layering broken:\n{}", broken.join("\n"));
}

#[test]
fn no_import_cycles_between_modules() {
    let top = top_level_edges();
    assert!(top.contains_key("services") && top.contains_key("routing"));
    if let Some(c) = find_cycle(&top) {
        panic!("top-level modules import in a cycle: {}", c.join(" -> "));
    }
    // Within each module, between its submodules.
    let all = sources();
    let mut by_parent: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, _) in &all {
        if m.len() == 2 {
            by_parent
                .entry(m[0].clone())
                .or_default()
                .insert(m[1].clone());
        }
    }
    for (parent, children) in &by_parent {
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (m, text) in &all {
            if m.len() != 2 || &m[0] != parent {
                continue;
            }
            let code = code(text);
            let e = edges.entry(m[1].clone()).or_default();
            e.extend(super_paths(&code, children));
            for p in crate_paths(&code) {
                if &p[0] == parent && p.len() > 1 && children.contains(&p[1]) && p[1] != m[1] {
                    e.insert(p[1].clone());
                }
            }
            e.remove(&m[1]);
        }
        if let Some(c) = find_cycle(&edges) {
            panic!(
                "submodules of {parent} import in a cycle: {}",
                c.join(" -> ")
            );
        }
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let mut e: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    e.entry("a".into()).or_default().insert("b".into());
    e.entry("b".into()).or_default().insert("c".into());
    assert_eq!(find_cycle(&e), None);
    e.entry("c".into()).or_default().insert("a".into());
    assert_eq!(
        find_cycle(&e),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    assert_eq!(
        crate_paths("use crate::{a::B, c}; x(crate::d::e); my_crate::z"),
        vec![
            vec!["a".to_string(), "B".into()],
            vec!["c".into()],
            vec!["d".into(), "e".into()]
        ]
    );
}

#[test]
fn the_routing_path_builds_no_dom() {
    // Framing, stanzas, addresses, routing and the s2s layer keep to raw bytes;
    // payloads off the hot path are read with xmpp-parsers in services and the API.
    let hot = ["xml", "stanza", "address", "routing", "s2s"];
    let mut broken = Vec::new();
    for (module, text) in sources() {
        if !hot.contains(&module[0].as_str()) {
            continue;
        }
        let code = code(&text);
        for needle in ["minidom", "xmpp_parsers", "xso::"] {
            if code.contains(needle) {
                broken.push(format!("{} names {needle}", module.join("/")));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "a DOM on the routing path:\n{}",
        broken.join("\n")
    );
}

#[test]
fn only_negotiation_makes_an_authenticated_peer() {
    let makers: Vec<String> = sources()
        .into_iter()
        // Unit tests (at the end of a file) may make one for their fakes.
        .filter(|(_, text)| {
            let product = text.split("#[cfg(test)]").next().unwrap_or_default();
            code(product).contains("Peer::authenticated(")
        })
        .map(|(m, _)| m.join("/"))
        .collect();
    assert_eq!(makers, vec!["s2s/inbound".to_string()]);
}

#[test]
fn every_module_is_in_the_codemap() {
    let map =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md"))
            .unwrap();
    let missing: Vec<String> = sources()
        .into_iter()
        .map(|(m, _)| format!("src/{}.rs", m.join("/")))
        .filter(|path| {
            // `src/a/{b,c}.rs` names b and c too.
            let (dir, file) = path.rsplit_once('/').unwrap();
            let stem = file.trim_end_matches(".rs");
            !map.contains(path.as_str())
                && !map
                    .lines()
                    .any(|l| l.contains(&format!("{dir}/{{")) && l.contains(stem))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "modules missing from ARCHITECTURE.md's codemap: {missing:?}"
    );
}
