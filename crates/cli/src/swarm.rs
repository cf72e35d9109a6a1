//! `hotpot node`, `hotpot swarm status`, and `hotpot run --join`.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Args;
use hotpot_core::placement::{Served, gaps, node_counts};
use hotpot_core::{LayerSpan, NodeKey};
use hotpot_engine::{ClientParts, Device, ModelFile};
use hotpot_gateway::{ChainConfig, ChainContext, RemoteChain, SharedDirectory, describe_route};
use hotpot_net::{Multiaddr, Network, NetworkConfig};
use hotpot_node::{BlockChoice, NodeConfig};

use crate::run::RunArgs;
use crate::store::Store;

/// Options every swarm command shares.
#[derive(Args, Debug, Clone)]
pub struct PeerArgs {
    /// Join the swarm through this peer (repeatable).
    #[arg(long)]
    pub join: Vec<Multiaddr>,
    /// Discover peers on the local network with mDNS.
    #[arg(long)]
    pub mdns: bool,
}

/// NAT traversal options of a listening peer.
#[derive(Args, Debug, Clone)]
pub struct RelayArgs {
    /// Relay circuits for peers behind NAT from the start (limits sized
    /// for hidden-state traffic), and answer their AutoNAT dial-backs. Run
    /// it on a node others can reach. Without it a node relays once
    /// AutoNAT finds it reachable from outside.
    #[arg(long, conflicts_with = "no_relay")]
    pub relay: bool,
    /// Never relay circuits for others.
    #[arg(long)]
    pub no_relay: bool,
    /// When to listen through a relay this peer is connected to: auto
    /// (once AutoNAT finds it unreachable from outside), always (known to
    /// sit behind NAT), never.
    #[arg(long, value_enum, default_value = "auto")]
    pub reserve: ReserveArg,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum ReserveArg {
    Auto,
    Always,
    Never,
}

impl RelayArgs {
    fn config(&self) -> hotpot_net::RelayConfig {
        hotpot_net::RelayConfig {
            serve: match (self.relay, self.no_relay) {
                (true, _) => hotpot_net::Serve::Always,
                (false, true) => hotpot_net::Serve::Never,
                (false, false) => hotpot_net::Serve::WhenPublic,
            },
            reserve: match self.reserve {
                ReserveArg::Auto => hotpot_net::Reserve::WhenPrivate,
                ReserveArg::Always => hotpot_net::Reserve::Always,
                ReserveArg::Never => hotpot_net::Reserve::Never,
            },
        }
    }
}

/// `hotpot relay`: a relay (and DHT server) only, for nodes behind NAT.
#[derive(Args, Debug)]
pub struct RelayOnlyArgs {
    /// Addresses to listen on (repeatable); others must be able to reach one.
    #[arg(long, default_value = "/ip4/0.0.0.0/udp/4001/quic-v1")]
    pub listen: Vec<Multiaddr>,
    #[command(flatten)]
    pub peers: PeerArgs,
    /// File with the relay's 32-byte secret key (created if missing), so
    /// its address stays the same across restarts.
    #[arg(long)]
    pub key: Option<std::path::PathBuf>,
}

/// The swarm of a peer that serves (a node, a relay): it listens, keeps
/// DHT records, and prints its peer id and addresses.
async fn start_serving(identity: &Identity, listen: &[Multiaddr], peers: &PeerArgs, relay: hotpot_net::RelayConfig) -> Result<Network> {
    let network = Network::start(NetworkConfig {
        key: identity.key.clone(),
        listen: listen.to_vec(),
        join: peers.join.clone(),
        dht_server: true,
        mdns: peers.mdns,
        relay,
    })
    .await?;
    println!("peer id: {}", network.peer_id());
    for addr in network.listen_addrs().await? {
        println!("listening on {addr}");
    }
    Ok(network)
}

/// `hotpot relay`: runs until SIGTERM or Ctrl-C.
pub fn relay(args: &RelayOnlyArgs) -> Result<()> {
    let identity = match &args.key {
        Some(path) => Identity::load(path)?,
        None => Identity::ephemeral(),
    };
    runtime()?.block_on(async {
        let relay = hotpot_net::RelayConfig { serve: hotpot_net::Serve::Always, reserve: hotpot_net::Reserve::Never };
        let network = start_serving(&identity, &args.listen, &args.peers, relay).await?;
        println!("relaying circuits for peers behind NAT; Ctrl-C stops");
        let _ = std::io::stdout().flush();
        shutdown_signal().await;
        network.shutdown().await;
        Ok(())
    })
}

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// Model name, id or .gguf path.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Blocks to serve: `a..b`, or `auto` (the swarm's weakest window).
    #[arg(long, default_value = "auto")]
    pub blocks: String,
    /// With --blocks auto: how many blocks (default: as many as fit in memory).
    #[arg(long)]
    pub num_blocks: Option<u32>,
    /// Addresses to listen on (repeatable).
    #[arg(long, default_value = "/ip4/0.0.0.0/udp/0/quic-v1")]
    pub listen: Vec<Multiaddr>,
    #[command(flatten)]
    pub peers: PeerArgs,
    #[command(flatten)]
    pub nat: RelayArgs,
    /// Compute threads (0: one per core).
    #[arg(short, long, default_value_t = 0)]
    pub threads: usize,
    #[arg(long, default_value_t = 32)]
    pub max_sessions: usize,
    /// Seconds after which a silent session is closed and its cache freed.
    #[arg(long, default_value_t = 120)]
    pub idle_timeout: u64,
    /// KV-cache memory all sessions may reserve, MiB.
    #[arg(long, default_value_t = 2048)]
    pub kv_memory_mb: usize,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 10)]
    pub heartbeat: u64,
    /// Credits asked per 1,000 positions through this node's blocks
    /// (prompt and generated alike), e.g. 0.5; shown to gateways in
    /// heartbeats.
    #[arg(long, default_value = "0")]
    pub price: hotpot_core::Credits,
    /// Refuse new sessions from a gateway that closed this many sessions
    /// here without a receipt in the last hour (0: never) [default: 64 for
    /// a priced node — two crashes of a busy gateway —, 0 for a free one].
    #[arg(long)]
    pub max_owed_receipts: Option<usize>,
    /// File with the node's 32-byte secret key (created if missing); without
    /// it, the node gets a fresh identity each start.
    #[arg(long)]
    pub key: Option<std::path::PathBuf>,
    /// Leave TOPLOC-style output sketches out of commitments.
    #[arg(long)]
    pub no_sketches: bool,
    /// Red-team only: cheat this way, to test the verification
    /// (requantize-q4_0, requantize-q8_0, noise, skip-block,
    /// attention-window, replay, other-span, alter-input, weights:FILE).
    #[arg(long, hide = true)]
    pub redteam: Option<String>,
    #[command(flatten)]
    pub chain: crate::chain::ChainArgs,
}

/// Audit options of the gateway.
#[derive(Args, Debug, Clone)]
pub struct AuditArgs {
    /// Share of sessions audited (a node's first 20 are always audited).
    #[arg(long, default_value_t = 0.05)]
    pub audit_rate: f64,
    /// Do not audit at all.
    #[arg(long)]
    pub no_audits: bool,
    /// Audit only with other nodes, not with the gateway's own engine.
    #[arg(long)]
    pub no_audit_local: bool,
    /// Where evidence of cheating is written (default: $HOTPOT_HOME/evidence).
    #[arg(long)]
    pub evidence_dir: Option<std::path::PathBuf>,
    /// Seconds between repeats of this gateway's accusations, so that
    /// gateways that join later hear of earlier convictions too.
    #[arg(long, default_value_t = 60)]
    pub accusations_every: u64,
    /// Most accusations from other gateways checked per minute (each costs
    /// an audit); the rest are dropped.
    #[arg(long, default_value_t = 6)]
    pub accusation_checks_per_minute: u32,
    /// Measurement only: convict, but keep routing through convicted nodes.
    #[arg(long, hide = true)]
    pub redteam_keep_cheats: bool,
    /// Red-team only: convict every audited node (false accusations).
    #[arg(long, hide = true)]
    pub redteam_accuse_everyone: bool,
}

impl AuditArgs {
    fn config(&self, model_path: &std::path::Path, device: Option<Device>) -> Result<Option<hotpot_gateway::AuditConfig>> {
        if self.no_audits {
            return Ok(None);
        }
        if !(0.0..=1.0).contains(&self.audit_rate) {
            bail!("--audit-rate must be in [0, 1]");
        }
        if self.redteam_keep_cheats {
            redteam_only("--redteam-keep-cheats")?;
        }
        if self.redteam_accuse_everyone {
            redteam_only("--redteam-accuse-everyone")?;
        }
        let store = Store::from_env()?;
        let tolerance = store.tolerance_for(model_path)?.unwrap_or_default();
        Ok(Some(hotpot_gateway::AuditConfig {
            policy: hotpot_verify::AuditPolicy { rate: self.audit_rate, ..Default::default() },
            tolerance,
            local_model: (!self.no_audit_local).then(|| model_path.to_path_buf()),
            evidence_dir: Some(self.evidence_dir.clone().unwrap_or_else(|| store.evidence_dir())),
            device,
            keep_cheats: self.redteam_keep_cheats,
            accuse_everyone: self.redteam_accuse_everyone,
            accusations_every: Duration::from_secs(self.accusations_every.max(1)),
            accusation_checks_per_minute: self.accusation_checks_per_minute,
        }))
    }
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub peers: PeerArgs,
    /// Seconds to listen for the swarm.
    #[arg(long, default_value_t = 3)]
    pub wait: u64,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Red-team switches work only in builds with the `redteam` feature.
fn redteam_only(flag: &str) -> Result<()> {
    if cfg!(feature = "redteam") {
        Ok(())
    } else {
        bail!("{flag} is a red-team switch for testing verification; this hotpot was built without it (cargo feature `redteam`)")
    }
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// A long-lived identity: an ed25519 key in a file, created on first use,
/// locked while this process runs (two processes with one identity would
/// confuse the swarm).
pub struct Identity {
    pub key: NodeKey,
    /// Held open for its lock.
    _file: Option<std::fs::File>,
}

impl Identity {
    /// A fresh identity for this run only.
    pub fn ephemeral() -> Self {
        Self { key: NodeKey::generate(), _file: None }
    }

    /// The key in `path`, created (readable by its owner only) if missing.
    pub fn load(path: &std::path::Path) -> Result<Self> {
        use std::io::{Read, Seek};
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        if file.try_lock().is_err() {
            bail!("{} is in use by another running hotpot process; give this one its own key file (--key FILE)", path.display());
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).with_context(|| format!("reading {}", path.display()))?;
        let key = if bytes.is_empty() {
            let key = NodeKey::generate();
            file.rewind()?;
            file.write_all(&key.secret_bytes())?;
            file.sync_all()?;
            key
        } else {
            NodeKey::from_secret_bytes(&bytes).with_context(|| format!("{} is not a key file (32 secret bytes)", path.display()))?
        };
        Ok(Self { key, _file: Some(file) })
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

pub fn node(args: &NodeArgs) -> Result<()> {
    let entry = Store::from_env()?.resolve(&args.model)?;
    let blocks = match args.blocks.as_str() {
        "auto" => BlockChoice::Auto { count: args.num_blocks },
        text => BlockChoice::Fixed(text.parse::<LayerSpan>().with_context(|| format!("--blocks {text}"))?),
    };
    let cheat = match args.redteam.as_deref() {
        Some(cheat) => Some(redteam_only("--redteam").and_then(|()| cheat.parse().map_err(anyhow::Error::msg))?),
        None => None,
    };
    let identity = match &args.key {
        Some(path) => Identity::load(path)?,
        None => Identity::ephemeral(),
    };
    let chain = match args.chain.wallet()? {
        Some(wallet) => Some((
            wallet.clone(),
            hotpot_node::NodeChain {
                wallet: crate::chain::wallet_proof(&wallet, &identity.key)?,
                receipts: match &args.chain.chain_receipts {
                    Some(path) => path.clone(),
                    None => Store::from_env()?.chain_receipts_path(),
                },
            },
        )),
        None => None,
    };
    runtime()?.block_on(async {
        if let (Some((wallet, _)), Some(rpc), Some(market)) = (&chain, &args.chain.chain_rpc, args.chain.market) {
            let market = hotpot_chain::Market::connect(rpc, wallet, market).await?;
            let stake = market.stake_of(wallet.address()).await?;
            println!("stake on chain {}: {stake} wei (market {})", market.chain_id(), market.address());
            if stake.is_zero() {
                eprintln!("warning: this node has nothing at stake; gateways that ask for a stake will not route through it (hotpot chain stake)");
            }
        }
        let network = start_serving(&identity, &args.listen, &args.peers, args.nat.config()).await?;
        let config = NodeConfig {
            model_path: entry.path.clone(),
            model_name: entry.name.clone(),
            blocks,
            threads: args.threads,
            max_sessions: args.max_sessions,
            kv_budget_bytes: args.kv_memory_mb << 20,
            idle_timeout: Duration::from_secs(args.idle_timeout.max(1)),
            heartbeat: Duration::from_secs(args.heartbeat.max(1)),
            price_per_1k: args.price.micros(),
            max_owed_receipts: args.max_owed_receipts.unwrap_or(if args.price.is_zero() { 0 } else { 64 }),
            receipts: Some(Store::from_env()?.receipts_path()),
            device: None,
            sketches: !args.no_sketches,
            cheat,
            chain: chain.map(|(_, c)| c),
        };
        let running = hotpot_node::start(config, network.clone()).await?;
        println!("serving blocks {} of {} ({}) at {:.1} tokens/s", running.span(), entry.name, running.model(), running.throughput());
        let _ = std::io::stdout().flush();
        shutdown_signal().await;
        eprintln!("shutting down: ending open sessions (their gateways fail over), then the engine");
        running.shutdown(Duration::from_secs(5)).await;
        network.shutdown().await;
        Ok(())
    })
}

/// Joins the swarm as a client (not a DHT server), listening on `listen`.
async fn join_as_client(peers: &PeerArgs, listen: Vec<Multiaddr>, key: NodeKey) -> Result<Network> {
    if peers.join.is_empty() && !peers.mdns {
        bail!("give --join MULTIADDR (a node's address) or --mdns to find the swarm");
    }
    let network =
        Network::start(NetworkConfig { key, listen, join: peers.join.clone(), dht_server: false, mdns: peers.mdns, relay: Default::default() }).await?;
    Ok(network)
}

pub fn status(args: &StatusArgs) -> Result<()> {
    runtime()?.block_on(async {
        let network = join_as_client(&args.peers, vec![], NodeKey::generate()).await?;
        // Ask every peer the DHT knows, for a few rounds.
        let deadline = Instant::now() + Duration::from_secs(args.wait.max(1));
        let mut seen = BTreeMap::new();
        while Instant::now() < deadline {
            for (peer, info) in network.discover(None, 0, Duration::from_secs(2)).await {
                seen.insert(peer, info);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // Then the DHT providers of every block of every model seen.
        let models: BTreeMap<_, _> = seen.values().map(|i| (i.model, i.n_blocks)).collect();
        for (model, n_blocks) in models {
            for (peer, info) in network.discover(Some(&model), n_blocks, Duration::from_secs(2)).await {
                seen.insert(peer, info);
            }
        }
        // How this process reached each one: its own connection, or only
        // through a relay.
        let routes = network.routes().await.unwrap_or_default();
        let route = |peer: &hotpot_net::PeerId| routes.get(peer).map_or("not connected", |r| r.as_str());
        network.shutdown().await;
        if args.json {
            let nodes: Vec<serde_json::Value> = seen
                .iter()
                .map(|(peer, i)| {
                    serde_json::json!({
                        "peer": peer.to_string(), "node": i.node, "model": i.model, "model_name": i.model_name,
                        "n_blocks": i.n_blocks, "span": [i.span.start(), i.span.end()], "throughput": i.throughput,
                        "free_slots": i.free_slots, "max_sessions": i.max_sessions, "queue": i.queue,
                        "price_per_1k": hotpot_core::Credits::from_micros(i.price_per_1k).to_string(), "version": i.version, "addrs": i.addrs, "timestamp_ms": i.timestamp_ms,
                        "reachability": i.reachability(), "route": route(peer),
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&nodes)?);
            return Ok(());
        }
        print_status(&seen, route);
        Ok(())
    })
}

/// The address to show for a node: its relay's (behind NAT), else the
/// first one that is not loopback or unspecified.
fn shown_address(info: &hotpot_wire::NodeInfo) -> String {
    let bare = |a: &str| a.split("/p2p/").next().unwrap_or_default().to_string();
    if let Some(circuit) = info.circuit_addr() {
        return format!("{} (relay)", bare(circuit));
    }
    let routable = |a: &&String| !["/ip4/127.", "/ip4/0.0.0.0/", "/ip6/::1/", "/ip6/::/"].iter().any(|p| a.starts_with(p));
    info.addrs.iter().find(routable).or(info.addrs.first()).map(|a| bare(a)).unwrap_or_default()
}

/// The nodes seen, a line each (REACH: public, or private when it listens
/// through a relay; ROUTE: how this process reached it), then each model's
/// coverage bar.
fn print_status(seen: &BTreeMap<hotpot_net::PeerId, hotpot_wire::NodeInfo>, route: impl Fn(&hotpot_net::PeerId) -> &'static str) {
    if seen.is_empty() {
        println!("no nodes found");
        return;
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    println!(
        "{:<54} {:<46} {:<8} {:<8} {:<14} {:>7} {:>9} {:>9} {:>5} {:>10} {:>10}",
        "PEER", "ADDRESS", "REACH", "ROUTE", "MODEL", "SPAN", "TOK/S", "SESSIONS", "QUEUE", "PRICE/1K", "HEARD"
    );
    for (peer, i) in seen {
        let addr = shown_address(i);
        let age = now.saturating_sub(i.timestamp_ms) as f64 / 1000.0;
        println!(
            "{:<54} {:<46} {:<8} {:<8} {:<14} {:>7} {:>9.1} {:>9} {:>5} {:>10} {:>8.1}s",
            peer.to_string(),
            addr,
            i.reachability(),
            match route(peer) {
                "not connected" => "-",
                r => r,
            },
            i.model_name,
            i.span.to_string(),
            i.throughput,
            format!("{}/{}", i.max_sessions - i.free_slots.min(i.max_sessions), i.max_sessions),
            i.queue,
            hotpot_core::Credits::from_micros(i.price_per_1k).to_string(),
            age
        );
    }
    let mut models: BTreeMap<_, Vec<&hotpot_wire::NodeInfo>> = BTreeMap::new();
    for i in seen.values() {
        models.entry((i.model, i.n_blocks)).or_default().push(i);
    }
    for ((model, n_blocks), infos) in models {
        let served: Vec<Served> = infos.iter().map(|i| Served { span: i.span, throughput: i.throughput }).collect();
        let counts = node_counts(n_blocks, &served);
        let row: String = counts.iter().map(|&c| if c == 0 { '.' } else { char::from_digit(c.min(9), 10).unwrap_or('+') }).collect();
        println!("\nmodel {} ({model}), {n_blocks} blocks, {} nodes", infos[0].model_name, infos.len());
        let ruler: String = (0..n_blocks).map(|b| if b % 10 == 0 { char::from_digit((b / 10) % 10, 10).unwrap_or('+') } else { ' ' }).collect();
        println!("  block x10  {ruler}");
        println!("  nodes      {row}");
        let missing = gaps(n_blocks, &served);
        if missing.is_empty() {
            let priced: Vec<_> = infos.iter().map(|i| (i.span, i.price_per_1k)).collect();
            let cheapest = hotpot_core::placement::cheapest_route_price(n_blocks, &priced).map(hotpot_core::Credits::from_micros);
            println!("  every block is served; the cheapest full route costs {} credits per 1,000 positions", cheapest.unwrap_or_default());
        } else {
            println!("  missing blocks: {}", missing.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "));
        }
    }
}

/// `hotpot run --join`: the model's client parts here, its blocks on the swarm.
pub fn run_remote(args: &RunArgs) -> Result<()> {
    let entry = Store::from_env()?.resolve(&args.model)?;
    let file = ModelFile::open(&entry.path)?;
    let config = file.config().clone();
    let device = Device::cpu(args.threads)?;
    let client = Arc::new(ClientParts::load(&file, &device)?);
    let (mut job, (session, _)) = crate::run::session_job(&client, args, &entry)?;
    job.speculation = args.latency.load(&client, &device)?;
    runtime()?.block_on(async {
        let network = join_as_client(&args.peers, vec![], NodeKey::generate()).await?;
        let directory = SharedDirectory::follow(&network, entry.id).await;
        directory.refresh(&network, &entry.id, config.n_blocks, Duration::from_secs(3)).await;
        let max_len = job.prompt.len() + job.params.max_tokens;
        let chain_config = ChainConfig { max_len: max_len + 1, push: !args.latency.no_push, ..ChainConfig::default() };
        let context = ChainContext {
            network: network.clone(),
            directory,
            model: entry.id,
            n_blocks: config.n_blocks,
            dim: config.dim,
            observer: None,
            selector: None,
            eligible: None,
        };
        let mut chain = RemoteChain::open(context, chain_config).await.with_context(|| format!("the swarm cannot serve {}", entry.name))?;
        if args.show_route {
            eprintln!("route: {}{}", describe_route(&chain.route()), if chain.pushed() { " (pushed node to node)" } else { " (relayed through this process)" });
        }
        let mut printer = crate::run::Printer::new();
        let outcome = hotpot_gateway::drive(&client, &mut chain, &job, &session, &mut printer).await;
        let label = format!("swarm, {} hops, {} failovers", chain.route().len(), chain.failovers());
        // Nodes get their receipts (nothing is paid: no books here).
        chain.close_with_receipts(hotpot_gateway::market::receipts_for(network.key(), &outcome.record).into_iter().map(|r| (r, None)).collect()).await;
        network.shutdown().await;
        printer.report(args, &label, &job, outcome)
    })
}

#[derive(Args, Debug)]
pub struct GatewayArgs {
    /// Model name, id or .gguf path (the gateway holds its tokenizer, embedding and head).
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    #[command(flatten)]
    pub peers: PeerArgs,
    /// Address for the HTTP API.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: std::net::SocketAddr,
    /// JSON file of API keys; without it, the API is open. What each key
    /// spends is kept beside it (KEYS.spending.sqlite) across restarts.
    #[arg(long)]
    pub api_keys: Option<std::path::PathBuf>,
    /// Compute threads for the gateway's own work (0: one per core).
    #[arg(short, long, default_value_t = 0)]
    pub threads: usize,
    /// Largest request body, MiB.
    #[arg(long, default_value_t = 4)]
    pub max_body_mb: usize,
    /// Peer-to-peer address to listen on, so that other gateways can fetch
    /// this one's evidence of cheating.
    #[arg(long, default_value = "/ip4/0.0.0.0/udp/0/quic-v1")]
    pub p2p_listen: Vec<Multiaddr>,
    #[command(flatten)]
    pub identity: GatewayIdentityArgs,
    #[command(flatten)]
    pub audit: AuditArgs,
    #[command(flatten)]
    pub serving: ServingArgs,
    #[command(flatten)]
    pub latency: LatencyArgs,
    #[command(flatten)]
    pub chain: crate::chain::ChainArgs,
    #[command(flatten)]
    pub settle: crate::chain::SettleArgs,
}

/// How the pipeline hides network latency: node-to-node push (on unless
/// turned off) and speculative decoding (off unless asked for).
#[derive(Args, Debug, Clone, Default)]
pub struct LatencyArgs {
    /// Relay every step through this process (a star) instead of having
    /// each node push its output straight to the next one.
    #[arg(long)]
    pub no_push: bool,
    /// Draft tokens with MODEL (a smaller model with the same vocabulary,
    /// run whole in this process), or with `ngram` (prompt lookup, no
    /// model); the pipeline checks each window of drafts in one pass.
    #[arg(long, value_name = "MODEL|ngram")]
    pub draft: Option<String>,
    /// Most tokens drafted per pass (the window adapts below it).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub max_draft: u64,
}

impl LatencyArgs {
    /// The speculation asked for, with its draft model loaded.
    pub fn load(&self, target: &ClientParts, device: &Device) -> Result<Option<hotpot_gateway::Speculation>> {
        let Some(draft) = &self.draft else { return Ok(None) };
        let mut speculation = if draft == "ngram" {
            hotpot_gateway::Speculation::ngram()
        } else {
            let entry = Store::from_env()?.resolve(draft)?;
            let file = ModelFile::open(&entry.path)?;
            let model = hotpot_gateway::DraftModel::load(&entry.name, &file, device, target).map_err(|e| anyhow::anyhow!("--draft {draft}: {e}"))?;
            hotpot_gateway::Speculation::model(Arc::new(model))
        };
        speculation.max_draft = self.max_draft as usize;
        Ok(Some(speculation))
    }
}

/// What the gateway allows its HTTP clients, and how it waits for capacity.
#[derive(Args, Debug, Clone)]
pub struct ServingArgs {
    /// Seconds a client has to send a request's headers, and again its body.
    #[arg(long, default_value_t = 15)]
    pub read_timeout: u64,
    /// Seconds a connection may stay open without a request.
    #[arg(long, default_value_t = 60)]
    pub idle_timeout: u64,
    /// Most open HTTP connections (the oldest idle one makes room).
    #[arg(long, default_value_t = 16_384)]
    pub max_connections: usize,
    /// Most open HTTP connections from one client address.
    #[arg(long, default_value_t = 1024)]
    pub max_connections_per_ip: usize,
    /// Seconds open requests may run on after SIGTERM or Ctrl-C.
    #[arg(long, default_value_t = 10)]
    pub shutdown_grace: u64,
    /// Seconds a request waits for a free node before 429.
    #[arg(long, default_value_t = 15)]
    pub queue_timeout: u64,
    /// List each API key's name and spending in /metrics.
    #[arg(long)]
    pub metrics_per_key: bool,
    /// Create the keys' spending store if it does not exist (first start
    /// only: without this flag a missing store refuses to start, so that a
    /// lost file never restarts every key at 0 spent).
    #[arg(long)]
    pub init_store: bool,
    /// Keep the books here: prepaid keys (`"prepaid": true` in the keys
    /// file) pay each node its price and this gateway its fee from them
    /// (`hotpot ledger` shows them). Created with --init-store.
    #[arg(long)]
    pub ledger: Option<std::path::PathBuf>,
    /// This gateway's own price per 1,000 positions of a session, in
    /// credits, charged to prepaid keys beside the nodes' prices.
    #[arg(long, default_value = "0")]
    pub fee: hotpot_core::Credits,
    /// Keep nodes with less than this many credits at stake out of routes:
    /// in the books (`hotpot ledger stake`, needs --ledger), or on the
    /// chain with --chain-rpc (`hotpot chain stake`).
    #[arg(long, default_value = "0")]
    pub min_stake: hotpot_core::Credits,
    /// Percent of a convicted node's slashed stake that goes to this
    /// gateway (whose audit convicted it); the rest is burned.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub accuser_share: u32,
    /// Batch requests (`/v1/batches`) run at once, at batch priority on the
    /// nodes (interactive requests go first there).
    #[arg(long, default_value_t = 16)]
    pub batch_parallel: usize,
    /// Where uploaded files (`files/`) and batches (`batches.sqlite`) are
    /// kept [default: $HOTPOT_HOME].
    #[arg(long)]
    pub data_dir: Option<std::path::PathBuf>,
}

impl ServingArgs {
    fn apply(&self, config: &mut hotpot_gateway::GatewayConfig) {
        config.http = hotpot_gateway::HttpLimits {
            read_timeout: Duration::from_secs(self.read_timeout.max(1)),
            idle_timeout: Duration::from_secs(self.idle_timeout.max(1)),
            max_connections: self.max_connections.max(1),
            max_per_address: self.max_connections_per_ip.max(1),
            shutdown_grace: Duration::from_secs(self.shutdown_grace),
        };
        config.chain.queue_timeout = Duration::from_secs(self.queue_timeout);
        config.metrics_per_key = self.metrics_per_key;
    }

    /// The books and the receipts (beside them), when `--ledger` asks for
    /// them, with the fee and the stake rules.
    fn market(&self) -> Result<Option<Arc<hotpot_gateway::Market>>> {
        let Some(path) = &self.ledger else { return Ok(None) };
        let ledger = crate::ledger::open(Some(path), self.init_store)?;
        let receipts_path = path.parent().unwrap_or(std::path::Path::new(".")).join("receipts.sqlite");
        let receipts = hotpot_ledger::ReceiptBook::open(&receipts_path).with_context(|| format!("opening the receipts {}", receipts_path.display()))?;
        Ok(Some(Arc::new(hotpot_gateway::Market {
            books: hotpot_ledger::Books::new(ledger, Duration::from_secs(crate::ledger::DEFAULT_UNBONDING_SECS)),
            receipts: Some(Arc::new(receipts)),
            fee_per_1k: self.fee,
            min_stake: self.min_stake,
            accuser_ppm: self.accuser_share * 10_000,
        })))
    }
}

/// The gateway's lasting identity and records.
#[derive(Args, Debug, Clone)]
pub struct GatewayIdentityArgs {
    /// The gateway's ed25519 key (its peer id; it signs accusations),
    /// created on first start [default: $HOTPOT_HOME/gateway.key].
    #[arg(long)]
    pub key: Option<std::path::PathBuf>,
    /// Append a JSON line per finished session (caller, route, tokens,
    /// finish reason, timings, commitment roots) to this file.
    #[arg(long)]
    pub session_log: Option<std::path::PathBuf>,
}

impl GatewayIdentityArgs {
    fn identity(&self) -> Result<Identity> {
        let path = match &self.key {
            Some(path) => path.clone(),
            None => Store::from_env()?.gateway_key_path(),
        };
        Identity::load(&path)
    }

    fn record_sinks(&self) -> Result<Vec<Arc<dyn hotpot_gateway::RecordSink>>> {
        let mut sinks: Vec<Arc<dyn hotpot_gateway::RecordSink>> = Vec::new();
        if let Some(path) = &self.session_log {
            sinks.push(Arc::new(hotpot_gateway::SessionLog::open(path).with_context(|| format!("opening the session log {}", path.display()))?));
        }
        Ok(sinks)
    }
}

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Model name, id or .gguf path (pulled if missing).
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Local nodes to split the blocks across.
    #[arg(long, default_value_t = 3)]
    pub nodes: u32,
    /// Port of the OpenAI API (0: any free port).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// JSON file of API keys; without it, the API is open. What each key
    /// spends is kept beside it (KEYS.spending.sqlite) across restarts.
    #[arg(long)]
    pub api_keys: Option<std::path::PathBuf>,
    /// Compute threads, shared by the local nodes and the gateway (0: one per core).
    #[arg(short, long, default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    pub identity: GatewayIdentityArgs,
    #[command(flatten)]
    pub audit: AuditArgs,
    #[command(flatten)]
    pub serving: ServingArgs,
    #[command(flatten)]
    pub latency: LatencyArgs,
    /// Also start a local chain (anvil), deploy the market contract, fund
    /// and stake the local nodes, and settle their receipts there.
    #[arg(long)]
    pub chain: bool,
    /// The local nodes' price per 1,000 positions, in credits [default: 1
    /// with --chain, else 0].
    #[arg(long)]
    pub price: Option<hotpot_core::Credits>,
    #[command(flatten)]
    pub settle: crate::chain::SettleArgs,
}

/// A local chain for `hotpot up --chain`: anvil, the market deployed by
/// the gateway's wallet (its owner, registered, with a deposit), and a
/// funded, staked wallet per local node.
struct UpChain {
    chain: hotpot_chain::LocalChain,
    market: hotpot_chain::Market,
    gateway: hotpot_chain::Wallet,
    /// This run's voucher stores (`$HOTPOT_HOME/up-chain/`), emptied at
    /// start: the chain they were for is gone with its anvil.
    stores: std::path::PathBuf,
}

impl UpChain {
    async fn start(store: &Store) -> Result<Self> {
        let anvil = hotpot_chain::find_anvil(&store.home().join("tools"), true)?;
        let stores = store.home().join("up-chain");
        if stores.exists() {
            std::fs::remove_dir_all(&stores).with_context(|| format!("emptying {}", stores.display()))?;
        }
        std::fs::create_dir_all(&stores).with_context(|| format!("creating {}", stores.display()))?;
        let chain = hotpot_chain::LocalChain::start(&anvil, 0, &store.home().join("anvil.log")).await?;
        // A fresh chain each run, so a fresh owner: nothing from an earlier
        // run's market can be taken for this one's.
        let gateway = hotpot_chain::Wallet::random();
        chain.fund(gateway.address(), hotpot_chain::parse_coin("10000")?).await?;
        // One gateway here: its own audits are the quorum.
        let config = hotpot_chain::Config { unbonding_delay_s: 3600, quorum: 1, ..hotpot_chain::Config::default() };
        let (market, _) = hotpot_chain::Market::deploy(chain.rpc(), &gateway, &config).await?;
        market.set_gateway(gateway.address(), true).await?;
        market.deposit(hotpot_chain::parse_coin("100")?).await?;
        Ok(Self { chain, market, gateway, stores })
    }

    /// A funded wallet staking 1 coin, bound to `key`.
    async fn node(&self, key: &NodeKey) -> Result<hotpot_node::NodeChain> {
        let receipts = self.stores.join("chain-receipts.sqlite");
        let wallet = hotpot_chain::Wallet::random();
        self.chain.fund(wallet.address(), hotpot_chain::parse_coin("10")?).await?;
        hotpot_chain::Market::connect(self.chain.rpc(), &wallet, self.market.address()).await?.stake(hotpot_chain::parse_coin("1")?).await?;
        Ok(hotpot_node::NodeChain { wallet: crate::chain::wallet_proof(&wallet, key)?, receipts })
    }
}

struct GatewayModel {
    client: Arc<ClientParts>,
    id: hotpot_core::ModelId,
    name: String,
    speculation: Option<hotpot_gateway::Speculation>,
    push: bool,
}

fn load_gateway_model(name: &str, device: &Device, speculation: &LatencyArgs) -> Result<(GatewayModel, std::path::PathBuf)> {
    let entry = Store::from_env()?.resolve(name)?;
    let file = ModelFile::open(&entry.path)?;
    let id = file.model_id()?;
    let client = Arc::new(ClientParts::load(&file, device)?);
    let push = !speculation.no_push;
    let speculation = speculation.load(&client, device)?;
    Ok((GatewayModel { client, id, name: entry.name.clone(), speculation, push }, entry.path))
}

async fn serve_http(
    model: GatewayModel,
    network: Network,
    keys: Option<&std::path::Path>,
    max_body_mb: usize,
    audit: Option<hotpot_gateway::AuditConfig>,
    record_sinks: Vec<Arc<dyn hotpot_gateway::RecordSink>>,
    serving: &ServingArgs,
    onchain: Option<Arc<hotpot_gateway::OnChain>>,
    listener: tokio::net::TcpListener,
) -> Result<()> {
    if !serving.min_stake.is_zero() && serving.ledger.is_none() && onchain.is_none() {
        bail!("--min-stake needs stakes to read: --ledger (the books) or --chain-rpc (the chain)");
    }
    let mut config = hotpot_gateway::GatewayConfig::new(model.name.clone());
    config.onchain = onchain;
    serving.apply(&mut config);
    config.max_body_bytes = max_body_mb << 20;
    config.audit = audit;
    config.record_sinks = record_sinks;
    config.speculation = model.speculation.clone();
    config.chain.push = model.push;
    config.market = serving.market()?;
    let data = match &serving.data_dir {
        Some(dir) => dir.clone(),
        None => Store::from_env()?.home().to_path_buf(),
    };
    let files_dir = data.join("files");
    config.files = Some(Arc::new(hotpot_gateway::files::FileStore::open(&files_dir).map_err(|e| anyhow::anyhow!(e))?));
    let batches = data.join("batches.sqlite");
    config.batches = Some(Arc::new(hotpot_gateway::batch::BatchStore::open(&batches, serving.batch_parallel).map_err(|e| anyhow::anyhow!(e))?));
    if let Some(path) = keys {
        let ledger = if serving.init_store { hotpot_gateway::Ledger::Create } else { hotpot_gateway::Ledger::Existing };
        config.keys = Some(Arc::new(hotpot_gateway::KeyStore::load(path, ledger)?));
    }
    let gateway = hotpot_gateway::Gateway::new(model.client, model.id, network, config).await;
    let missing = gateway.missing_blocks();
    if !missing.is_empty() {
        eprintln!(
            "warning: no node serves blocks {} yet; requests get 503 until they do",
            missing.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        );
    }
    let limits = gateway.config().http.clone();
    hotpot_gateway::serve(listener, hotpot_gateway::router(gateway), limits, shutdown_signal()).await?;
    Ok(())
}

pub fn gateway(args: &GatewayArgs) -> Result<()> {
    let device = Device::cpu(args.threads)?;
    let (model, path) = load_gateway_model(&args.model, &device, &args.latency)?;
    let audit = args.audit.config(&path, Some(device))?;
    let identity = args.identity.identity()?;
    let sinks = args.identity.record_sinks()?;
    let wallet = args.chain.wallet()?;
    runtime()?.block_on(async {
        let onchain = match (&args.chain.chain_rpc, args.chain.market, wallet) {
            (Some(rpc), Some(market), Some(wallet)) => {
                let config = hotpot_gateway::OnChainConfig {
                    rpc: rpc.clone(),
                    market,
                    wallet,
                    receipts: match &args.chain.chain_receipts {
                        Some(path) => path.clone(),
                        None => Store::from_env()?.gateway_chain_receipts_path(),
                    },
                    settle_every: args.settle.settle_every,
                    settle_after: args.settle.settle_after(),
                    min_stake: args.serving.min_stake,
                };
                Some(hotpot_gateway::OnChain::start(config).await?)
            }
            _ => None,
        };
        let network = join_as_client(&args.peers, args.p2p_listen.clone(), identity.key.clone()).await?;
        println!("gateway peer id: {}", network.peer_id());
        let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        println!("OpenAI API for {} ({}) at http://{addr}/v1", model.name, model.id);
        let _ = std::io::stdout().flush();
        serve_http(model, network.clone(), args.api_keys.as_deref(), args.max_body_mb, audit, sinks, &args.serving, onchain, listener).await?;
        eprintln!("shutting down");
        network.shutdown().await;
        Ok(())
    })
}

pub fn up(args: &UpArgs) -> Result<()> {
    // One pool of compute threads for every local node and the gateway:
    // a token's work moves along the chain, so they never need it at once.
    let device = Device::cpu(args.threads)?;
    let threads = device.threads();
    let (model, path) = load_gateway_model(&args.model, &device, &args.latency)?;
    let file = ModelFile::open(&path)?;
    let n_blocks = file.config().n_blocks;
    let spans =
        LayerSpan::split_even(n_blocks, args.nodes).with_context(|| format!("--nodes {} must be between 1 and the model's {n_blocks} blocks", args.nodes))?;
    let identity = args.identity.identity()?;
    let sinks = args.identity.record_sinks()?;
    let store = Store::from_env()?;
    let price = args.price.unwrap_or(if args.chain { hotpot_core::Credits::from_micros(1_000_000) } else { hotpot_core::Credits::ZERO });
    runtime()?.block_on(async {
        let up_chain = if args.chain { Some(UpChain::start(&store).await.context("starting the local chain")?) } else { None };
        if let Some(c) = &up_chain {
            println!(
                "chain: anvil at {} (chain {}), market {} (see: hotpot chain status --rpc {} --market {} --store {})",
                c.chain.rpc(),
                c.market.chain_id(),
                c.market.address(),
                c.chain.rpc(),
                c.market.address(),
                c.stores.join("gateway-chain-receipts.sqlite").display()
            );
        }
        let mut networks = Vec::new();
        let mut bootstrap: Option<Multiaddr> = None;
        println!("hotpot up: {} ({}) on {} local node(s) sharing {threads} compute thread(s)", model.name, model.id, spans.len());
        for (i, span) in spans.iter().enumerate() {
            let key = NodeKey::generate();
            let node_chain = match &up_chain {
                Some(c) => Some(c.node(&key).await?),
                None => None,
            };
            let network = Network::start(NetworkConfig {
                key,
                listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse()?],
                join: bootstrap.iter().cloned().collect(),
                dht_server: true,
                mdns: false,
                relay: Default::default(),
            })
            .await?;
            let addr = network.listen_addrs().await?.first().cloned().context("the node has no address")?;
            let config = NodeConfig {
                model_path: path.clone(),
                model_name: model.name.clone(),
                blocks: BlockChoice::Fixed(*span),
                device: Some(device.clone()),
                receipts: Some(store.receipts_path()),
                price_per_1k: price.micros(),
                chain: node_chain,
                ..NodeConfig::default()
            };
            let node = hotpot_node::start(config, network.clone()).await?;
            println!("  node {}  blocks {:<7} {:>7.1} tok/s  {addr}", i + 1, span.to_string(), node.throughput());
            bootstrap.get_or_insert(addr);
            networks.push((node, network));
        }
        let gateway_net = Network::start(NetworkConfig {
            key: identity.key.clone(),
            listen: vec![],
            join: bootstrap.iter().cloned().collect(),
            dht_server: false,
            mdns: false,
            relay: Default::default(),
        })
        .await?;
        let listener = tokio::net::TcpListener::bind((args.host, args.port)).await.with_context(|| format!("binding {}:{}", args.host, args.port))?;
        let addr = listener.local_addr()?;
        println!("OpenAI API at http://{addr}/v1 (gateway peer id {})", gateway_net.peer_id());
        println!("try:");
        println!(
            "  curl http://{addr}/v1/chat/completions -H 'Content-Type: application/json' \\\n    -d '{{\"model\": \"{}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}], \"stream\": true}}'",
            model.name
        );
        println!("Ctrl-C stops everything.");
        let _ = std::io::stdout().flush();
        let audit = args.audit.config(&path, Some(device.clone()))?;
        let onchain = match &up_chain {
            Some(c) => Some(
                hotpot_gateway::OnChain::start(hotpot_gateway::OnChainConfig {
                    rpc: c.chain.rpc().to_string(),
                    market: c.market.address(),
                    wallet: c.gateway.clone(),
                    receipts: c.stores.join("gateway-chain-receipts.sqlite"),
                    settle_every: args.settle.settle_every,
                    settle_after: args.settle.settle_after(),
                    min_stake: args.serving.min_stake,
                })
                .await?,
            ),
            None => None,
        };
        serve_http(model, gateway_net.clone(), args.api_keys.as_deref(), 4, audit, sinks, &args.serving, onchain, listener).await?;
        eprintln!("shutting down");
        gateway_net.shutdown().await;
        for (node, network) in networks.iter().rev() {
            node.shutdown(Duration::from_secs(2)).await;
            network.shutdown().await;
        }
        Ok(())
    })
}
