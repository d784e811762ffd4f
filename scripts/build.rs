//! Embeds every file under `schemas/` into the binary so `Registry::builtin()` needs no files at
//! run time: writes `$OUT_DIR/schema_files.rs`, a sorted table of (path relative to `schemas/`,
//! contents) built from `include_str!`, which the events registry includes.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    // A directory path makes cargo rerun when anything inside it changes.
    println!("cargo:rerun-if-changed=schemas");
    // `sqlx::migrate!` embeds this folder but does not tell cargo: a new migration must rebuild.
    println!("cargo:rerun-if-changed=src/stores/provisioning/migrations");
    let root =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
            .join("schemas");
    let mut files = Vec::new();
    collect(&root, &root, &mut files);
    files.sort();

    let mut out =
        String::from("/// Every file under `schemas/`: (path relative to `schemas/`, contents).\n");
    out.push_str("pub(crate) static SCHEMA_FILES: &[(&str, &str)] = &[\n");
    // Paths relative to the crate being compiled, not this run's absolute ones: a target
    // directory shared by two checkouts may reuse another checkout's build-script output.
    for rel in &files {
        writeln!(
            out,
            "    ({rel:?}, include_str!(concat!(env!(\"CARGO_MANIFEST_DIR\"), \"/schemas/\", {rel:?}))),"
        )
        .expect("writing to a String cannot fail");
    }
    out.push_str("];\n");
    let dest = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("schema_files.rs");
    std::fs::write(&dest, out).expect("cannot write schema_files.rs to OUT_DIR");
}

/// Text files only (schemas, the lock, the README); hidden files such as editor swap files are skipped.
fn collect(root: &Path, dir: &Path, files: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            collect(root, &path, files);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("avsc" | "lock" | "md")
        ) {
            let rel = path
                .strip_prefix(root)
                .expect("walked from root")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            files.push(rel);
        }
    }
}
