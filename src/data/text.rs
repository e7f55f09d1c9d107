//! Reading data files and writing converted ones.
//!
//! Text is handled as bytes throughout: the models are byte-level, so a non-UTF-8 file is as
//! good a corpus as any, and decoding would only add a failure mode.

use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Reads a whole data file, refusing what cannot be a corpus.
///
/// Each error is one line starting with the path, since it is shown to the user as is.
pub fn read_nonempty(path: &Path) -> Result<Vec<u8>> {
    let shown = path.display();
    let meta = fs::metadata(path).map_err(|e| io_error(path, &e))?;
    if meta.is_dir() {
        crate::bail!("{shown}: is a directory, expected a data file");
    }
    let bytes = fs::read(path).map_err(|e| io_error(path, &e))?;
    if bytes.is_empty() {
        crate::bail!("{shown}: file is empty");
    }
    Ok(bytes)
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
/// and `out` is untouched.
pub fn write_atomic<T>(out: &Path, fill: impl FnOnce(&mut BufWriter<File>) -> Result<T>) -> Result<T> {
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
