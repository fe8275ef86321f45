//! The syscall tables in `docs/security.md` are rendered from the policy data; this test
//! fails when they differ. `VPNSHARE_BLESS=1 cargo test -p security --test doc_table`
//! rewrites the section between the markers.

// Test support: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

const BEGIN: &str = "<!-- BEGIN GENERATED: syscall tables, from security/src/policy.rs; \
                     rewrite with VPNSHARE_BLESS=1 cargo test -p security --test doc_table -->";
const END: &str = "<!-- END GENERATED: syscall tables -->";

fn doc_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/security.md")
}

// The document is the x86_64 view (a few legacy syscalls exist there only).
#[cfg(target_arch = "x86_64")]
#[test]
fn docs_security_md_tables_match_the_policy() {
    let path = doc_path();
    let doc = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let start = doc.find(BEGIN).expect("BEGIN marker in docs/security.md");
    let end = doc.find(END).expect("END marker in docs/security.md");
    assert!(start < end, "markers out of order");
    let current = &doc[start + BEGIN.len()..end];
    let rendered = format!("\n\n{}", security::policy::render_markdown());
    if current == rendered {
        return;
    }
    if std::env::var("VPNSHARE_BLESS").as_deref() == Ok("1") {
        let new = format!("{}{BEGIN}{rendered}{}", &doc[..start], &doc[end..]);
        std::fs::write(&path, new).unwrap();
        eprintln!("rewrote the generated section of {}", path.display());
        return;
    }
    let first_diff = current
        .lines()
        .zip(rendered.lines())
        .position(|(a, b)| a != b)
        .unwrap_or(current.lines().count().min(rendered.lines().count()));
    panic!(
        "docs/security.md is out of date with security/src/policy.rs (first difference at \
         line {} of the section): run VPNSHARE_BLESS=1 cargo test -p security --test doc_table\n\
         doc:      {:?}\nrendered: {:?}",
        first_diff + 1,
        current.lines().nth(first_diff),
        rendered.lines().nth(first_diff)
    );
}
