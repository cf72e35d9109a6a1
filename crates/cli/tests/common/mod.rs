//! Helpers that run real `hotpot` processes for the end-to-end tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub const HOTPOT: &str = env!("CARGO_BIN_EXE_hotpot");

/// Swarm tests start several processes each; on a 2-core machine they run
/// one at a time so timing-sensitive steps (failover) stay predictable.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running `hotpot node`, killed when dropped.
pub struct NodeProc {
    pub child: Child,
    pub peer_id: String,
    pub addr: String,
    pub span: String,
    lines: mpsc::Receiver<String>,
}

impl NodeProc {
    /// Starts a node on 127.0.0.1 and waits until it serves.
    pub fn start(blocks: &str, join: Option<&str>, extra: &[&str]) -> NodeProc {
        Self::start_with_env(blocks, join, extra, &[])
    }

    /// [`NodeProc::start`] with extra environment variables.
    pub fn start_with_env(blocks: &str, join: Option<&str>, extra: &[&str], env: &[(&str, &str)]) -> NodeProc {
        Self::start_model("smollm2-135m", blocks, join, extra, env)
    }

    /// A node of another catalogue model.
    pub fn start_model(model: &str, blocks: &str, join: Option<&str>, extra: &[&str], env: &[(&str, &str)]) -> NodeProc {
        let mut cmd = Command::new(HOTPOT);
        cmd.envs(env.iter().copied());
        cmd.args(["node", "--model", model, "--blocks", blocks, "--listen", "/ip4/127.0.0.1/udp/0/quic-v1"]);
        if !extra.contains(&"-t") {
            cmd.args(["-t", "1"]);
        }
        if let Some(join) = join {
            cmd.args(["--join", join]);
        }
        cmd.args(extra).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("hotpot node starts");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        // Drain stderr so the node never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = BufReader::new(stderr).read_to_end(&mut sink);
        });
        let mut node = NodeProc { child, peer_id: String::new(), addr: String::new(), span: String::new(), lines };
        let deadline = Instant::now() + Duration::from_secs(180);
        while node.span.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = node.lines.recv_timeout(left).unwrap_or_else(|_| panic!("node {blocks} did not start in time"));
            if let Some(id) = line.strip_prefix("peer id: ") {
                node.peer_id = id.to_string();
            } else if let Some(addr) = line.strip_prefix("listening on ") {
                if node.addr.is_empty() {
                    node.addr = addr.to_string();
                }
            } else if let Some(rest) = line.strip_prefix("serving blocks ") {
                node.span = rest.split_whitespace().next().unwrap_or_default().to_string();
            }
        }
        node
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the node process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM (a graceful stop); the process is reaped later.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
    }

    /// Waits up to `limit` for the process to exit; its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `hotpot` with `args` to completion, killing it after `limit`.
pub fn hotpot(args: &[&str], limit: Duration) -> Output {
    output_within(Command::new(HOTPOT).args(args), limit)
}

/// Runs `cmd` to completion with its output captured; kills it and fails
/// the test if it runs past `limit`.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("the command starts");
    // Read both pipes while waiting, so that a large output never blocks the child.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("waits") {
            return Output { status, stdout: stdout.join().unwrap_or_default(), stderr: stderr.join().unwrap_or_default() };
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} ran past {limit:?}; stderr: {}", String::from_utf8_lossy(&stderr.join().unwrap_or_default()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Waits until the gateway at `base_url` (with or without `/v1`) has heard
/// of a node for every block (`/health` says "ok"), for up to `limit`. A
/// gateway restarted with the same key may need a few heartbeats: nodes
/// drop the dead process's connections when the new one connects.
#[allow(dead_code)]
pub fn wait_until_covered(base_url: &str, limit: Duration) {
    let url = format!("{}/health", base_url.trim_end_matches("/v1"));
    let deadline = Instant::now() + limit;
    loop {
        let out = Command::new("curl").args(["-s", &url]).output().expect("curl runs");
        let health: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if health["status"] == "ok" {
            return;
        }
        assert!(Instant::now() < deadline, "the gateway at {base_url} never heard of every block within {limit:?}: {health}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A counter or gauge from a gateway's `/metrics` (`base_url` with or
/// without `/v1`), summed over the series of `name` whose labels contain
/// `label` (0 when absent).
#[allow(dead_code)]
pub fn metric(base_url: &str, name: &str, label: &str) -> f64 {
    let url = format!("{}/metrics", base_url.trim_end_matches("/v1"));
    let out = Command::new("curl").args(["-s", &url]).output().expect("curl runs");
    text(&out.stdout)
        .lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The local, single-process greedy output for `prompt`.
pub fn local_greedy(prompt: &str, tokens: usize) -> String {
    let n = tokens.to_string();
    let out = hotpot(&["run", "smollm2-135m", prompt, "--temperature", "0", "-n", &n, "-q"], Duration::from_secs(120));
    assert!(out.status.success(), "local run failed: {}", text(&out.stderr));
    text(&out.stdout)
}

/// The SmolLM2 file `hotpot pull smollm2-135m` placed in the store.
#[allow(dead_code)]
pub fn model_path() -> std::path::PathBuf {
    let out = hotpot(&["pull", "smollm2-135m"], Duration::from_secs(300));
    assert!(out.status.success(), "pull failed: {}", text(&out.stderr));
    std::path::PathBuf::from(text(&out.stdout).trim().split('\t').nth(2).expect("pull prints NAME\tID\tPATH"))
}

/// A running `hotpot gateway` or `hotpot up`, killed when dropped.
pub struct Served {
    pub child: Child,
    pub base_url: String,
    pub stdout: Vec<String>,
    /// Where the process's stderr goes (its warnings, for failure messages).
    pub log: std::path::PathBuf,
}

impl Served {
    /// The warnings the process logged so far.
    pub fn warnings(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Starts `hotpot ARGS` and waits for the line announcing the API's URL.
pub fn serve(args: &[&str]) -> Served {
    static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = std::env::temp_dir().join(format!("hotpot-served-{}-{n}.log", std::process::id()));
    let stderr = std::fs::File::create(&log).expect("creates the log");
    let child = Command::new(HOTPOT).args(args).stdout(Stdio::piped()).stderr(stderr).spawn().expect("starts");
    // Owned by `Served` at once, so that a failure below still kills it.
    let mut served = Served { child, base_url: String::new(), stdout: Vec::new(), log };
    let stdout = served.child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            panic!("no API URL from {args:?}: {:?}", served.stdout);
        };
        served.stdout.push(line.clone());
        if line.contains("OpenAI API")
            && let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://"))
        {
            // `hotpot up` prints a few more lines (the curl example).
            std::thread::sleep(Duration::from_millis(200));
            served.stdout.extend(rx.try_iter());
            served.base_url = url.to_string();
            return served;
        }
    }
}

/// Runs `tests/SCRIPT` with python3 (killed after 400 s).
pub fn python(script: &str, args: &[&str]) -> std::process::Output {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(script);
    let mut child = Command::new("python3").arg(path).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("python3 runs");
    let started = Instant::now();
    loop {
        if child.try_wait().expect("waits").is_some() {
            return child.wait_with_output().expect("output");
        }
        if started.elapsed() > Duration::from_secs(400) {
            let _ = child.kill();
            panic!("{script} ran too long");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
