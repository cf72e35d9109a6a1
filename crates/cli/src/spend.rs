//! `hotpot spend verify FILE --gateway PEER_ID`: checks a key's spend log
//! (`GET /v1/hotpot/spend`) offline against the gateway's public key.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct SpendArgs {
    #[command(subcommand)]
    pub command: SpendCommand,
}

#[derive(Subcommand, Debug)]
pub enum SpendCommand {
    /// Check every entry's hash, the chain, the gateway's signatures and
    /// the signed head: a changed, removed or reordered entry fails.
    Verify {
        file: PathBuf,
        /// The gateway's peer id (it is its public key).
        #[arg(long)]
        gateway: String,
    },
}

pub fn spend(args: &SpendArgs) -> Result<()> {
    let SpendCommand::Verify { file, gateway } = &args.command;
    let peer: hotpot_net::PeerId = gateway.parse().with_context(|| format!("{gateway:?} is not a peer id"))?;
    let key = hotpot_net::node_id_of(&peer).context("this peer id does not embed an ed25519 key")?;
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let log: hotpot_gateway::spend::SpendLog = serde_json::from_str(&text).with_context(|| format!("{} is not a spend log", file.display()))?;
    if !log.gateway.is_empty() && log.gateway != *gateway {
        bail!("the log says it comes from gateway {}, not {gateway}", log.gateway);
    }
    match hotpot_gateway::spend::verify(&log, &key) {
        Ok(total) => {
            println!("key {}: {} entries, {total} credits charged in all", log.head.key, log.entries.len());
            println!("verdict: the spend log holds (signed by {gateway})");
            Ok(())
        }
        Err(why) => {
            println!("verdict: BROKEN: {why}");
            bail!("the spend log in {} does not verify: {why}", file.display())
        }
    }
}
