//! The device a benchmark runs on: a loop device (`losetup --direct-io=on`)
//! over a file in a temp folder, detached and deleted when dropped; or a
//! plain file when not root; or a device the operator names.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct BenchDevice {
    pub path: PathBuf,
    /// What it is, for the report.
    pub description: String,
    loop_dev: Option<PathBuf>,
    _dir: Option<tempfile::TempDir>,
}

fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

impl BenchDevice {
    /// Use `path` as it is (a block device or an existing file).
    pub fn given(path: &Path) -> Result<BenchDevice> {
        let meta = std::fs::metadata(path)
            .with_context(|| format!("cannot stat --device {}", path.display()))?;
        let kind = if std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
            "block device"
        } else {
            "file"
        };
        Ok(BenchDevice {
            path: path.to_path_buf(),
            description: format!("{kind} {}", path.display()),
            loop_dev: None,
            _dir: None,
        })
    }

    /// A fresh `size_bytes` file under `parent` (default: the system temp
    /// dir), behind a loop device when we are root and losetup works.
    pub fn temporary(size_bytes: u64, parent: Option<&Path>) -> Result<BenchDevice> {
        let dir = match parent {
            Some(p) => tempfile::tempdir_in(p),
            None => tempfile::tempdir(),
        }
        .context("cannot create a temp folder for the bench device")?;
        let file = dir.path().join("bench.img");
        let f = std::fs::File::create(&file)
            .with_context(|| format!("cannot create {}", file.display()))?;
        f.set_len(size_bytes)
            .with_context(|| format!("cannot size {}", file.display()))?;
        drop(f);
        if !is_root() {
            eprintln!(
                "note: not root, so no loop device: benchmarking a plain file {}",
                file.display()
            );
            return Ok(BenchDevice {
                description: format!("plain file {} (not root: no loop device)", file.display()),
                path: file,
                loop_dev: None,
                _dir: Some(dir),
            });
        }
        let out = Command::new("losetup")
            .args(["--direct-io=on", "-f", "--show"])
            .arg(&file)
            .output()
            .context("cannot run losetup")?;
        if !out.status.success() {
            bail!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Ok(BenchDevice {
            description: format!(
                "loop device {} (direct-io) on {}",
                dev.display(),
                file.display()
            ),
            path: dev.clone(),
            loop_dev: Some(dev),
            _dir: Some(dir),
        })
    }
}

impl Drop for BenchDevice {
    fn drop(&mut self) {
        if let Some(dev) = &self.loop_dev {
            let ok = Command::new("losetup")
                .arg("-d")
                .arg(dev)
                .status()
                .map(|s| s.success());
            if !matches!(ok, Ok(true)) {
                eprintln!(
                    "warning: could not detach {}; run `losetup -d {}`",
                    dev.display(),
                    dev.display()
                );
            }
        }
    }
}
