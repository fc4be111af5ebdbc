//! Writing a file so that readers only ever see the old contents or the new ones, however
//! many saves to the same path run at once and wherever one of them is killed.
//!
//! Each save writes its own temporary file beside the target, `.<name>.<pid>.<n>.tmp`
//! (created exclusively: no two saves, in this process or another, share one), syncs it,
//! renames it over the target (atomic within a directory) and syncs the directory, so the
//! rename survives a power cut too. A save killed before its rename leaves only its own
//! temporary file; the next save to that path removes those of processes that are gone.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Replaces `path` with `bytes` atomically.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let (temporary, mut file) = create_temporary(path)?;
    let written = (|| {
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&temporary, path)?;
        sync_directory(path)
    })();
    if written.is_err() {
        // Best effort: the file at `path` is untouched either way.
        let _ = std::fs::remove_file(&temporary);
    }
    remove_stale_temporaries(path);
    written
}

/// The prefix of every temporary file of saves to `path`: `.<name>.`.
fn temporary_prefix(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    format!(".{}.", name.unwrap_or_default())
}

fn create_temporary(path: &Path) -> io::Result<(PathBuf, File)> {
    static SAVES: AtomicU64 = AtomicU64::new(0);
    let prefix = temporary_prefix(path);
    loop {
        let save = SAVES.fetch_add(1, Ordering::Relaxed);
        let temporary = path.with_file_name(format!("{prefix}{}.{save}.tmp", std::process::id()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temporary)
        {
            Ok(file) => return Ok((temporary, file)),
            // Left by a process that had this pid before: try the next number.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Makes the rename durable: on Unix a directory's entries are synced through the directory.
fn sync_directory(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Removes the temporary files of saves to `path` whose process is gone (known where
/// `/proc` lists processes; elsewhere they stay, harmless beside the target).
fn remove_stale_temporaries(path: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let prefix = temporary_prefix(path);
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".tmp"))
            .and_then(|rest| rest.split('.').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
