//! A local chain: foundry's `anvil`, from the npm package
//! `@foundry-rs/anvil-linux-amd64` (a binary inside a registry package),
//! for tests and `hotpot up --chain`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, U256};
use alloy::providers::{Provider, ProviderBuilder};

use crate::ChainError;

/// The npm package and version anvil comes from.
pub const ANVIL_PACKAGE: &str = "@foundry-rs/anvil-linux-amd64@1.7.1";

/// Where anvil is: `$HOTPOT_ANVIL`, `anvil` on the PATH, or the npm
/// package installed under `tools` (installing it there with npm when
/// `install` is set and it is missing).
pub fn find_anvil(tools: &Path, install: bool) -> Result<PathBuf, ChainError> {
    if let Some(p) = std::env::var_os("HOTPOT_ANVIL") {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(ChainError::Anvil(format!("HOTPOT_ANVIL={} is not a file", p.display()))) };
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("anvil");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    let installed = tools.join("node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil");
    if installed.is_file() {
        return Ok(installed);
    }
    if !install {
        return Err(ChainError::Anvil(format!(
            "anvil not found (set HOTPOT_ANVIL, put it on the PATH, or: npm install --prefix {} {ANVIL_PACKAGE})",
            tools.display()
        )));
    }
    eprintln!("installing anvil: npm install --prefix {} {ANVIL_PACKAGE}", tools.display());
    std::fs::create_dir_all(tools).map_err(|e| ChainError::Anvil(format!("{}: {e}", tools.display())))?;
    let status = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--prefix"])
        .arg(tools)
        .arg(ANVIL_PACKAGE)
        .status()
        .map_err(|e| ChainError::Anvil(format!("running npm (needed to install {ANVIL_PACKAGE}): {e}")))?;
    if !status.success() || !installed.is_file() {
        return Err(ChainError::Anvil(format!("npm install {ANVIL_PACKAGE} failed ({status})")));
    }
    Ok(installed)
}

/// A running anvil on 127.0.0.1, killed when dropped.
#[derive(Debug)]
pub struct LocalChain {
    child: Child,
    rpc: String,
}

impl LocalChain {
    /// Starts `anvil` on `port` (0: a free one) with its log in `log`, and
    /// waits until it answers.
    pub async fn start(anvil: &Path, port: u16, log: &Path) -> Result<Self, ChainError> {
        let port = if port == 0 { free_port()? } else { port };
        let out = std::fs::File::create(log).map_err(|e| ChainError::Anvil(format!("{}: {e}", log.display())))?;
        let err = out.try_clone().map_err(|e| ChainError::Anvil(e.to_string()))?;
        let child = Command::new(anvil)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env("NO_COLOR", "1")
            .spawn()
            .map_err(|e| ChainError::Anvil(format!("starting {}: {e}", anvil.display())))?;
        let mut chain = Self { child, rpc: format!("http://127.0.0.1:{port}") };
        let url = chain.rpc.parse().map_err(ChainError::rpc)?;
        let provider = ProviderBuilder::new().connect_http(url);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = chain.child.try_wait() {
                return Err(ChainError::Anvil(format!("exited at start ({status}); see {}", log.display())));
            }
            if provider.get_chain_id().await.is_ok() {
                return Ok(chain);
            }
            if Instant::now() > deadline {
                return Err(ChainError::Anvil(format!("did not answer within 30 s; see {}", log.display())));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Its JSON-RPC endpoint.
    pub fn rpc(&self) -> &str {
        &self.rpc
    }

    /// Sets `who`'s balance to `wei` (anvil's `anvil_setBalance`).
    pub async fn fund(&self, who: Address, wei: U256) -> Result<(), ChainError> {
        fund_on_anvil(&self.rpc, who, wei).await
    }
}

impl Drop for LocalChain {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sets `who`'s balance to `wei` on the anvil at `rpc` (`anvil_setBalance`:
/// a development chain's faucet; a real chain refuses it).
pub async fn fund_on_anvil(rpc: &str, who: Address, wei: U256) -> Result<(), ChainError> {
    let provider = ProviderBuilder::new().connect_http(rpc.parse().map_err(ChainError::rpc)?);
    let _: serde_json::Value = provider.raw_request("anvil_setBalance".into(), (who, wei)).await.map_err(ChainError::rpc)?;
    Ok(())
}

fn free_port() -> Result<u16, ChainError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| ChainError::Anvil(format!("no free port: {e}")))?;
    Ok(l.local_addr().map_err(|e| ChainError::Anvil(e.to_string()))?.port())
}
