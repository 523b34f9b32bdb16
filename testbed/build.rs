//! Tells the lab where the repository is (`EPHEMERALD_REPO_ROOT`, the
//! workspace root above this crate), so the testbeds, the image cache and the
//! project's tools stay under `<repo>/.testbed` and `<repo>/.tools` as before
//! the lab had its own crate.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let root = std::path::Path::new(&manifest)
        .parent()
        .expect("the lab crate lives in the workspace root");
    println!("cargo:rustc-env=EPHEMERALD_REPO_ROOT={}", root.display());
}
