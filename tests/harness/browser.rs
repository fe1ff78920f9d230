//! What the browser tests need: Debian's Chromium (installed with apt when missing, as CI's
//! machine allows) and `playwright-core` from `tests/browser/package-lock.json` (installed with
//! `npm ci` into the target directory, once per lock, shared by the tests of one build).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

/// Chromium and the `node_modules` the browser scripts run with.
pub struct BrowserTools {
    pub chromium: PathBuf,
    pub node_modules: PathBuf,
}

const CHROMIUM: &str = "/usr/bin/chromium";

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let install = |update: bool| -> anyhow::Result<bool> {
        if update {
            Command::new("apt-get").args(["update", "-qq"]).status()?;
        }
        Ok(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()?
            .success())
    };
    if install(false)? || install(true)? {
        Ok(())
    } else {
        bail!("apt-get install {} failed", packages.join(" "))
    }
}

/// Chromium, Node.js and `playwright-core`, installed when missing (blocking: call it from
/// `spawn_blocking`).
pub fn browser_tools() -> anyhow::Result<BrowserTools> {
    if !std::path::Path::new(CHROMIUM).exists() {
        apt_install(&["chromium", "chromium-driver"]).context("installing Debian's Chromium")?;
    }
    if Command::new("node").arg("--version").output().is_err() {
        apt_install(&["nodejs", "npm"]).context("installing Node.js")?;
    }
    let target = crate::keypool_bin()
        .parent()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .context("no target dir")?;
    let dir = target.join("browser-node");
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/browser");
    let lock = std::fs::read_to_string(format!("{source}/package-lock.json"))?;
    let stamp = dir.join("installed-lock.json");
    let ready = || std::fs::read_to_string(&stamp).is_ok_and(|s| s == lock);
    let guard = target.join("browser-node.lock");
    let started = std::time::Instant::now();
    loop {
        if ready() {
            return Ok(BrowserTools {
                chromium: PathBuf::from(CHROMIUM),
                node_modules: dir.join("node_modules"),
            });
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&guard)
        {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if started.elapsed() > Duration::from_secs(600) {
                    let _ = std::fs::remove_file(&guard);
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let installed = npm_ci(&dir, source, &lock);
    let _ = std::fs::remove_file(&guard);
    installed?;
    Ok(BrowserTools {
        chromium: PathBuf::from(CHROMIUM),
        node_modules: dir.join("node_modules"),
    })
}

fn npm_ci(dir: &std::path::Path, source: &str, lock: &str) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    for f in ["package.json", "package-lock.json"] {
        std::fs::copy(format!("{source}/{f}"), dir.join(f))?;
    }
    let ok = Command::new("npm")
        .args([
            "ci",
            "--ignore-scripts",
            "--no-audit",
            "--no-fund",
            "--quiet",
        ])
        .current_dir(dir)
        .status()?
        .success();
    if !ok {
        bail!("npm ci in {} failed", dir.display());
    }
    std::fs::write(dir.join("installed-lock.json"), lock)?;
    Ok(())
}
