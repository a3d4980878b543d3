//! A streaming scan of an LLM request body that may have been cut short.
//!
//! Envoy's `ext_authz` forwards at most `max_request_bytes` of a body
//! (`allow_partial_message`), so `/authz` often sees the first 64 KiB of a long prompt:
//! not JSON a parser would accept. [`scan`] reads the body once, front to back, and
//! keeps what it learned before the bytes ran out: the top-level `model` (a string),
//! `max_tokens`, `max_completion_tokens`, `max_output_tokens`, `n`, `best_of` (whole
//! numbers), `stream` and `stream_options.include_usage` (booleans), and Gemini's
//! `generationConfig.maxOutputTokens` and `generationConfig.candidateCount`.
//!
//! Only the top-level object's own fields count: a `model` inside `messages` or any
//! other nested value is skipped. Keys and strings are decoded (escapes included), so
//! `"mod\u0065l"` is the same field to keyward as to the upstream. A value is taken only
//! once it is complete: a string needs its closing quote and a number the character
//! after it, so a cut in the middle of `"max_tokens": 4096` does not read as `40`.
//! A checked field named twice is an error: parsers disagree on which one wins, and
//! keyward must check the one the upstream uses. So is one named in another case only
//! (`Model`: Go's decoder matches names so) and a count that is not a whole number
//! (`1e5`, `"4096"`: an upstream may read a number keyward did not count). Where lenient
//! parsers read on, the scan reads on too: past a leading byte order mark, and past an
//! escaped lone surrogate or bytes that are not UTF-8 (U+FFFD), so no field after them
//! is hidden from keyward alone.
//!
//! Nested values are skipped without recursion (a depth counter), so deep nesting costs
//! nothing but time linear in the body.
//!
//! (Over 400 lines: about 270 are its tests, one per way a cut-short body can end.)

/// What [`scan`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Scanned {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub max_output_tokens: Option<i64>,
    /// Gemini's `generationConfig.maxOutputTokens`.
    pub gemini_max_output_tokens: Option<i64>,
    /// `n`: how many answers (choices) the request asks for.
    pub n: Option<i64>,
    /// `best_of`: how many answers a completions request has written to pick from.
    pub best_of: Option<i64>,
    /// Gemini's `generationConfig.candidateCount`.
    pub candidate_count: Option<i64>,
    pub stream: Option<bool>,
    /// `stream_options.include_usage`: an OpenAI stream states its usage only if asked.
    pub include_usage: Option<bool>,
    /// The top-level object was closed: nothing after the end of what was read can
    /// change the answer.
    pub complete: bool,
}

impl Scanned {
    /// The token estimate the body states: the largest of `max_tokens`,
    /// `max_completion_tokens`, `max_output_tokens`, `generationConfig.maxOutputTokens`
    /// (upstreams differ in which one they honour when given two), times the answers
    /// asked for (`n`, `best_of`, `candidateCount`: each answer may reach the limit, and
    /// the upstream bills them all). Saturates, so a huge product is refused as too
    /// large rather than wrapped; a negative limit is returned as it is, to be refused.
    pub fn estimate(&self) -> Option<i64> {
        let limits = [
            self.max_tokens,
            self.max_completion_tokens,
            self.max_output_tokens,
            self.gemini_max_output_tokens,
        ];
        let limit = match limits.into_iter().flatten().min()? {
            negative if negative < 0 => return Some(negative),
            _ => limits.into_iter().flatten().max()?,
        };
        let answers = [self.n, self.best_of, self.candidate_count]
            .into_iter()
            .flatten()
            .fold(1, i64::max);
        Some(limit.saturating_mul(answers))
    }
}

/// A body keyward must not guess about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    #[error("the body names `{0}` more than once")]
    Duplicate(&'static str),
    /// A key that differs from a checked field's name in case only: some upstreams' JSON
    /// decoders (Go's) match field names so, and would read it as that field.
    #[error("the body names `{0}` in another case")]
    CaseVariant(&'static str),
    #[error("`{0}` must be a whole number")]
    NotWhole(&'static str),
    #[error("`{0}` must be true or false")]
    NotBoolean(&'static str),
    /// UTF-16 or UTF-32 (a NUL byte among the first four, or their byte order mark):
    /// some parsers read it, the scan does not.
    #[error("the body is not UTF-8")]
    NotUtf8,
}

/// Why reading stopped early: the bytes ran out, or they are not JSON.
struct Stop;

type Step<T> = Result<T, Stop>;

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Step<u8> {
        self.bytes.get(self.at).copied().ok_or(Stop)
    }

    fn next(&mut self) -> Step<u8> {
        let b = self.peek()?;
        self.at += 1;
        Ok(b)
    }

    fn skip_ws(&mut self) -> Step<u8> {
        while let Some(&b) = self.bytes.get(self.at) {
            if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
                return Ok(b);
            }
            self.at += 1;
        }
        Err(Stop)
    }

    fn expect(&mut self, want: u8) -> Step<()> {
        match self.skip_ws()? == want {
            true => {
                self.at += 1;
                Ok(())
            }
            false => Err(Stop),
        }
    }

    /// Past a string whose opening quote was read, without decoding it.
    fn skip_string(&mut self) -> Step<()> {
        loop {
            let rest = &self.bytes[self.at..];
            let i = rest
                .iter()
                .position(|&b| b == b'"' || b == b'\\')
                .ok_or(Stop)?;
            self.at += i + 1;
            if rest[i] == b'"' {
                return Ok(());
            }
            self.next()?; // the escaped character
        }
    }

    /// A string whose opening quote was read, decoded.
    fn string(&mut self) -> Step<String> {
        let mut out = Vec::new();
        loop {
            let rest = &self.bytes[self.at..];
            let i = rest
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
                .ok_or(Stop)?;
            out.extend_from_slice(&rest[..i]);
            self.at += i + 1;
            match rest[i] {
                // Bytes that are not UTF-8 decode as U+FFFD (as lenient parsers do): the
                // scan goes on, and such a key is no checked field's.
                b'"' => {
                    return Ok(String::from_utf8(out)
                        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
                }
                b'\\' => {}
                _ => return Err(Stop), // a raw control character: not JSON
            }
            let c = match self.next()? {
                b'"' => '"',
                b'\\' => '\\',
                b'/' => '/',
                b'b' => '\u{8}',
                b'f' => '\u{c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                b'u' => self.unicode_escape()?,
                _ => return Err(Stop),
            };
            out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
        }
    }

    fn hex4(&mut self) -> Step<u32> {
        let digits = self.bytes.get(self.at..self.at + 4).ok_or(Stop)?;
        let text = std::str::from_utf8(digits).map_err(|_| Stop)?;
        let value = u32::from_str_radix(text, 16).map_err(|_| Stop)?;
        self.at += 4;
        Ok(value)
    }

    /// After `\u`: one code point, joining a surrogate pair. A surrogate that is not
    /// half of a pair is U+FFFD, as lenient parsers (Python's, JavaScript's) keep going
    /// past it: stopping there would hide the fields after it from keyward alone.
    fn unicode_escape(&mut self) -> Step<char> {
        let first = self.hex4()?;
        if (0xD800..0xDC00).contains(&first) {
            let next = self.bytes.get(self.at..self.at + 2).ok_or(Stop)?;
            if next == b"\\u" {
                let before = self.at;
                self.at += 2;
                let second = self.hex4()?;
                if (0xDC00..0xE000).contains(&second) {
                    let code = 0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00);
                    return char::from_u32(code).ok_or(Stop);
                }
                self.at = before;
            }
            return Ok('\u{FFFD}');
        }
        Ok(char::from_u32(first).unwrap_or('\u{FFFD}'))
    }

    /// The bytes of a number or literal, once the character after it has arrived.
    fn atom(&mut self) -> Step<&[u8]> {
        let start = self.at;
        let rest = &self.bytes[start..];
        let len = rest
            .iter()
            .position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
            .ok_or(Stop)?;
        self.at += len;
        Ok(&rest[..len])
    }

    /// Past any value, nested ones by a depth count.
    fn skip_value(&mut self) -> Step<()> {
        match self.skip_ws()? {
            b'"' => {
                self.at += 1;
                self.skip_string()
            }
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.next()? {
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                return Ok(());
                            }
                        }
                        b'"' => self.skip_string()?,
                        _ => {}
                    }
                }
            }
            _ => self.atom().map(|_| ()),
        }
    }

    /// A whole number, `None` for `null`; another value (a fraction, an exponent, a
    /// string) is refused as `name`'s: an upstream may read it as a number keyward did
    /// not count. Numbers too large for `i64` saturate, so they are refused as too large
    /// rather than ignored.
    fn whole_number(&mut self, name: &'static str) -> Result<Step<Option<i64>>, ScanError> {
        match self.skip_ws() {
            Ok(b'-' | b'0'..=b'9') => {}
            Ok(b'n') => {
                return Ok(self.atom().and_then(|a| match a {
                    b"null" => Ok(None),
                    _ => Err(Stop),
                }))
            }
            Ok(_) => {
                // Refused once the value is whole (a cut inside it is a cut).
                return match self.skip_value() {
                    Ok(()) => Err(ScanError::NotWhole(name)),
                    Err(stop) => Ok(Err(stop)),
                };
            }
            Err(stop) => return Ok(Err(stop)),
        }
        let atom = match self.atom() {
            Ok(atom) => atom,
            Err(stop) => return Ok(Err(stop)),
        };
        let (negative, digits) = match atom.split_first() {
            Some((b'-', digits)) => (true, digits),
            _ => (false, atom),
        };
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            // `10.0` or `1e3`: a whole number written as a decimal, as a float-minded
            // client sends it and a lenient upstream reads it (saturating, as below).
            return match std::str::from_utf8(atom)
                .ok()
                .and_then(|t| t.parse::<f64>().ok())
            {
                Some(x) if x.is_finite() && x.fract() == 0.0 => Ok(Ok(Some(x as i64))),
                _ => Err(ScanError::NotWhole(name)),
            };
        }
        let magnitude = digits.iter().fold(0i64, |n, d| {
            n.saturating_mul(10).saturating_add(i64::from(d - b'0'))
        });
        Ok(Ok(Some(if negative { -magnitude } else { magnitude })))
    }

    /// `true` or `false`, `None` for `null`; another value is refused as `name`'s: a
    /// lenient upstream may read `1` or `"true"` as true.
    fn boolean(&mut self, name: &'static str) -> Result<Step<Option<bool>>, ScanError> {
        match self.skip_ws() {
            Ok(b't' | b'f' | b'n') => Ok(match self.atom() {
                Ok(b"true") => Ok(Some(true)),
                Ok(b"false") => Ok(Some(false)),
                Ok(b"null") => Ok(None),
                Ok(_) => return Err(ScanError::NotBoolean(name)),
                Err(stop) => Err(stop),
            }),
            Ok(_) => match self.skip_value() {
                Ok(()) => Err(ScanError::NotBoolean(name)),
                Err(stop) => Ok(Err(stop)),
            },
            Err(stop) => Ok(Err(stop)),
        }
    }

    fn model(&mut self) -> Step<Option<String>> {
        match self.skip_ws()? {
            b'"' => {
                self.at += 1;
                self.string().map(Some)
            }
            _ => self.skip_value().map(|_| None),
        }
    }

    /// The members of an object whose `{` was read, each handed to `member` with the
    /// cursor before its value. `Ok` once the object closed.
    fn members(
        &mut self,
        mut member: impl FnMut(&mut Self, &str) -> Result<Step<()>, ScanError>,
    ) -> Result<Step<()>, ScanError> {
        let mut first = true;
        loop {
            let step: Step<Option<String>> = (|| {
                match self.skip_ws()? {
                    b'}' if first => {
                        self.at += 1;
                        return Ok(None);
                    }
                    b'"' => self.at += 1,
                    _ => return Err(Stop),
                }
                let key = self.string()?;
                self.expect(b':')?;
                Ok(Some(key))
            })();
            let key = match step {
                Ok(Some(key)) => key,
                Ok(None) => return Ok(Ok(())),
                Err(stop) => return Ok(Err(stop)),
            };
            if let Err(stop) = member(self, &key)? {
                return Ok(Err(stop));
            }
            first = false;
            match self.skip_ws().and_then(|_| self.next()) {
                Ok(b',') => {
                    // `{"a": 1,}` is not JSON; a key must follow.
                    if !matches!(self.skip_ws(), Ok(b'"') | Err(_)) {
                        return Ok(Err(Stop));
                    }
                }
                Ok(b'}') => return Ok(Ok(())),
                _ => return Ok(Err(Stop)),
            }
        }
    }
}

/// The members of a nested object field (`name`), each handed to `member` as
/// [`Cursor::members`] does; a second occurrence of the field is refused, and a value
/// that is not an object is skipped.
fn nested(
    c: &mut Cursor<'_>,
    seen: &mut bool,
    name: &'static str,
    member: impl FnMut(&mut Cursor<'_>, &str) -> Result<Step<()>, ScanError>,
) -> Result<Step<()>, ScanError> {
    if std::mem::replace(seen, true) {
        return Err(ScanError::Duplicate(name));
    }
    match c.skip_ws() {
        Ok(b'{') => c.at += 1,
        Ok(_) => return Ok(c.skip_value()),
        Err(stop) => return Ok(Err(stop)),
    }
    c.members(member)
}

/// Stores a field's value, refusing a second occurrence of the field.
fn once<T>(
    slot: &mut Option<T>,
    seen: &mut bool,
    name: &'static str,
    value: Step<Option<T>>,
) -> Result<Step<()>, ScanError> {
    if std::mem::replace(seen, true) {
        return Err(ScanError::Duplicate(name));
    }
    Ok(value.map(|v| *slot = v))
}

/// The top-level fields the scan reads.
const TOP_LEVEL: &[&str] = &[
    "model",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "stream",
    "n",
    "best_of",
    "stream_options",
    "generationConfig",
    "generation_config",
];

/// Refuses `key` when it is one of `names` in another case only (`Model`, `MAX_TOKENS`),
/// case folded as Go's decoder folds it: `ſ` (U+017F) is an `s`, `K` (U+212A) a `k`.
fn case_variant(key: &str, names: &[&'static str]) -> Result<(), ScanError> {
    let folded = |c: char| match c {
        '\u{17F}' => 's',
        '\u{212A}' => 'k',
        c => c.to_ascii_lowercase(),
    };
    let chars = key.chars().count();
    let same =
        |name: &str| chars == name.len() && key.chars().map(folded).eq(name.chars().map(folded));
    match names.iter().find(|name| key != **name && same(name)) {
        Some(name) => Err(ScanError::CaseVariant(name)),
        None => Ok(()),
    }
}

/// Reads what it can of a JSON object body; see the module documentation.
pub fn scan(body: &[u8]) -> Result<Scanned, ScanError> {
    // A byte order mark some parsers skip (Python's): so does the scan.
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    if body.iter().take(4).any(|&b| b == 0)
        || body.starts_with(b"\xFE\xFF")
        || body.starts_with(b"\xFF\xFE")
    {
        return Err(ScanError::NotUtf8);
    }
    let mut cursor = Cursor { bytes: body, at: 0 };
    if cursor.expect(b'{').is_err() {
        return Ok(Scanned::default());
    }
    // Which checked fields were named, with a value of any type.
    let mut seen = [false; 12];
    let mut out = Scanned::default();
    let closed = cursor.members(|c, key| {
        case_variant(key, TOP_LEVEL)?;
        let [model, max, completion, output, stream, config, gemini, n, best_of, candidates, options, usage] =
            &mut seen;
        match key {
            "model" => once(&mut out.model, model, "model", c.model()),
            "max_tokens" => once(
                &mut out.max_tokens,
                max,
                "max_tokens",
                c.whole_number("max_tokens")?,
            ),
            "max_completion_tokens" => once(
                &mut out.max_completion_tokens,
                completion,
                "max_completion_tokens",
                c.whole_number("max_completion_tokens")?,
            ),
            "max_output_tokens" => once(
                &mut out.max_output_tokens,
                output,
                "max_output_tokens",
                c.whole_number("max_output_tokens")?,
            ),
            "stream" => once(&mut out.stream, stream, "stream", c.boolean("stream")?),
            "n" => once(
                &mut out.n,
                n,
                "n",
                c.whole_number("n")?,
            ),
            "best_of" => once(
                &mut out.best_of,
                best_of,
                "best_of",
                c.whole_number("best_of")?,
            ),
            "stream_options" => nested(c, options, "stream_options", |c, key| {
                case_variant(key, &["include_usage"])?;
                match key {
                    "include_usage" => once(
                        &mut out.include_usage,
                        usage,
                        "stream_options.include_usage",
                        c.boolean("stream_options.include_usage")?,
                    ),
                    _ => Ok(c.skip_value()),
                }
            }),
            // Gemini's API also takes its protobuf fields' own names (snake_case): either
            // spelling is the same field, and both at once are a duplicate.
            "generationConfig" | "generation_config" => nested(c, config, "generationConfig", |c, key| {
                case_variant(
                    key,
                    &["maxOutputTokens", "candidateCount", "max_output_tokens", "candidate_count"],
                )?;
                match key {
                    "maxOutputTokens" | "max_output_tokens" => once(
                        &mut out.gemini_max_output_tokens,
                        gemini,
                        "generationConfig.maxOutputTokens",
                        c.whole_number("generationConfig.maxOutputTokens")?,
                    ),
                    "candidateCount" | "candidate_count" => once(
                        &mut out.candidate_count,
                        candidates,
                        "generationConfig.candidateCount",
                        c.whole_number("generationConfig.candidateCount")?,
                    ),
                    _ => Ok(c.skip_value()),
                }
            }),
            _ => Ok(c.skip_value()),
        }
    })?;
    Ok(Scanned {
        complete: closed.is_ok(),
        ..out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str) -> Scanned {
        scan(body.as_bytes()).unwrap()
    }

    #[test]
    fn whole_bodies() {
        let s = ok(r#"{"model": "gpt-4o", "max_tokens": 50, "stream": true, "messages": []}"#);
        assert_eq!(s.model.as_deref(), Some("gpt-4o"));
        assert_eq!(
            (s.max_tokens, s.stream, s.complete),
            (Some(50), Some(true), true)
        );
        assert_eq!(s.estimate(), Some(50));
        let s = ok(r#"{"max_completion_tokens":7}"#);
        assert_eq!((s.estimate(), s.complete), (Some(7), true));
        let s = ok(r#"{"input": "hi", "max_output_tokens": 9, "stream": false}"#);
        assert_eq!((s.estimate(), s.stream), (Some(9), Some(false)));
        let s = ok(
            r#"{"contents": [], "generationConfig": {"temperature": 0.2, "maxOutputTokens": 77}}"#,
        );
        assert_eq!((s.estimate(), s.complete), (Some(77), true));
        assert_eq!(
            ok("{}"),
            Scanned {
                complete: true,
                ..Scanned::default()
            }
        );
        assert_eq!(
            ok(" \n{ } "),
            Scanned {
                complete: true,
                ..Scanned::default()
            }
        );
    }

    /// Upstreams differ in which of two limits they honour (vLLM prefers
    /// `max_completion_tokens` to `max_tokens`, OpenAI the other way round for older
    /// models): the estimate, and so the balance hold, is the largest one stated.
    #[test]
    fn the_largest_estimate_field_counts() {
        let s = ok(
            r#"{"max_output_tokens": 3, "generationConfig": {"maxOutputTokens": 4}, "max_tokens": 1}"#,
        );
        assert_eq!(s.estimate(), Some(4));
        let s = ok(r#"{"max_tokens": 1, "max_completion_tokens": 100000}"#);
        assert_eq!(s.estimate(), Some(100_000));
        let s = ok(r#"{"generationConfig": {"maxOutputTokens": 4}, "max_completion_tokens": 2}"#);
        assert_eq!(s.estimate(), Some(4));
        // A negative limit is not hidden behind a larger one: it is refused.
        let s = ok(r#"{"max_tokens": -1, "max_completion_tokens": 100, "n": 3}"#);
        assert_eq!(s.estimate(), Some(-1));
    }

    /// `n` (OpenAI chat and completions), `best_of` (completions) and Gemini's
    /// `generationConfig.candidateCount` ask for several answers, each up to the limit:
    /// the upstream writes (and bills) all of them, so the estimate counts each.
    #[test]
    fn the_estimate_counts_every_choice_asked_for() {
        let s = ok(r#"{"model": "gpt-4o", "max_tokens": 1000, "n": 8}"#);
        assert_eq!(s.estimate(), Some(8000));
        let s = ok(r#"{"max_tokens": 10, "n": 2, "best_of": 5}"#);
        assert_eq!(s.estimate(), Some(50));
        let s = ok(r#"{"generationConfig": {"candidateCount": 4, "maxOutputTokens": 100}}"#);
        assert_eq!(s.estimate(), Some(400));
        // Nonsense counts do not lower the estimate; huge ones saturate (then refused).
        for body in [
            r#"{"max_tokens": 10, "n": 0}"#,
            r#"{"max_tokens": 10, "n": -3}"#,
        ] {
            assert_eq!(ok(body).estimate(), Some(10), "{body}");
        }
        // A count an upstream may read as a number keyward did not count is refused.
        for body in [
            r#"{"max_tokens": 10, "n": "4"}"#,
            r#"{"max_tokens": 10, "n": 1.5}"#,
        ] {
            assert_eq!(
                scan(body.as_bytes()),
                Err(ScanError::NotWhole("n")),
                "{body}"
            );
        }
        let s = ok(r#"{"max_tokens": 4611686018427387904, "n": 4}"#);
        assert_eq!(s.estimate(), Some(i64::MAX));
        // Without a stated limit there is nothing to multiply (the default applies).
        assert_eq!(ok(r#"{"n": 4}"#).estimate(), None);
        // Only the top level's `n` counts, and a second one is refused.
        assert_eq!(
            ok(r#"{"messages": [{"n": 9}], "max_tokens": 10}"#).estimate(),
            Some(10)
        );
        assert_eq!(
            scan(br#"{"n": 1, "max_tokens": 10, "n": 9}"#),
            Err(ScanError::Duplicate("n"))
        );
    }

    #[test]
    fn nested_fields_of_the_same_name_are_decoys() {
        let body = r#"{"messages": [{"role": "user", "model": "decoy", "max_tokens": 1,
            "content": [{"model": "decoy2", "stream": false}]}],
            "metadata": {"model": "decoy3", "generationConfig": {"maxOutputTokens": 5}},
            "tools": [[["model"]], {"\"model\"": "x"}],
            "model": "real", "max_tokens": 100}"#;
        let s = ok(body);
        assert_eq!(s.model.as_deref(), Some("real"));
        assert_eq!(
            (s.max_tokens, s.stream, s.gemini_max_output_tokens),
            (Some(100), None, None)
        );
        assert!(s.complete);
        // A string value that looks like a field.
        let s = ok(r#"{"prompt": "\"model\": \"decoy\", ", "model": "real"}"#);
        assert_eq!(s.model.as_deref(), Some("real"));
        // Brackets inside strings do not move the depth.
        let s = ok(r#"{"messages": [{"content": "]}]} {\"x"}], "model": "real"}"#);
        assert_eq!(s.model.as_deref(), Some("real"));
    }

    #[test]
    fn escapes_are_decoded_in_keys_and_values() {
        let s = ok(r#"{"mod\u0065l": "gpt\u002d4o", "max\u005ftokens": 5}"#);
        assert_eq!(
            (s.model.as_deref(), s.max_tokens),
            (Some("gpt-4o"), Some(5))
        );
        let s = ok(r#"{"model": "a\"b\\c\/d\u00e9\ud83d\ude00\n"}"#);
        assert_eq!(s.model.as_deref(), Some("a\"b\\c/dé😀\n"));
        let s = ok(r#"{"model": "nul\u0000here"}"#);
        assert_eq!(
            s.model.as_deref(),
            Some("nul\0here"),
            "decoded; names::check refuses it"
        );
        // A lone surrogate is U+FFFD, as lenient parsers read past it: the fields after
        // it are seen (stopping there hid a model from keyward alone).
        let s = ok(r#"{"max_tokens": 2, "model": "\ud800x"}"#);
        assert_eq!(
            (s.model.as_deref(), s.max_tokens, s.complete),
            (Some("\u{FFFD}x"), Some(2), true)
        );
        let s = ok(r#"{"x\udc00": 1, "model": "gpt-4o"}"#);
        assert_eq!(s.model.as_deref(), Some("gpt-4o"));
        // A byte order mark is skipped, as Python's parser skips it.
        let s = ok("\u{FEFF}{\"model\": \"gpt-4o\"}");
        assert_eq!(s.model.as_deref(), Some("gpt-4o"));
        // A checked field's name in another case is refused: Go's decoder reads it so.
        for (body, name) in [
            (r#"{"Model": "gpt-4o"}"#, "model"),
            (r#"{"model": "a", "MODEL": "b"}"#, "model"),
            (r#"{"MAX_TOKENS": 5}"#, "max_tokens"),
            (
                r#"{"generationConfig": {"maxoutputtokens": 5}}"#,
                "maxOutputTokens",
            ),
        ] {
            assert_eq!(
                scan(body.as_bytes()),
                Err(ScanError::CaseVariant(name)),
                "{body}"
            );
        }
    }

    #[test]
    fn truncated_bodies_are_read_as_far_as_they_go() {
        let full = r#"{"model": "gpt-4o", "max_tokens": 4096, "messages": [{"role": "user", "content": "hello \"world\""}], "stream": true}"#;
        for cut in 0..full.len() {
            let s = ok(&full[..cut]);
            assert!(!s.complete, "cut at {cut}");
            // The model only once its closing quote arrived; never a prefix of it.
            let model_end = full.find("gpt-4o\"").unwrap() + "gpt-4o\"".len();
            assert_eq!(s.model.is_some(), cut >= model_end, "cut at {cut}");
            // A number only once the character after it arrived: never 40 or 409.
            assert!(
                matches!(s.max_tokens, None | Some(4096)),
                "cut at {cut}: {s:?}"
            );
            assert_eq!(s.stream, None, "cut at {cut}");
        }
        let s = ok(full);
        assert_eq!(
            (s.max_tokens, s.stream, s.complete),
            (Some(4096), Some(true), true)
        );
        // Cut inside an escape, inside a \u escape, after a backslash.
        for body in [
            r#"{"model": "gpt\"#,
            r#"{"model": "gpt\u00"#,
            r#"{"model": "gpt\u"#,
        ] {
            assert_eq!(ok(body).model, None, "{body}");
        }
        assert_eq!(ok(r#"{"max_tokens": 12"#).max_tokens, None);
        assert_eq!(ok(r#"{"max_tokens": 12 "#).max_tokens, Some(12));
        assert_eq!(ok(r#"{"stream": tru"#).stream, None);
    }

    #[test]
    fn huge_prompts_before_and_after_the_model() {
        let prompt = "x".repeat(200 * 1024);
        let before = format!(
            r#"{{"messages": [{{"content": "{prompt}"}}], "model": "late", "max_tokens": 8}}"#
        );
        let s = ok(&before);
        assert_eq!((s.model.as_deref(), s.max_tokens), (Some("late"), Some(8)));
        // Cut inside the prompt: the model after it is not seen (and not guessed).
        let s = ok(&before[..64 * 1024]);
        assert_eq!((s.model, s.complete), (None, false));
        let after = format!(
            r#"{{"model": "early", "max_tokens": 8, "messages": [{{"content": "{prompt}"}}]}}"#
        );
        let s = ok(&after[..64 * 1024]);
        assert_eq!(
            (s.model.as_deref(), s.max_tokens, s.complete),
            (Some("early"), Some(8), false)
        );
    }

    #[test]
    fn numbers_arrays_and_other_types() {
        let s = ok(r#"{"stream": null, "model": 4}"#);
        assert_eq!((s.stream, s.model), (None, None));
        assert!(s.complete);
        // A flag a lenient upstream may read as true is refused, not taken as unset.
        for body in [
            r#"{"stream": "yes"}"#,
            r#"{"stream": 1}"#,
            r#"{"stream": "true"}"#,
        ] {
            assert_eq!(
                scan(body.as_bytes()),
                Err(ScanError::NotBoolean("stream")),
                "{body}"
            );
        }
        // A whole number written as a decimal is that number.
        assert_eq!(ok(r#"{"max_tokens": 10.0}"#).max_tokens, Some(10));
        assert_eq!(ok(r#"{"max_tokens": 1e3}"#).max_tokens, Some(1000));
        // Gemini's snake_case spelling is the same field; both at once are a duplicate.
        let s = ok(r#"{"generation_config": {"max_output_tokens": 100, "candidate_count": 2}}"#);
        assert_eq!(s.estimate(), Some(200));
        let s = ok(r#"{"generationConfig": {"max_output_tokens": 100}}"#);
        assert_eq!(s.estimate(), Some(100));
        assert!(scan(br#"{"generationConfig": {}, "generation_config": {}}"#).is_err());
        // UTF-16 or UTF-32, which some parsers read and the scan does not: refused.
        let utf16: Vec<u8> = r#"{"max_tokens": 5}"#.bytes().flat_map(|b| [b, 0]).collect();
        assert_eq!(scan(&utf16), Err(ScanError::NotUtf8));
        assert_eq!(scan(b"\xFF\xFE{\x00"), Err(ScanError::NotUtf8));
        // Go's decoder folds `\u{17F}` to `s` and `\u{212A}` to `k`.
        for body in ["{\"max_token\u{17F}\": 5}", "{\"max_to\u{212A}ens\": 5}"] {
            assert_eq!(
                scan(body.as_bytes()),
                Err(ScanError::CaseVariant("max_tokens")),
                "{body}"
            );
        }
        assert_eq!(ok(r#"{"max_tokens": -3}"#).max_tokens, Some(-3));
        // A token limit that is not a whole number is refused, not ignored.
        for body in [
            r#"{"max_tokens": 1.5}"#,
            r#"{"max_tokens": "4096"}"#,
            r#"{"max_tokens": [3]}"#,
        ] {
            assert_eq!(
                scan(body.as_bytes()),
                Err(ScanError::NotWhole("max_tokens")),
                "{body}"
            );
        }
        assert_eq!(
            ok(r#"{"max_tokens": 99999999999999999999999}"#).max_tokens,
            Some(i64::MAX)
        );
        assert_eq!(
            ok(r#"{"max_tokens": null, "model": null}"#).max_tokens,
            None
        );
        let s = ok(r#"{"generationConfig": [1, 2], "model": ["m"]}"#);
        assert_eq!((s.estimate(), s.model, s.complete), (None, None, true));
        // Not an object at all: nothing.
        for body in [
            "",
            "[{\"model\": \"x\"}]",
            "\"model\"",
            "null",
            "{\"model\" \"x\"}",
        ] {
            assert_eq!(ok(body).model, None, "{body}");
        }
    }

    #[test]
    fn malformed_json_stops_the_scan_where_it_breaks() {
        let s = ok(r#"{"model": "a", "max_tokens": 5,, "stream": true}"#);
        assert_eq!(
            (s.model.as_deref(), s.max_tokens, s.stream, s.complete),
            (Some("a"), Some(5), None, false)
        );
        let s = ok("{\"model\": \"raw\nnewline\"}");
        assert_eq!(s.model, None);
        let s = ok(&format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)));
        assert_eq!(s, Scanned::default());
        let deep = format!(
            r#"{{"a": {}{}, "model": "m"}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(
            ok(&deep).model.as_deref(),
            Some("m"),
            "deep nesting is skipped, not recursed"
        );
    }

    #[test]
    fn a_checked_field_named_twice_is_refused() {
        for (body, field) in [
            (
                r#"{"model": "gpt-4o-mini", "messages": [], "model": "gpt-4o"}"#,
                "model",
            ),
            (r#"{"model": "a", "m\u006fdel": "b"}"#, "model"),
            (r#"{"max_tokens": 1, "max_tokens": 9000}"#, "max_tokens"),
            (r#"{"model": null, "model": "b"}"#, "model"),
            (r#"{"stream": false, "stream": true}"#, "stream"),
            (
                r#"{"generationConfig": {"maxOutputTokens": 1, "maxOutputTokens": 2}}"#,
                "generationConfig.maxOutputTokens",
            ),
            (
                r#"{"generationConfig": {}, "generationConfig": {}}"#,
                "generationConfig",
            ),
        ] {
            assert_eq!(
                scan(body.as_bytes()),
                Err(ScanError::Duplicate(field)),
                "{body}"
            );
        }
        // Nested repeats are nobody's business.
        assert!(scan(br#"{"messages": [{"model": 1}, {"model": 2}], "model": "m"}"#).is_ok());
    }
}
