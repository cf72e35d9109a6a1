//! Files that are either whole or absent: written to a temporary file
//! beside the target, flushed to disk, then renamed over it (and the
//! directory flushed), so a crash at any point leaves the old file or the
//! new one, never half of one.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically (see the module docs), creating
/// the parent directory if needed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file"))?;
    let tmp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself is durable once the directory is flushed.
        std::fs::File::open(dir).and_then(|d| d.sync_all()).or(Ok::<(), std::io::Error>(()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_and_leaves_no_temporaries() {
        let dir = std::env::temp_dir().join(format!("hotpot-fsutil-{}", std::process::id()));
        let path = dir.join("sub").join("a.json");
        write_atomic(&path, b"first").expect("writes");
        write_atomic(&path, b"second").expect("replaces");
        assert_eq!(std::fs::read(&path).expect("reads"), b"second");
        let names: Vec<_> = std::fs::read_dir(path.parent().expect("dir")).expect("lists").flatten().map(|e| e.file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        std::fs::remove_dir_all(&dir).expect("cleans up");
    }
}
