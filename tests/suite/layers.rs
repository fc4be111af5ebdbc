//! The crate's layering (ARCHITECTURE.md, "Layers"): every module of `src/` sits in one row
//! of that table and names (`crate::…` in code, `use` lines or paths) only modules of its
//! own row or of rows below. The table is read from ARCHITECTURE.md itself, so the rule and
//! its check cannot drift apart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Module → row, the lowest row 0, from the fenced block under `## Layers`: one row per
/// line, `a, b: what they are`, the top row first.
fn layer_table() -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("ARCHITECTURE.md")).unwrap();
    let section = text
        .split("\n## Layers")
        .nth(1)
        .expect("ARCHITECTURE.md has a \"## Layers\" section");
    let block = section
        .split("```")
        .nth(1)
        .expect("the Layers section has a fenced block of rows");
    let rows: Vec<&str> = block
        .lines()
        .skip(1) // the fence's language tag
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(rows.len() >= 5, "too few rows in the layer table: {rows:?}");
    let mut table = BTreeMap::new();
    for (i, row) in rows.iter().enumerate() {
        let names = row.split(':').next().unwrap();
        for name in names.split(',').map(str::trim) {
            assert!(
                table.insert(name.to_string(), rows.len() - 1 - i).is_none(),
                "{name} is in two rows of the layer table"
            );
        }
    }
    table
}

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

/// The top-level module a file of `src/` belongs to; `None` for the crate root.
fn module_of(path: &Path) -> Option<String> {
    let relative = path.strip_prefix(Path::new(ROOT).join("src")).unwrap();
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.trim_end_matches(".rs");
    (name != "lib").then(|| name.to_string())
}

/// The modules `source` names as `crate::name` or inside `crate::{…}`, comments left out.
fn named_modules(source: &str) -> Vec<String> {
    let code: String = source
        .lines()
        .map(|l| l.split("//").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    let mut names = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = &group[..group.find('}').unwrap_or(group.len())];
            names.extend(inner.split(',').map(|item| leading_ident(item.trim())));
        } else {
            names.push(leading_ident(rest));
        }
    }
    names.retain(|n| !n.is_empty());
    names
}

fn leading_ident(text: &str) -> String {
    text.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

#[test]
fn no_module_imports_one_above_it() {
    let table = layer_table();
    let mut files = Vec::new();
    rust_files(&Path::new(ROOT).join("src"), &mut files);
    let mut violations = Vec::new();
    for file in &files {
        let Some(module) = module_of(file) else {
            continue;
        };
        if module == "test_support" {
            continue; // unit-test helpers, compiled only for tests
        }
        let Some(&row) = table.get(&module) else {
            violations.push(format!(
                "src/{module} is in no row of ARCHITECTURE.md's layer table"
            ));
            continue;
        };
        let source = std::fs::read_to_string(file).unwrap();
        for name in named_modules(&source) {
            match table.get(&name) {
                Some(&other) if other > row => violations.push(format!(
                    "{} ({module}, row {row}) names crate::{name} (row {other})",
                    file.strip_prefix(ROOT).unwrap().display()
                )),
                // Items at the crate root (re-exports, `test_support`) are not layers.
                _ => {}
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_executor_names_no_op_and_no_layer() {
    let mut files = Vec::new();
    rust_files(&Path::new(ROOT).join("src/graph"), &mut files);
    for file in files {
        let source = std::fs::read_to_string(&file).unwrap();
        let named = named_modules(&source);
        for banned in ["ops", "nn"] {
            assert!(
                !named.iter().any(|n| n == banned),
                "{} names crate::{banned}",
                file.display()
            );
        }
    }
}

#[test]
fn layers_and_the_executor_never_match_on_the_device() {
    let mut files = Vec::new();
    for dir in ["src/nn", "src/train", "src/graph"] {
        rust_files(&Path::new(ROOT).join(dir), &mut files);
    }
    for file in files {
        let source = std::fs::read_to_string(&file).unwrap();
        for (number, line) in source.lines().enumerate() {
            assert!(
                !line.contains("Value::Gpu") && !line.contains("Value::Cpu"),
                "{}:{}: a device match outside the ops: call the op's entry point on Values",
                file.display(),
                number + 1
            );
        }
    }
}

#[test]
fn the_reader_finds_grouped_and_plain_paths() {
    let names = named_modules(
        "use crate::ops::conv2d;\nuse crate::{graph::Value, nn};\n// crate::train\nlet x = crate::data::f();",
    );
    assert_eq!(names, ["ops", "graph", "nn", "data"]);
}

#[test]
fn every_cpu_reference_is_in_wgcnn_cpu() {
    let cpu = std::fs::read_to_string(Path::new(ROOT).join("src/cpu.rs")).unwrap();
    let mut files = Vec::new();
    for dir in ["src/ops", "src/value"] {
        rust_files(&Path::new(ROOT).join(dir), &mut files);
    }
    let mut references = 0;
    for file in files {
        let source = std::fs::read_to_string(&file).unwrap();
        for (at, _) in source.match_indices("pub fn ") {
            let name = leading_ident(&source[at + "pub fn ".len()..]);
            if name.ends_with("_cpu") {
                references += 1;
                assert!(
                    cpu.contains(&format!("{name} as ")) || cpu.contains(&format!(".{name}(")),
                    "{name} ({}) is not in wgcnn::cpu",
                    file.display()
                );
            }
        }
    }
    assert!(references > 25, "only {references} CPU references found");
}
