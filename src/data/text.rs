//! Reading data files and writing converted ones.
//!
//! Text is handled as bytes throughout: the models are byte-level, so a non-UTF-8 file is as
//! good a corpus as any, and decoding would only add a failure mode.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The largest data file read into memory: 4 GiB (and never more than `MemAvailable`, see
/// [`data_file_limit`]). The corpus is held whole, so a larger one needs another design.
pub const MAX_DATA_BYTES: u64 = 4 << 30;

/// The cap on a data file here and now: [`MAX_DATA_BYTES`], lowered to the memory the kernel
/// reports available (`MemAvailable` in `/proc/meminfo`, where there is one).
pub fn data_file_limit() -> u64 {
    mem_available().map_or(MAX_DATA_BYTES, |m| m.min(MAX_DATA_BYTES))
}

/// `MemAvailable` in bytes, `None` where `/proc/meminfo` does not say.
pub fn mem_available() -> Option<u64> {
    let info = fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Reads a whole data file, refusing what cannot be a corpus: anything but a regular file
/// (a FIFO would block, `/dev/zero` never ends), an empty file, one over [`data_file_limit`].
///
/// Each error is one line starting with the path, since it is shown to the user as is.
pub fn read_nonempty(path: &Path) -> Result<Vec<u8>> {
    let bytes = read_regular_file(path, data_file_limit(), "data file")?;
    if bytes.is_empty() {
        crate::bail!("{}: file is empty", path.display());
    }
    Ok(bytes)
}

/// Reads `path` whole if it is a regular file of at most `max` bytes. The type and size are
/// checked with `stat` before the file is opened (opening a FIFO with no writer blocks
/// forever), again on the opened file, and the read itself stops after `max + 1` bytes, so a
/// file that grows meanwhile is refused too. `what` names the file's role in messages.
pub fn read_regular_file(path: &Path, max: u64, what: &str) -> Result<Vec<u8>> {
    let shown = path.display();
    check_regular_file(path, &fs::metadata(path).map_err(|e| io_error(path, &e))?, max, what)?;
    let file = File::open(path).map_err(|e| io_error(path, &e))?;
    let meta = file.metadata().map_err(|e| io_error(path, &e))?;
    check_regular_file(path, &meta, max, what)?;
    // The capacity is the checked length: at most `max`.
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max.saturating_add(1)).read_to_end(&mut bytes).map_err(|e| io_error(path, &e))?;
    if bytes.len() as u64 > max {
        crate::bail!("{shown}: grew past the {max} bytes allowed for a {what} while being read");
    }
    Ok(bytes)
}

/// Refuses what `meta` describes unless it is a regular file of at most `max` bytes (check it
/// before opening `path`: opening a FIFO with no writer blocks forever).
pub(crate) fn check_regular_file(path: &Path, meta: &fs::Metadata, max: u64, what: &str) -> Result<()> {
    let shown = path.display();
    if meta.is_dir() {
        crate::bail!("{shown}: is a directory, expected a {what}");
    }
    if !meta.is_file() {
        crate::bail!("{shown}: not a regular file (a FIFO, device or socket cannot be read as a {what})");
    }
    if meta.len() > max {
        crate::bail!("{shown}: {} bytes, more than the {max} bytes allowed for a {what}", meta.len());
    }
    Ok(())
}

/// One-line message for an I/O failure on `path`, in words rather than `os error 2`.
pub(crate) fn io_error(path: &Path, e: &io::Error) -> Error {
    let shown = path.display();
    match e.kind() {
        io::ErrorKind::NotFound => crate::err!("{shown}: no such file"),
        io::ErrorKind::PermissionDenied => crate::err!("{shown}: permission denied"),
        _ => crate::err!("{shown}: {e}"),
    }
}

/// Writes `out` through `fill` so that readers see either the old file or the complete new one:
/// the bytes go to a temporary file in the same directory (same filesystem, so the rename is
/// atomic), which is fsynced and then renamed over `out`. On error the temporary file is removed
/// and `out` is untouched. Temporary files of `out` that killed writers left are removed first
/// ([`remove_stale_temps`]).
pub fn write_atomic<T>(out: &Path, fill: impl FnOnce(&mut BufWriter<File>) -> Result<T>) -> Result<T> {
    remove_stale_temps(out);
    let tmp = temp_path(out);
    let result = (|| {
        let file = File::create(&tmp).map_err(|e| io_error(&tmp, &e))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let value = fill(&mut w)?;
        let file = w.into_inner().map_err(|e| io_error(&tmp, e.error()))?;
        file.sync_all().map_err(|e| io_error(&tmp, &e))?;
        drop(file);
        fs::rename(&tmp, out).map_err(|e| io_error(out, &e))?;
        Ok(value)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    sync_parent_dir(out);
    result
}

/// `OUT.<pid>.tmp` next to `OUT`; the pid keeps two concurrent writers apart.
fn temp_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "out".into());
    name.push(format!(".{}.tmp", std::process::id()));
    out.with_file_name(name)
}

/// Removes `OUT.<pid>.tmp` files next to `out` whose process is gone (a `prep` killed while
/// writing leaves one). Only where `/proc` tells whether a process lives; a live writer's file
/// and any other name are left alone.
pub fn remove_stale_temps(out: &Path) {
    let (Some(name), true) = (out.file_name().and_then(|n| n.to_str()), Path::new("/proc/self").exists()) else {
        return;
    };
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let Ok(entries) = fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(name)?.strip_prefix('.')?.strip_suffix(".tmp")?.parse::<u32>().ok())
        else {
            continue;
        };
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file && pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Makes the rename itself durable. Best effort: some filesystems refuse to open directories.
fn sync_parent_dir(out: &Path) {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(dir) = File::open(parent) {
        let _ = dir.sync_all();
    }
}
