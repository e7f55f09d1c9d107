//! `--distributed` in any build: a build without the `mpi` feature says in one line how to get
//! one; the flag needs the segmented strategy.

mod common;
use common::*;

#[cfg(not(feature = "mpi"))]
#[test]
fn without_the_mpi_feature_distributed_says_how_to_build() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    for args in [
        vec!["train", "--config", "tiny", "--steps", "2", "--distributed", "mpi", "--out", s(&out)],
        vec!["bench", "--config", "tiny", "--steps", "1", "--distributed", "mpi", "--out", s(&out)],
    ] {
        let o = cllm(&args);
        let err = text(&o.stderr);
        assert!(!o.status.success(), "{args:?}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("error: ") && err.contains("cargo build --release --features mpi"), "{err}");
        assert!(!out.exists(), "nothing written");
    }
}

#[test]
fn distributed_needs_the_segmented_strategy() {
    let o = cllm(&["train", "--config", "tiny", "--distributed", "mpi", "--strategy", "rayon", "--dry-run"]);
    let err = assert_fails(&o, 2);
    assert!(err.contains("--distributed needs --strategy segmented"), "{err}");
}
