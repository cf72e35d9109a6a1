//! The committed contract artifact (ABI + bytecode the crate embeds) is
//! exactly what the pinned solcjs compiles `contracts/HotpotMarket.sol` to.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn the_committed_artifact_is_what_the_source_compiles_to() {
    let contracts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../contracts");
    assert!(contracts.join("node_modules/solc").is_dir(), "the pinned solc is missing: bash scripts/test.sh installs it (npm ci --prefix contracts)");
    let out = Command::new("node").arg(contracts.join("build.js")).arg("--check").output().expect("node runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("matches its source"), "{text}");
}
