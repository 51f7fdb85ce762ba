//! Links the release `tern-proxy` with the functions it runs (start-up, one
//! mTLS call each way, a metrics scrape, shutdown) laid out side by side.
//!
//! The kernel maps a file's pages around every page fault (64 KiB by
//! default), so code scattered over the 9 MB text segment made nearly all of
//! it resident although a sidecar runs 2.9 MB of it: most of an idle
//! sidecar's RSS. `symbol-order.txt` names those functions (see "Idle
//! memory" in docs/PERFORMANCE.md for how to regenerate it); rust-lld, the
//! default linker for x86-64 Linux since Rust 1.90, places them first.
//! Names it does not know (a stale list after a dependency update) are
//! skipped silently: the binary is the same, only less compact.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=symbol-order.txt");
    println!("cargo:rerun-if-env-changed=RUSTC");
    if !links_with_rust_lld() || std::env::var("PROFILE").as_deref() != Ok("release") {
        return;
    }
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let order = std::path::Path::new(&dir).join("symbol-order.txt");
    if !order.is_file() {
        return;
    }
    println!(
        "cargo:rustc-link-arg-bin=tern-proxy=-Wl,--symbol-ordering-file={}",
        order.display()
    );
    println!("cargo:rustc-link-arg-bin=tern-proxy=-Wl,--no-warn-symbol-ordering");
    // The dynamic loader reads every relocation at start: 664 KB of RELA
    // entries, nearly all relative ones, which RELR packs into a few KB
    // (needs glibc 2.36 at run time, which the images ship).
    println!("cargo:rustc-link-arg-bin=tern-proxy=-Wl,-z,pack-relative-relocs");
}

/// x86-64 Linux with rustc 1.90 or later and no linker chosen in RUSTFLAGS:
/// other linkers (GNU ld, an explicit `-C linker`) reject the option.
fn links_with_rust_lld() -> bool {
    let target = std::env::var("TARGET").unwrap_or_default();
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if target != "x86_64-unknown-linux-gnu" || flags.contains("linker") {
        return false;
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = Command::new(rustc).arg("--version").output() else {
        return false;
    };
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let version = String::from_utf8_lossy(&out.stdout);
    let minor = version
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.split('.').nth(1))
        .and_then(|m| m.parse::<u32>().ok());
    minor.is_some_and(|m| m >= 90)
}
