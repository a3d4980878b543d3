//! What a setting is: the declaration type behind [`SETTINGS`](super::SETTINGS), and what
//! is rendered from it for people — the `serve --help` text and the README's
//! Configuration table.
//!
//! A declaration carries everything that used to be written out by hand beside the
//! parser (the flag, the default, the accepted values, whether it is a secret, the
//! help), so the parser ([`super::Parser`]), the command line ([`crate::cli`]), the
//! redacted `Debug` of [`super::Config`] and the README cannot disagree: tests/cli.rs
//! holds the README table and `--help` against these renderings.

/// How a setting may be given, and whether its value may be shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposure {
    /// A `serve` flag and an environment variable (the flag wins); shown in `Debug`.
    Flag,
    /// A URL that may hold a password: a flag only while it holds none (the command line
    /// is public), else the environment or the `…_FILE` twin; never shown.
    Url,
    /// Environment or `…_FILE` twin only. Its flag exists only to be refused with one
    /// line naming the variable (rather than clap's "unexpected argument"); never shown.
    Secret,
}

/// The value a setting has when it is not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// This text, parsed like a given value (tests/cli.rs checks every one parses).
    Value(&'static str),
    /// Nothing: the feature the setting turns on is off.
    Unset,
    /// Unset, and what keyward does instead (shown as the default).
    Instead(&'static str),
}

/// What text a setting accepts: the parser reads the setting by its kind, and the help
/// and README show the range from the same place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A socket address, `IP:port` (a host name is refused: nothing to resolve at bind).
    Addr,
    /// A bearer token of at least [`super::MIN_TOKEN_LEN`] printable characters.
    Token,
    /// A database URL (Postgres or SQLite).
    DatabaseUrl,
    /// A Redis or Redis Cluster URL.
    RedisUrl,
    /// An encryption key: base64 of 32 bytes.
    Key,
    /// Comma-separated encryption keys.
    Keys,
    /// One of these words (case does not matter).
    Choice(&'static [&'static str]),
    /// At most `max` characters of A-Z, a-z, 0-9 and the characters of `punct`.
    Name { max: usize, punct: &'static str },
    /// A whole number from `min` to `max`.
    Whole {
        min: u64,
        max: u64,
        unit: &'static str,
    },
    /// `true` or `false` (also `1`/`0`, `yes`/`no`).
    Bool,
    /// The path of a file keyward reads at start-up.
    File,
    /// A price as JSON, the body of `PUT /admin/prices`.
    Price,
    /// An `http://` or `https://` URL.
    HttpUrl,
}

/// One setting, declared once in [`SETTINGS`](super::SETTINGS) through `settings!`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// The environment variable, `KEYWARD_…`.
    pub var: &'static str,
    /// The long flag without its dashes: the variable without `KEYWARD_`, in lower case
    /// with `-` for `_` (a unit test holds every entry to that rule).
    pub flag: &'static str,
    /// `var` + `_FILE`: the variable naming a file that holds the value. Only [`Url`]s
    /// and [`Secret`]s read it.
    ///
    /// [`Url`]: Exposure::Url
    /// [`Secret`]: Exposure::Secret
    pub file: &'static str,
    pub exposure: Exposure,
    pub kind: Kind,
    pub default: Fallback,
    /// What it does, in Markdown (backticks are dropped in `--help`); the accepted
    /// values and the default are added from `kind` and `default`.
    pub help: &'static str,
}

/// Declares each setting once: a `pub const NAME: &str` for its variable (what a
/// [`RawConfig`](super::RawConfig) is keyed by), its declaration `declared::NAME` (what
/// the parser reads it by), and its place in `SETTINGS`. `file` is derived; `exposure`
/// is [`Exposure::Flag`] unless given.
macro_rules! settings {
    ($($name:ident = $var:literal { $($field:ident: $value:expr),* $(,)? })*) => {
        $(pub const $name: &str = $var;)*

        /// Each setting's declaration, under the name of its variable's constant.
        pub mod declared {
            use super::*;
            $(
                #[allow(clippy::needless_update)]
                pub const $name: Setting = Setting {
                    var: $var,
                    file: concat!($var, "_FILE"),
                    $($field: $value,)*
                    ..Setting::FLAG
                };
            )*
        }

        /// Every setting, in the order of the README table and of `--help`.
        pub static SETTINGS: &[Setting] = &[$(declared::$name),*];
    };
}
pub(crate) use settings;

impl Setting {
    /// What a declaration does not say: a plain flag (the other fields are always given).
    pub const FLAG: Setting = Setting {
        var: "",
        flag: "",
        file: "",
        exposure: Exposure::Flag,
        kind: Kind::File,
        default: Fallback::Unset,
        help: "",
    };

    /// The variable naming a file that holds the value, for settings that have one.
    pub fn file_twin(&self) -> Option<&'static str> {
        (self.exposure != Exposure::Flag).then_some(self.file)
    }

    /// Whether its value may appear in `Debug` output.
    pub fn shown(&self) -> bool {
        self.exposure == Exposure::Flag
    }

    /// The accepted values, in Markdown.
    pub fn accepts(&self) -> String {
        match self.kind {
            Kind::Addr => "`IP:port` (an address, not a host name)".into(),
            Kind::Token => format!(
                "at least {} printable characters without spaces",
                super::MIN_TOKEN_LEN
            ),
            Kind::DatabaseUrl => "`postgres://…` or `sqlite:…`".into(),
            Kind::RedisUrl => {
                "`redis://host:port` or `rediss://…` (TLS), `redis+cluster://host:port,host:port,…` or `rediss+cluster://…`"
                    .into()
            }
            Kind::Key => "base64 of 32 bytes, e.g. `openssl rand -base64 32`".into(),
            Kind::Keys => "comma-separated keys, each base64 of 32 bytes".into(),
            Kind::Choice(names) => {
                let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
                or_list(&quoted, "or")
            }
            Kind::Name { max, punct } => format!("at most {max} {}", name_charset(punct)),
            Kind::Whole { min, max, unit } => format!("{min} to {max} {unit}"),
            Kind::Bool => "`true` or `false` (also `1`/`0`, `yes`/`no`)".into(),
            Kind::File => "a file path".into(),
            Kind::Price => "a JSON price".into(),
            Kind::HttpUrl => "`http://…` or `https://…`".into(),
        }
    }

    /// The default, in Markdown.
    pub fn default_text(&self) -> String {
        match self.default {
            Fallback::Value(text) => format!("`{text}`"),
            Fallback::Unset => "unset".into(),
            Fallback::Instead(what) => what.into(),
        }
    }

    /// The flag's help line under `serve --help`: what it does, what it accepts, its
    /// variable and its default.
    pub fn flag_help(&self) -> String {
        let url = if self.exposure == Exposure::Url {
            format!("; with a password: {} or {} only", self.var, self.file)
        } else {
            String::new()
        };
        plain(&format!(
            "{}{url} [values: {}] [env: {}] [default: {}]",
            self.help,
            self.accepts(),
            self.var,
            self.default_text()
        ))
    }

    /// How the value is written in `--help` (`<SECONDS>`, `<ADDR>`, …).
    pub fn value_name(&self) -> &'static str {
        match self.kind {
            Kind::Addr => "HOST:PORT",
            Kind::Token | Kind::Key => "SECRET",
            Kind::DatabaseUrl | Kind::RedisUrl | Kind::HttpUrl => "URL",
            Kind::Keys => "KEYS",
            Kind::Choice(_) => "WORD",
            Kind::Name { .. } => "NAME",
            Kind::Whole {
                unit: "seconds", ..
            } => "SECONDS",
            Kind::Whole { .. } => "NUMBER",
            Kind::Bool => "BOOL",
            Kind::File => "PATH",
            Kind::Price => "JSON",
        }
    }
}

/// "characters of A-Z, a-z, 0-9, `-` and `_`" for `punct` = "-_": what a name may hold,
/// in Markdown.
pub(super) fn name_charset(punct: &str) -> String {
    let mut parts: Vec<String> = ["A-Z", "a-z", "0-9"].map(String::from).to_vec();
    parts.extend(punct.chars().map(|c| format!("`{c}`")));
    format!("characters of {}", or_list(&parts, "and"))
}

/// "a, b and c".
fn or_list(items: &[String], last: &str) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., tail] => format!("{} {last} {tail}", init.join(", ")),
    }
}

/// Markdown to terminal text: the backticks go.
pub(super) fn plain(markdown: &str) -> String {
    markdown.replace('`', "")
}

/// Shown under `keyward serve --help`: the settings that have no flag, and the `_FILE`
/// twins.
pub fn secrets_help(settings: &[Setting]) -> String {
    let mut out = String::from(
        "Secrets are read from the environment only, never from flags (any local user can read a\ncommand line):\n",
    );
    for s in settings.iter().filter(|s| s.exposure == Exposure::Secret) {
        out.push_str(&plain(&format!(
            "  {}: {} [values: {}] [default: {}]\n",
            s.var,
            s.help,
            s.accepts(),
            s.default_text()
        )));
    }
    let urls: Vec<&str> = settings
        .iter()
        .filter(|s| s.exposure == Exposure::Url)
        .map(|s| s.var)
        .collect();
    out.push_str(&format!(
        "A URL holding a password ({}) is refused as a flag.\n",
        urls.join(", ")
    ));
    let example = settings
        .iter()
        .find_map(Setting::file_twin)
        .unwrap_or_default();
    out.push_str(&format!(
        "Each of these can instead be read from a file named by its _FILE twin (e.g. {example})."
    ));
    out
}

/// The README's Configuration table, exactly: tests/cli.rs holds the README to it.
pub fn markdown_table(settings: &[Setting]) -> String {
    let mut out =
        String::from("| variable | flag | default | accepts | meaning |\n|---|---|---|---|---|\n");
    let mut twins = Vec::new();
    for s in settings {
        let flag = match s.exposure {
            Exposure::Flag => format!("`--{}`", s.flag),
            Exposure::Url => format!("`--{}` without a password", s.flag),
            Exposure::Secret => "none".into(),
        };
        out.push_str(&format!(
            "| `{}` | {flag} | {} | {} | {} |\n",
            s.var,
            s.default_text(),
            s.accepts(),
            s.help
        ));
        if let Some(file) = s.file_twin() {
            twins.push(format!("`{file}`"));
        }
    }
    out.push_str(&format!(
        "| `KEYWARD_…_FILE` | none | unset | a file path | a file holding the value of its setting (its content without the trailing newline), for {}; setting both is an error |\n",
        or_list(&twins, "and")
    ));
    out
}
