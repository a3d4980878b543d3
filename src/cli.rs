//! Command line: `keyward serve`, `keyward migrate` and `keyward probe`. Their setting
//! flags are built at run time from the declarations in [`config::SETTINGS`], so a flag,
//! its help, its variable and its default cannot disagree with the parser. Every flag has
//! an environment twin (the flag wins); both end up in one [`RawConfig`] map for
//! [`Config::from_raw`](crate::config::Config::from_raw) to validate.
//!
//! Secrets ([`Exposure::Secret`]) are not flags: they, and every `…_FILE` twin, are read
//! from the environment only; their flag exists, hidden, only to be refused with one line
//! naming the variable. The database and Redis URLs ([`Exposure::Url`]) stay flags for
//! URLs without a password; a flag holding one is refused, because the command line is
//! public.

use std::marker::PhantomData;

use clap::{Arg, ArgMatches, Args, FromArgMatches, Parser, Subcommand};

use crate::config::{self, ConfigError, Exposure, RawConfig, Setting, SETTINGS};

#[derive(Debug, Parser)]
#[command(
    name = "keyward",
    version,
    about = "Rate-limiting and key-pool sidecar for LLM API gateways"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the data plane and the admin API (migrations are applied first).
    Serve(Box<ServeArgs>),
    /// Apply the database migrations and exit.
    Migrate(MigrateArgs),
    /// Ask the keyward at KEYWARD_LISTEN for a health path; exit 0 on 200 (for exec probes).
    Probe(ProbeArgs),
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// The path to ask for
    #[arg(default_value = "/readyz")]
    pub path: String,
    #[command(flatten)]
    pub settings: SettingFlags<ListenOnly>,
}

/// `serve` takes every setting.
pub type ServeArgs = SettingFlags<AllSettings>;
/// `migrate` takes the database URL.
pub type MigrateArgs = SettingFlags<DatabaseOnly>;

/// Which settings a subcommand takes as flags (and reads from the environment).
pub trait Selection: std::fmt::Debug {
    fn takes(setting: &Setting) -> bool;
    /// Text after the flags in `--help`.
    fn after_help() -> Option<String> {
        None
    }
}

#[derive(Debug)]
pub enum AllSettings {}
impl Selection for AllSettings {
    fn takes(_: &Setting) -> bool {
        true
    }
    fn after_help() -> Option<String> {
        Some(config::secrets_help())
    }
}

#[derive(Debug)]
pub enum DatabaseOnly {}
impl Selection for DatabaseOnly {
    fn takes(setting: &Setting) -> bool {
        setting.var == config::DATABASE_URL
    }
}

#[derive(Debug)]
pub enum ListenOnly {}
impl Selection for ListenOnly {
    fn takes(setting: &Setting) -> bool {
        setting.var == config::LISTEN
    }
}

/// The setting flags given on a command line: variable → value.
#[derive(Debug)]
pub struct SettingFlags<S> {
    given: RawConfig,
    selection: PhantomData<S>,
}

impl<S: Selection> SettingFlags<S> {
    fn taken() -> impl Iterator<Item = &'static Setting> + Clone {
        SETTINGS.iter().filter(|s| S::takes(s))
    }

    /// Flags as if given on the command line, `(variable, value)` (for tests).
    pub fn given(flags: &[(&'static str, &str)]) -> Self {
        SettingFlags {
            given: flags.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            selection: PhantomData,
        }
    }

    /// Flags, then the environment: what [`Config::from_raw`](config::Config::from_raw)
    /// validates.
    pub fn raw(&self) -> Result<RawConfig, Vec<ConfigError>> {
        self.raw_from(&|var| std::env::var(var).ok())
    }

    /// Like [`Self::raw`], with `env` for the environment. A secret given as a flag, or
    /// a URL flag holding a password, is refused with one line naming the variable.
    pub fn raw_from(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<RawConfig, Vec<ConfigError>> {
        let refused: Vec<ConfigError> = Self::taken()
            .filter(|s| s.exposure == Exposure::Secret && self.given.contains_key(s.var))
            .map(|s| ConfigError {
                var: s.var,
                reason: format!(
                    "a secret cannot be given as --{} (any local user can read the command line); set {} or {} in the environment",
                    s.flag, s.var, s.file
                ),
            })
            .collect();
        if !refused.is_empty() {
            return Err(refused);
        }
        let mut raw = RawConfig::new();
        let mut errors = Vec::new();
        for s in Self::taken() {
            match self.given.get(s.var) {
                Some(url) if s.exposure == Exposure::Url && config::url_has_password(url) => {
                    errors.push(ConfigError {
                        var: s.var,
                        reason: format!(
                            "a URL with a password cannot be given as --{} (any local user can read the command line); set {} or {} in the environment",
                            s.flag, s.var, s.file
                        ),
                    })
                }
                Some(value) => {
                    raw.insert(s.var, value.clone());
                }
                None => {
                    if let Some(value) = env(s.var) {
                        raw.insert(s.var, value);
                    }
                }
            }
            if let Some(file) = s.file_twin() {
                if let Some(path) = env(file) {
                    raw.insert(file, path);
                }
            }
        }
        if errors.is_empty() {
            Ok(raw)
        } else {
            Err(errors)
        }
    }
}

/// The flag of one setting; a secret's is hidden (it is only refused).
fn flag_arg(s: &'static Setting) -> Arg {
    let arg = Arg::new(s.var).long(s.flag);
    if s.exposure == Exposure::Secret {
        arg.hide(true).value_name("REFUSED")
    } else {
        arg.value_name(s.value_name()).help(s.flag_help())
    }
}

impl<S: Selection> Args for SettingFlags<S> {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let cmd = Self::taken().fold(cmd, |cmd, s| cmd.arg(flag_arg(s)));
        match S::after_help() {
            Some(text) => cmd.after_help(text),
            None => cmd,
        }
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl<S: Selection> FromArgMatches for SettingFlags<S> {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let given = Self::taken()
            .filter_map(|s| {
                let value = matches.try_get_one::<String>(s.var).ok().flatten()?;
                Some((s.var, value.clone()))
            })
            .collect();
        Ok(SettingFlags {
            given,
            selection: PhantomData,
        })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

/// The environment's variables named like keyward's (`KEYWARD_…`) that are none of its
/// settings nor their `_FILE` twins, nor the test suite's and benches' own
/// (`KEYWARD_TEST_…`, `KEYWARD_BENCH_…`, `KEYWARD_DIFF_CASES`, `KEYWARD_BIN`): most likely
/// misspelt, and ignored, so `serve` warns about each.
pub fn unknown_variables(names: impl IntoIterator<Item = String>) -> Vec<String> {
    let known = |name: &str| {
        SETTINGS
            .iter()
            .any(|s| s.var == name || s.file_twin() == Some(name))
            || ["KEYWARD_TEST_", "KEYWARD_BENCH_"]
                .iter()
                .any(|p| name.starts_with(p))
            || ["KEYWARD_DIFF_CASES", "KEYWARD_BIN"].contains(&name)
    };
    let mut unknown: Vec<String> = names
        .into_iter()
        .filter(|n| n.starts_with("KEYWARD_") && !known(n))
        .collect();
    unknown.sort();
    unknown
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn misspelt_variables_are_told_apart_from_settings() {
        let names = [
            "KEYWARD_RATE_LIMT",
            "KEYWARD_REDIS_URL",
            "KEYWARD_REDIS_URL_FILE",
            "KEYWARD_TEST_REDIS_URL",
            "KEYWARD_BENCH_ONLY",
            "PATH",
            "KEYWARD_LISTEN_ADDR",
        ]
        .map(String::from);
        assert_eq!(
            unknown_variables(names),
            ["KEYWARD_LISTEN_ADDR", "KEYWARD_RATE_LIMT"]
        );
    }

    /// Every `serve` flag (and so its environment twin) must reach the configuration: a
    /// flag missing from `raw()` would be accepted and silently ignored.
    #[test]
    fn every_serve_flag_reaches_the_configuration() {
        let mut argv = vec!["keyward".to_string(), "serve".to_string()];
        let flags: Vec<&Setting> = SETTINGS
            .iter()
            .filter(|s| s.exposure != Exposure::Secret)
            .collect();
        for s in &flags {
            argv.push(format!("--{}", s.flag));
            argv.push(format!("value-of-{}", s.flag));
        }
        assert!(flags.len() >= 20, "the serve flags were not found");
        // And `serve` has no other flag than these (and the refused secrets' and --help).
        let cli = Cli::command();
        let serve = cli.find_subcommand("serve").expect("serve");
        let longs: Vec<&str> = serve
            .get_arguments()
            .filter_map(|arg| arg.get_long())
            .filter(|long| *long != "help")
            .collect();
        let declared: Vec<&str> = SETTINGS.iter().map(|s| s.flag).collect();
        assert_eq!(longs, declared);
        let Command::Serve(args) = Cli::try_parse_from(&argv).expect("parses").command else {
            panic!("not serve");
        };
        let raw = args
            .raw_from(&|_| None)
            .expect("no password in these values");
        for s in flags {
            assert_eq!(
                raw.get(s.var).map(String::as_str),
                Some(format!("value-of-{}", s.flag).as_str()),
                "--{} / {} does not reach the configuration",
                s.flag,
                s.var
            );
        }
    }

    fn serve_args(argv: &[&str]) -> ServeArgs {
        let argv = ["keyward", "serve"].iter().chain(argv);
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Serve(args) => *args,
            _ => panic!("not serve"),
        }
    }

    /// No secret is a flag: the command line is readable by every local user.
    #[test]
    fn secrets_are_not_flags_but_come_from_the_environment() {
        let secrets: Vec<&Setting> = SETTINGS
            .iter()
            .filter(|s| s.exposure == Exposure::Secret)
            .collect();
        assert_eq!(secrets.len(), 5);
        for s in &secrets {
            // Parsed only to be refused, naming the variable to use instead.
            let flag = format!("--{}", s.flag);
            let errors = serve_args(&[&flag, "x"])
                .raw_from(&|_| None)
                .expect_err("a secret flag is refused");
            assert_eq!(errors.len(), 1);
            assert_eq!(errors[0].var, s.var, "{flag}");
        }
        let env = |var: &str| Some(format!("env-{var}"));
        let raw = serve_args(&[]).raw_from(&env).unwrap();
        for s in SETTINGS {
            assert_eq!(raw[s.var], format!("env-{}", s.var));
            if let Some(file) = s.file_twin() {
                assert_eq!(raw[file], format!("env-{file}"));
            }
        }
        let help = Cli::command()
            .find_subcommand_mut("serve")
            .expect("serve")
            .render_help()
            .to_string();
        for s in secrets {
            assert!(!help.contains(&format!("--{}", s.flag)), "{help}");
            assert!(help.contains(s.var), "{help}");
        }
    }

    #[test]
    fn a_url_flag_with_a_password_is_refused_in_one_line() {
        let env = |_: &str| None;
        for (argv, var) in [
            (
                ["--database-url", "postgres://u:hunter2@db/k"],
                config::DATABASE_URL,
            ),
            (
                ["--redis-url", "redis://:hunter2@localhost:6379"],
                config::REDIS_URL,
            ),
        ] {
            let errors = serve_args(&argv).raw_from(&env).unwrap_err();
            assert_eq!(errors.len(), 1);
            let line = errors[0].to_string();
            assert!(line.starts_with(var), "{line}");
            assert!(line.contains(&format!("{var}_FILE")), "{line}");
            assert!(!line.contains("hunter2"), "{line}");
        }
        // Without a password the flag is a flag, and it wins over the environment.
        let env = |_: &str| Some("redis://env:6379".to_string());
        let raw = serve_args(&["--redis-url", "redis://flag:6379"])
            .raw_from(&env)
            .unwrap();
        assert_eq!(raw[config::REDIS_URL], "redis://flag:6379");

        let migrate = MigrateArgs::given(&[(config::DATABASE_URL, "postgres://u:hunter2@db/k")]);
        assert_eq!(
            migrate.raw_from(&|_| None).unwrap_err()[0].var,
            config::DATABASE_URL
        );
        // `migrate` reads only the database URL and its file.
        let env = |var: &str| Some(format!("env-{var}"));
        let raw = MigrateArgs::given(&[]).raw_from(&env).unwrap();
        let vars: Vec<&str> = raw.keys().copied().collect();
        assert_eq!(vars, [config::DATABASE_URL, "KEYWARD_DATABASE_URL_FILE"]);
    }
}
