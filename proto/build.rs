//! Compiles every .proto under `proto/` with protox (pure Rust, no system protoc).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/tern/demo/v1/demo.proto",
        "proto/tern/test/v1/echo.proto",
        "proto/tern/control/v1/control.proto",
        "proto/tern/identity/v1/identity.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
