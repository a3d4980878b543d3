//! Where a script's KEYS and ARGV go ([`ScriptArgs`]): a `redis::ScriptInvocation`, or
//! the hot path's [`Call`], which keeps them in two command buffers and writes the
//! EVALSHA at once. A `ScriptInvocation` holds every value in a `Vec` of its own and
//! copies them all again into the command it sends: some thirty allocations per
//! admission, for a call whose values are known before it is sent.

use redis::{Cmd, Script, ToRedisArgs};

/// Takes a script's KEYS and ARGV, in the script's order (the `push` of every contract
/// struct writes into one).
pub trait ScriptArgs {
    /// Adds a value to KEYS.
    fn key<T: ToRedisArgs>(&mut self, value: T);
    /// Adds a value to ARGV.
    fn arg<T: ToRedisArgs>(&mut self, value: T);
}

impl ScriptArgs for redis::ScriptInvocation<'_> {
    fn key<T: ToRedisArgs>(&mut self, value: T) {
        redis::ScriptInvocation::key(self, value);
    }

    fn arg<T: ToRedisArgs>(&mut self, value: T) {
        redis::ScriptInvocation::arg(self, value);
    }
}

/// One script call: its KEYS and ARGV in a buffer each, sent as one EVALSHA
/// ([`Call::evalsha`]); after a NOSCRIPT the caller loads the script and sends it again
/// (`limits::redis::lanes`).
pub struct Call<'a> {
    script: &'a Script,
    keys: Cmd,
    args: Cmd,
}

impl<'a> Call<'a> {
    /// An empty call of `script`, with room for an admission's values.
    pub fn new(script: &'a Script) -> Call<'a> {
        Call {
            script,
            keys: Cmd::with_capacity(8, 256),
            args: Cmd::with_capacity(24, 256),
        }
    }

    /// The script called.
    pub fn script(&self) -> &'a Script {
        self.script
    }

    /// `EVALSHA <sha1> <number of keys> KEYS... ARGV...`
    pub fn evalsha(&self) -> Cmd {
        let keys = self.keys.args_iter();
        let args = self.args.args_iter();
        let data: usize = keys.clone().chain(args.clone()).map(arg_len).sum();
        let mut cmd = Cmd::with_capacity(3 + keys.len() + args.len(), data + 64);
        cmd.arg("EVALSHA")
            .arg(self.script.get_hash())
            .arg(keys.len());
        for value in keys.chain(args) {
            if let redis::Arg::Simple(bytes) = value {
                cmd.arg(bytes);
            }
        }
        cmd
    }
}

fn arg_len(arg: redis::Arg<&[u8]>) -> usize {
    match arg {
        redis::Arg::Simple(bytes) => bytes.len(),
        // A cursor (no bytes) or a kind of argument this code never writes.
        _ => 0,
    }
}

impl ScriptArgs for Call<'_> {
    fn key<T: ToRedisArgs>(&mut self, value: T) {
        self.keys.arg(value);
    }

    fn arg<T: ToRedisArgs>(&mut self, value: T) {
        self.args.arg(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same values make the same command as `redis::ScriptInvocation` sends.
    #[test]
    fn evalsha_as_the_crate_writes_it() {
        let script = Script::new("return 1");
        let mut call = Call::new(&script);
        call.key("k1");
        call.key(vec!["k2", "k3"]);
        call.arg(42_i64);
        call.arg("");
        call.arg(&b"x"[..]);
        let mut expected = redis::cmd("EVALSHA");
        expected
            .arg(script.get_hash())
            .arg(3)
            .arg("k1")
            .arg("k2")
            .arg("k3")
            .arg(42)
            .arg("")
            .arg("x");
        assert_eq!(
            call.evalsha().get_packed_command(),
            expected.get_packed_command()
        );
    }
}
