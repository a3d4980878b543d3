//! Reading one setting's text by its declaration: the default, the range and the kind
//! come from the [`Setting`], and every bad value becomes one [`ConfigError`] naming the
//! variable (never echoing a value that may be a secret).

use std::net::SocketAddr;
use std::time::Duration;

use super::setting::{name_charset, plain, Exposure, Fallback, Kind, Setting};
use super::{ConfigError, RawConfig, MIN_TOKEN_LEN};
use crate::db::Backend;

pub(super) struct Parser<'a> {
    pub raw: &'a RawConfig,
    pub errors: Vec<ConfigError>,
}

impl<'a> Parser<'a> {
    pub fn new(raw: &'a RawConfig, errors: Vec<ConfigError>) -> Self {
        Parser { raw, errors }
    }

    /// The trimmed value, or `None` when unset or empty.
    pub fn get(&self, var: &'static str) -> Option<&'a str> {
        self.raw
            .get(var)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    /// The given text, else the declared default's.
    pub fn text(&self, s: &Setting) -> Option<&'a str> {
        self.get(s.var).or(match s.default {
            Fallback::Value(text) => Some(text),
            Fallback::Unset | Fallback::Instead(_) => None,
        })
    }

    pub fn fail(&mut self, var: &'static str, reason: impl Into<String>) {
        self.errors.push(ConfigError {
            var,
            reason: reason.into(),
        });
    }

    /// A reader that does not match the declared kind is a mistake in this crate, not in
    /// the input; it is still one line naming the variable rather than a panic (and the
    /// unit tests read every setting, so it never ships).
    fn wrong_kind(&mut self, s: &Setting, reader: &str) {
        self.fail(
            s.var,
            format!("declared as {:?} but read as {reader}", s.kind),
        );
    }

    /// The text of every `…_FILE` twin's file, under the setting's own name (a file's
    /// content without its trailing newline is the value). Setting both a variable and
    /// its twin is an error; so is a file that cannot be read (its path is named, never
    /// its content).
    pub fn read_files(&mut self, settings: &[Setting]) -> RawConfig {
        let mut resolved = self.raw.clone();
        for s in settings {
            let Some(file_var) = s.file_twin() else {
                continue;
            };
            let var = s.var;
            let Some(path) = self.get(file_var).map(str::to_string) else {
                continue;
            };
            resolved.remove(file_var);
            if self.get(var).is_some() {
                self.fail(
                    var,
                    format!("both {var} and {file_var} are set; set only one"),
                );
                continue;
            }
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let text = text.strip_suffix('\n').unwrap_or(&text);
                    let text = text.strip_suffix('\r').unwrap_or(text);
                    resolved.insert(var, text.to_string());
                }
                Err(e) => self.fail(file_var, format!("cannot read `{path}`: {e}")),
            }
        }
        resolved
    }

    pub fn addr(&mut self, s: &Setting) -> SocketAddr {
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        if s.kind != Kind::Addr {
            self.wrong_kind(s, "an address");
            return unspecified;
        }
        let text = self.text(s).unwrap_or_default();
        text.parse().unwrap_or_else(|_| {
            self.fail(
                s.var,
                format!("`{text}` is not a socket address like 127.0.0.1:8080"),
            );
            unspecified
        })
    }

    /// A bearer token: at least [`MIN_TOKEN_LEN`] printable characters without spaces.
    pub fn token(&mut self, s: &Setting) -> Option<String> {
        if s.kind != Kind::Token {
            self.wrong_kind(s, "a token");
        }
        let token = self.text(s).map(str::to_string)?;
        if token.chars().count() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
            self.fail(
                s.var,
                format!("must be at least {MIN_TOKEN_LEN} printable characters without spaces (e.g. `openssl rand -hex 24`)"),
            );
        }
        Some(token)
    }

    pub fn whole(&mut self, s: &Setting) -> u64 {
        let Kind::Whole { min, max, unit } = s.kind else {
            self.wrong_kind(s, "a whole number");
            return 0;
        };
        let Some(text) = self.text(s) else {
            return 0;
        };
        match text.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => n,
            _ => {
                self.fail(
                    s.var,
                    format!("`{text}` is not a whole number of {unit} from {min} to {max}"),
                );
                min
            }
        }
    }

    /// [`Self::whole`] for a setting in seconds.
    pub fn seconds(&mut self, s: &Setting) -> Duration {
        Duration::from_secs(self.whole(s))
    }

    pub fn boolean(&mut self, s: &Setting) -> bool {
        if s.kind != Kind::Bool {
            self.wrong_kind(s, "true or false");
            return false;
        }
        let Some(text) = self.text(s).map(str::to_ascii_lowercase) else {
            return false;
        };
        match text.as_str() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" => false,
            _ => {
                self.fail(s.var, format!("`{text}` is not true or false"));
                false
            }
        }
    }

    /// The value among `values` at the position of the declared word that was given (or
    /// of the default).
    pub fn choice<T: Copy, const N: usize>(&mut self, s: &Setting, values: [T; N]) -> T {
        let first = values[0];
        let Kind::Choice(names) = s.kind else {
            self.wrong_kind(s, "a choice");
            return first;
        };
        if names.len() != N {
            self.wrong_kind(s, &format!("a choice of {N}"));
            return first;
        }
        let Some(text) = self.text(s).map(str::to_ascii_lowercase) else {
            return first;
        };
        match names.iter().position(|name| *name == text) {
            Some(i) => values[i],
            None => {
                self.fail(
                    s.var,
                    format!("`{text}` is not one of {}", names.join(", ")),
                );
                first
            }
        }
    }

    /// A prefix or tag: at most `max` characters of A-Z, a-z, 0-9 and `punct`.
    pub fn name(&mut self, s: &Setting) -> String {
        let Kind::Name { max, punct } = s.kind else {
            self.wrong_kind(s, "a name");
            return String::new();
        };
        let name = self.text(s).unwrap_or_default().to_string();
        if name.len() > max
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || punct.as_bytes().contains(&b))
        {
            self.fail(
                s.var,
                format!("must be at most {max} {}", plain(&name_charset(punct))),
            );
        }
        name
    }

    /// A [`Kind::File`] setting: its path and the file's text, read now so that a file
    /// that cannot be read stops start-up naming the variable and the path.
    pub fn file(&mut self, s: &Setting) -> Option<(String, String)> {
        if s.kind != Kind::File {
            self.wrong_kind(s, "a file");
            return None;
        }
        let path = self.text(s)?.to_string();
        match std::fs::read_to_string(&path) {
            Ok(text) => Some((path, text)),
            Err(e) => {
                self.fail(s.var, format!("cannot read `{path}`: {e}"));
                None
            }
        }
    }

    /// Text read as is (a URL, a key, JSON), for readers that check it themselves.
    pub fn raw_text(&mut self, s: &Setting) -> Option<String> {
        if matches!(s.kind, Kind::Whole { .. } | Kind::Bool | Kind::Choice(_)) {
            self.wrong_kind(s, "text");
        }
        self.text(s).map(str::to_string)
    }

    /// The setting as `Debug` may show it: the value given, else the default; a given
    /// secret or URL only as `<set>` (a declared default is never a secret).
    pub fn shown(&self, s: &Setting) -> Option<String> {
        match (s.exposure, self.get(s.var)) {
            (Exposure::Flag, Some(text)) => Some(text.to_string()),
            (Exposure::Url | Exposure::Secret, Some(_)) => Some("<set>".to_string()),
            (_, None) => self.text(s).map(str::to_string),
        }
    }
}

/// Whether a database or Redis URL carries a password (in its user info, or as a
/// `password=` query parameter, which libpq accepts).
pub fn url_has_password(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = before_query.split('/').next().unwrap_or_default();
    let in_user_info = authority
        .rsplit_once('@')
        .is_some_and(|(user_info, _)| user_info.contains(':'));
    in_user_info
        || query
            .split('&')
            .any(|pair| pair.to_ascii_lowercase().starts_with("password="))
}

/// Whether each node of a Redis URL has a host and a port that can be used (`redis`
/// parses the URL without connecting: a port like 99999 is refused here, not at the
/// first request).
pub fn redis_url_is_usable(target: &crate::limits::conn::Target) -> bool {
    target
        .node_urls()
        .iter()
        .all(|node| redis::Client::open(node.as_str()).is_ok())
}

/// The database URL (the declared default when unset) and its backend.
pub fn database(p: &mut Parser) -> (String, Backend) {
    let url = p
        .raw_text(&super::declared::DATABASE_URL)
        .unwrap_or_default();
    let backend = Backend::of_url(&url).unwrap_or_else(|| {
        // The URL may hold a password: do not echo it.
        p.fail(
            super::DATABASE_URL,
            "must start with postgres://, postgresql:// or sqlite:",
        );
        Backend::Sqlite
    });
    // The driver's own error for a missing CA file names neither the parameter nor the
    // file; check it here, where the error can say both (a path is no secret).
    if backend == Backend::Postgres {
        if let Some(path) = postgres_root_cert(&url) {
            if let Err(e) = std::fs::metadata(&path).and_then(|_| std::fs::File::open(&path)) {
                p.fail(
                    super::DATABASE_URL,
                    format!("sslrootcert `{path}` cannot be read: {e}"),
                );
            }
        }
    }
    (url, backend)
}

/// The `sslrootcert` parameter of a Postgres URL, percent-decoded.
fn postgres_root_cert(url: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .ok()?
        .into_iter()
        .find_map(|(k, v)| (k == "sslrootcert").then_some(v))
}
