//! Generates the CRI client and server from `proto/cri.proto` with a pure-Rust
//! proto compiler (protox), so building our own protos needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/cri.proto");
    let fds = protox::compile(["cri.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Unimplemented RPCs of the test server answer UNIMPLEMENTED, as a runtime would.
        .generate_default_stubs(true)
        .compile_fds(fds)?;
    Ok(())
}
