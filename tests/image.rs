//! The container image, built without Docker by `scripts/image.sh` from this build's
//! binary (the release image is built the same way from the release binary), then:
//! validated by real OCI tools (`skopeo inspect`, `umoci unpack`), not by our own
//! parser; unpacked; and started from its own root filesystem as uid 65532, the way a
//! runtime would start it from the runtime config `umoci` derived from the image.
//!
//! Needs root (`chroot`, and an unpack that keeps the layer's owners) and Debian's
//! `skopeo` and `umoci`: `scripts/test.sh` installs them and runs as root. The check of
//! `.dockerignore` (the Docker build's context) needs neither.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::free_port;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_keyward");
const NONROOT: u32 = 65532;

/// Starts a process inside a root filesystem the way an OCI runtime would (without
/// namespaces): chroot, the working directory, no supplementary groups, the gid, then
/// the uid, and exec with exactly the given environment. It execs, so the child's pid
/// is keyward's and a SIGTERM reaches keyward itself.
const LAUNCH: &str = r#"
import json, os, sys
rootfs, cwd, uid, gid, spec = sys.argv[1:6]
spec = json.loads(spec)
os.chroot(rootfs)
os.chdir(cwd)
os.setgroups([])
os.setgid(int(gid))
os.setuid(int(uid))
os.execve(spec["args"][0], spec["args"], dict(e.split("=", 1) for e in spec["env"]))
"#;

/// What `umoci unpack` made of the image config: the runtime's view of the process.
struct Process {
    args: Vec<String>,
    env: Vec<String>,
    cwd: String,
    uid: u64,
    gid: u64,
}

impl Process {
    fn from_bundle(bundle: &Path) -> Process {
        let spec: Value =
            serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
        let p = &spec["process"];
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect()
        };
        Process {
            args: strings(&p["args"]),
            env: strings(&p["env"]),
            cwd: p["cwd"].as_str().unwrap().to_string(),
            uid: p["user"]["uid"].as_u64().unwrap(),
            gid: p["user"]["gid"].as_u64().unwrap(),
        }
    }

    /// The command that runs `args` (or the image's own entrypoint and cmd when `None`)
    /// in `rootfs` with the image's environment plus `extra_env`.
    fn command(&self, rootfs: &Path, args: Option<&[&str]>, extra_env: &[(&str, &str)]) -> Command {
        let args: Vec<String> = match args {
            Some(args) => args.iter().map(|a| a.to_string()).collect(),
            None => self.args.clone(),
        };
        let mut env = self.env.clone();
        env.extend(extra_env.iter().map(|(k, v)| format!("{k}={v}")));
        let mut cmd = Command::new("python3");
        cmd.args(["-c", LAUNCH])
            .arg(rootfs)
            .args([&self.cwd, &self.uid.to_string(), &self.gid.to_string()])
            .arg(json!({"args": args, "env": env}).to_string());
        cmd
    }
}

/// A server started from the image; killed on drop if the test ends before it stops.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn tool(name: &str) {
    let found = Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{name} is missing: apt-get install {name} (scripts/test.sh does)"
    );
}

/// The status code of `GET path` on 127.0.0.1:port, or `None` while nothing answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    answer.split_whitespace().nth(1)?.parse().ok()
}

/// Every entry below `root`, recursively (not following symlinks).
fn walk(root: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        out.push(path.clone());
        if std::fs::symlink_metadata(&path).unwrap().is_dir() {
            walk(&path, out);
        }
    }
}

#[test]
fn the_image_is_valid_oci_and_runs_as_nonroot_from_its_own_root_filesystem() {
    let uid = run(Command::new("id").arg("-u")).stdout;
    assert_eq!(
        String::from_utf8_lossy(&uid).trim(),
        "0",
        "this test needs root (chroot, and an unpack that keeps owners); scripts/test.sh runs as root"
    );
    tool("skopeo");
    tool("umoci");
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("oci");
    let image = format!("oci:{}:test", layout.display());

    let build = || {
        let out = run(Command::new("scripts/image.sh")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["--binary", BIN, "--tag", "test", "--out"])
            .arg(&layout));
        // "<layout>:test sha256:<manifest digest> (layer … bytes)"
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        let digest = said
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        assert!(digest.starts_with("sha256:"), "{said}");
        digest
    };
    // Reproducible: the same binary gives the same image, digest for digest (the second
    // build also replaces the first layout in place).
    assert_eq!(build(), build());

    // The image config, as skopeo reads it.
    let config: Value = serde_json::from_slice(
        &run(Command::new("skopeo").args(["inspect", "--config", &image])).stdout,
    )
    .unwrap();
    let c = &config["config"];
    assert_eq!(c["User"], "65532:65532", "{config}");
    assert_eq!(c["Entrypoint"], json!(["/usr/local/bin/keyward"]));
    assert_eq!(c["Cmd"], json!(["serve"]));
    assert_eq!(c["WorkingDir"], "/data");
    assert_eq!(c["ExposedPorts"], json!({"8080/tcp": {}, "8081/tcp": {}}));
    assert!(
        c["Healthcheck"].is_null(),
        "probes are the orchestrator's: {config}"
    );
    assert_eq!(
        c["Labels"]["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(
        c["Labels"]["org.opencontainers.image.licenses"],
        "Apache-2.0"
    );
    assert!(c["Labels"]["org.opencontainers.image.source"]
        .as_str()
        .unwrap()
        .starts_with("https://"));
    // No listen address from the image: the binary's loopback default stands.
    let env = c["Env"].to_string();
    assert!(env.contains("PATH=") && !env.contains("KEYWARD_"), "{env}");

    // The manifest: an OCI one, one gzipped layer, the config it points at.
    let manifest: Value = serde_json::from_slice(
        &run(Command::new("skopeo").args(["inspect", "--raw", &image])).stdout,
    )
    .unwrap();
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        manifest["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 1);

    // umoci checks every blob's digest and size as it unpacks.
    let bundle = dir.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:test", layout.display()))
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    let process = Process::from_bundle(&bundle);
    assert_eq!((process.uid, process.gid), (65532, 65532));
    assert_eq!(process.args, ["/usr/local/bin/keyward", "serve"]);
    assert_eq!(process.cwd, "/data");

    // No shell, and nothing but /data (and /home/nonroot, and the sticky /tmp) that uid
    // 65532 may write: the root filesystem is read-only to keyward.
    for shell in [
        "bin/sh",
        "bin/bash",
        "bin/dash",
        "usr/bin/sh",
        "bin/busybox",
    ] {
        assert!(
            std::fs::symlink_metadata(rootfs.join(shell)).is_err(),
            "{shell} is in the image"
        );
    }
    let mut entries = Vec::new();
    walk(&rootfs, &mut entries);
    assert!(entries
        .iter()
        .any(|p| p.ends_with("etc/ssl/certs/ca-certificates.crt")));
    assert!(entries.iter().any(|p| p.ends_with("usr/local/bin/keyward")));
    for path in &entries {
        let rel = path.strip_prefix(&rootfs).unwrap();
        let meta = std::fs::symlink_metadata(path).unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        if rel == Path::new("data") || rel == Path::new("home/nonroot") {
            assert_eq!((meta.uid(), meta.gid()), (NONROOT, NONROOT), "{rel:?}");
        } else if rel == Path::new("tmp") {
            assert_eq!(mode, 0o1777);
        } else if !meta.file_type().is_symlink() {
            assert_eq!(meta.uid(), 0, "{rel:?} is not root's");
            assert_eq!(mode & 0o022, 0, "{rel:?} is writable by others: {mode:o}");
        }
    }

    // The binary starts from the image's root filesystem: only its own files and the
    // libraries the image carries.
    let version =
        run(&mut process.command(&rootfs, Some(&["/usr/local/bin/keyward", "--version"]), &[]));
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("keyward {}", env!("CARGO_PKG_VERSION"))
    );

    // `serve`, as uid 65532 in /data, on free loopback ports (in a container the
    // network namespace is its own; here the host's is shared).
    let data_port = free_port();
    let listen = format!("127.0.0.1:{data_port}");
    let admin_listen = format!("127.0.0.1:{}", free_port());
    let extra = [
        ("KEYWARD_LISTEN", listen.as_str()),
        ("KEYWARD_ADMIN_LISTEN", admin_listen.as_str()),
    ];
    let mut server = Running(
        process
            .command(&rootfs, None, &extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_status(data_port, "/healthz") != Some(200) {
        if let Some(status) = server.0.try_wait().unwrap() {
            let mut err = String::new();
            server
                .0
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("keyward exited with {status} before it was healthy: {err}");
        }
        assert!(
            Instant::now() < deadline,
            "/healthz did not answer 200 within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(http_status(data_port, "/readyz"), Some(200));

    // The chart's exec probe, run inside the image as Kubernetes runs it.
    run(&mut process.command(
        &rootfs,
        Some(&["/usr/local/bin/keyward", "probe", "/healthz"]),
        &extra,
    ));

    // The embedded shape's files went to the working directory, owned by 65532.
    for file in ["keyward.db", "keyward.db.key"] {
        let meta = std::fs::metadata(rootfs.join("data").join(file)).unwrap();
        assert_eq!(meta.uid(), NONROOT, "{file}");
    }

    let pid = server.0.id().to_string();
    run(Command::new("kill").args(["-TERM", &pid]));
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "keyward did not stop within 15 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "SIGTERM must be a clean exit: {status}");
}

/// Whether a `.dockerignore` pattern matches a path of the build context, as Docker
/// reads it: from the context's root, `*` within one path segment, `**` over any
/// number of segments, and a directory's exclusion covering everything under it.
fn ignored_by(pattern: &str, path: &str) -> bool {
    fn segment(pattern: &[u8], name: &[u8]) -> bool {
        match (pattern.first(), name.first()) {
            (None, None) => true,
            (Some(b'*'), _) => {
                segment(&pattern[1..], name) || (!name.is_empty() && segment(pattern, &name[1..]))
            }
            (Some(p), Some(n)) if p == n => segment(&pattern[1..], &name[1..]),
            _ => false,
        }
    }
    fn segments(pattern: &[&str], path: &[&str]) -> bool {
        match (pattern.first(), path.first()) {
            // A matched directory takes everything under it with it.
            (None, _) => true,
            (Some(&"**"), _) => {
                segments(&pattern[1..], path) || (!path.is_empty() && segments(pattern, &path[1..]))
            }
            (Some(p), Some(n)) => {
                segment(p.as_bytes(), n.as_bytes()) && segments(&pattern[1..], &path[1..])
            }
            (Some(_), None) => false,
        }
    }
    let pattern: Vec<&str> = pattern.trim_start_matches('/').split('/').collect();
    let path: Vec<&str> = path.split('/').collect();
    segments(&pattern, &path)
}

/// The Docker build context leaves out what is built or local, wherever it sits: the
/// SQLite file and its key file (also under a subdirectory, where a local run may have
/// put them), keys, certificates and `.env` files. Only the binary reaches the final
/// stage, but the build stage holds the whole context and can be exported (a `mode=max`
/// build cache, `--target build`).
#[test]
fn the_build_context_leaves_out_local_databases_keys_and_env_files() {
    let ignore =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.dockerignore")).unwrap();
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(
        patterns.iter().all(|p| !p.starts_with('!')),
        "an exception would need this test to read patterns in order: {patterns:?}"
    );
    let ignored = |path: &str| patterns.iter().any(|p| ignored_by(p, path));
    for path in [
        ".git/config",
        "target/release/keyward",
        "keyward.db",
        "keyward.db-wal",
        "keyward.db.key",
        "data/keyward.db",
        "data/keyward.db.key",
        "examples/local/keyward.db-shm",
        ".env",
        "deploy/.env",
        ".env.production",
        "deploy/.env.production",
        "redis-client.key",
        "certs/server.key",
        "certs/db-ca.pem",
    ] {
        assert!(ignored(path), "{path} would be sent to the Docker build");
    }
    for path in [
        "Cargo.toml",
        "Cargo.lock",
        "src/main.rs",
        "src/tls.rs",
        "lua/admit.lua",
        "migrations/postgres/0001_init.sql",
        "examples/envoy/envoy.yaml",
        "benches/admit.rs",
    ] {
        assert!(!ignored(path), "{path} is needed by the build");
    }
}
