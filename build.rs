//! Embeds the git commit in the binary for `cllm --version` and checkpoints.
//!
//! A source tarball or a machine without git must still build, so every failure falls back to
//! "unknown" instead of failing the build.

use std::path::Path;
use std::process::Command;

/// The trimmed stdout of a command, or "unknown" if it cannot run or fails.
fn output_or_unknown(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

fn main() {
    let commit = output_or_unknown("git", &["rev-parse", "--short=12", "HEAD"]);
    println!("cargo:rustc-env=CLLM_GIT_COMMIT={commit}");
    // The compiler cargo builds this crate with (recorded in benchmark reports).
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    println!("cargo:rustc-env=CLLM_RUSTC_VERSION={}", output_or_unknown(&rustc, &["--version"]));

    // Rebuild when the checked-out commit moves. Only existing paths are listed: cargo treats a
    // missing one as always stale, which would rerun this script on every build.
    println!("cargo:rerun-if-changed=build.rs");
    let git = Path::new(".git");
    for p in ["HEAD", "packed-refs"] {
        let path = git.join(p);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    if let Ok(head) = std::fs::read_to_string(git.join("HEAD")) {
        if let Some(r) = head.strip_prefix("ref: ") {
            let path = git.join(r.trim());
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}
