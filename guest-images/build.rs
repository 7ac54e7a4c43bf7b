//! Builds the no_std guest programs in `../guest` with their own target
//! directory, flags and linker script, and embeds the resulting ELF images.
//!
//! The nested cargo runs with a clean environment for the flags that belong
//! to the host build (RUSTFLAGS and friends), so a host-side `-D warnings`,
//! coverage or sanitizer flag never reaches the freestanding guest.

use std::env;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

/// The guest binaries, in the order `--guest` lists them.
const GUESTS: &[&str] = &["fold", "rdtsc", "exits", "net", "scribble", "bulk", "disk"];
const TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let guest_dir = manifest_dir.join("../guest");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
    let target_dir = out_dir.join("guest-target");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());

    let mut command = Command::new(cargo);
    command
        .current_dir(&guest_dir)
        .args(["build", "--release", "--target", TARGET, "--bins"])
        .arg("--target-dir")
        .arg(&target_dir);
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "RUSTDOCFLAGS",
    ] {
        command.env_remove(var);
    }
    command.env(
        "CARGO_ENCODED_RUSTFLAGS",
        [
            "-C",
            "relocation-model=static",
            "-C",
            "force-unwind-tables=no",
        ]
        .join("\x1f"),
    );
    let status = command
        .status()
        .expect("failed to start cargo for the guest");
    assert!(
        status.success(),
        "building the guest programs failed: {status}"
    );

    let mut table = String::from(
        "/// Every embedded guest image: (name, ELF bytes).\npub static IMAGES: &[(&str, &[u8])] = &[\n",
    );
    for name in GUESTS {
        let built = target_dir.join(TARGET).join("release").join(name);
        let copy = out_dir.join(format!("{name}.elf"));
        fs::copy(&built, &copy).unwrap_or_else(|e| panic!("copy {}: {e}", built.display()));
        table.push_str(&format!(
            "    ({name:?}, include_bytes!({:?})),\n",
            copy.display().to_string()
        ));
    }
    table.push_str("];\n");
    fs::write(out_dir.join("images.rs"), table).expect("write images.rs");

    for path in [
        "src",
        "Cargo.toml",
        "build.rs",
        "linker.ld",
        "../guest-abi/src",
        "../guest-redis/src",
        "../guest-redis/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(path).display());
    }
}
