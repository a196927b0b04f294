//! Compiles `proto/` with the protoc shipped by `protoc-bin-vendored`, so a bare
//! machine needs no system protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Sound: a build script is single-threaded. prost-build reads PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        // Key carries raw key bytes: its Debug is written by hand (src/agent/check.rs).
        .skip_debug([".fernetd.v1.Key"])
        .compile_protos(&["proto/fernetd/v1/fernetd.proto"], &["proto"])?;
    Ok(())
}
