//! Top-level walk of a gateway envelope: `op`, `s`, `t`, the span of `d`, and the few
//! fields of `d` the gateway process needs for a handful of event kinds.
//!
//! Only the envelope and the top level of `d` are walked with the JSON grammar; every
//! other value is skipped structurally: strings are jumped over with `memchr` (SIMD) for
//! `"` and `\`, and containers only have their brackets matched. That is enough to detect
//! truncated or unbalanced messages cheaply; scalars nested inside `d` are not validated.
//! Keys are compared as raw bytes, so a key spelled with escapes (`"o\u0070"`) is not
//! recognised (Discord never sends one). Nested keys named like envelope keys (an `op`
//! inside `d`, `"op":7` inside message content) are never confused with the real ones.
use std::ops::Range;

use memchr::memchr2;

use crate::errors::{Error, Result};

/// Kinds of messages the codec tells apart (the `KIND_*` module constants).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Anything else.
    Other = 0,
    /// READY dispatch.
    Ready = 1,
    /// RESUMED dispatch.
    Resumed = 2,
    /// `GUILD_CREATE` dispatch.
    GuildCreate = 3,
    /// `GUILD_DELETE` dispatch.
    GuildDelete = 4,
    /// `MESSAGE_CREATE` dispatch.
    MessageCreate = 5,
    /// `MESSAGE_UPDATE` dispatch.
    MessageUpdate = 6,
    /// `MESSAGE_DELETE` dispatch.
    MessageDelete = 7,
}

impl Kind {
    /// The kind of a dispatch from its raw `t` bytes.
    fn from_t(t: &[u8]) -> Self {
        match t {
            b"MESSAGE_CREATE" => Self::MessageCreate,
            b"MESSAGE_UPDATE" => Self::MessageUpdate,
            b"MESSAGE_DELETE" => Self::MessageDelete,
            b"GUILD_CREATE" => Self::GuildCreate,
            b"GUILD_DELETE" => Self::GuildDelete,
            b"READY" => Self::Ready,
            b"RESUMED" => Self::Resumed,
            _ => Self::Other,
        }
    }
}

/// Opcode of a dispatch.
pub const OP_DISPATCH: i64 = 0;
/// Opcode of `INVALID_SESSION`.
pub const OP_INVALID_SESSION: i64 = 9;
/// Opcode of HELLO.
pub const OP_HELLO: i64 = 10;

/// What was learned from one message. Spans index the scanned payload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// `op`.
    pub op: i64,
    /// `s` (None when null or absent).
    pub seq: Option<i64>,
    /// Span of the raw `t` string contents (between the quotes), None when null/absent.
    pub t: Option<Range<usize>>,
    /// True when `t` contains a backslash escape (then use [`unescape`]).
    pub t_escaped: bool,
    /// Span of the raw `d` value, None when absent.
    pub d: Option<Range<usize>>,
    /// Kind from `op` and `t`.
    pub kind: Option<Kind>,
    /// HELLO: `d.heartbeat_interval`.
    pub heartbeat_interval: Option<u64>,
    /// READY: `d.session_id`, unescaped.
    pub session_id: Option<String>,
    /// READY: `d.resume_gateway_url`, unescaped.
    pub resume_gateway_url: Option<String>,
    /// READY: ids of `d.guilds`.
    pub guild_ids: Option<Vec<u64>>,
    /// `GUILD_CREATE` / `GUILD_DELETE`: `d.id`.
    pub guild_id: Option<u64>,
    /// `GUILD_CREATE` / `GUILD_DELETE`: `d.unavailable`.
    pub unavailable: Option<bool>,
    /// `INVALID_SESSION`: `d`.
    pub resumable: Option<bool>,
    /// `MESSAGE_*`: `d.id`.
    pub message_id: Option<u64>,
    /// `MESSAGE_CREATE` / `MESSAGE_UPDATE`: raw span of the `content` value (escapes kept).
    pub content: Option<Range<usize>>,
    /// `MESSAGE_CREATE` / `MESSAGE_UPDATE`: raw span of the `edited_timestamp` value.
    pub edited_timestamp: Option<Range<usize>>,
}

impl Scan {
    /// The kind, `Other` when unknown.
    pub fn kind(&self) -> Kind {
        self.kind.unwrap_or(Kind::Other)
    }
}

/// Which fields of `d` a message needs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Need {
    Nothing,
    Hello,
    InvalidSession,
    Ready,
    Guild,
    Message,
}

impl Need {
    fn of(op: i64, kind: Kind) -> Self {
        match (op, kind) {
            (OP_HELLO, _) => Self::Hello,
            (OP_INVALID_SESSION, _) => Self::InvalidSession,
            (OP_DISPATCH, Kind::Ready) => Self::Ready,
            (OP_DISPATCH, Kind::GuildCreate | Kind::GuildDelete) => Self::Guild,
            (OP_DISPATCH, Kind::MessageCreate | Kind::MessageUpdate | Kind::MessageDelete) => {
                Self::Message
            }
            _ => Self::Nothing,
        }
    }
}

/// Deepest nesting accepted (as orjson).
pub const MAX_DEPTH: usize = 1024;

/// Scans one complete gateway message.
///
/// # Errors
/// [`Error::Payload`] with the offset and what was expected there.
pub fn scan(buf: &[u8]) -> Result<Scan> {
    let mut p = Parser { b: buf, i: 0 };
    let mut out = Scan::default();
    let mut op: Option<i64> = None;
    let mut deferred_d: Option<Range<usize>> = None;
    p.ws();
    p.expect(b'{', "'{' (the message must be a JSON object)")?;
    p.ws();
    if p.peek() == Some(b'}') {
        return Err(Error::payload(p.i, "the 'op' key"));
    }
    loop {
        p.ws();
        let key = p.key()?;
        p.ws();
        match key {
            b"op" => {
                let at = p.i;
                let v = p
                    .int()
                    .map_err(|_| Error::payload(at, "an integer for 'op'"))?;
                op = Some(v);
            }
            b"s" => {
                let at = p.i;
                out.seq = if p.null() {
                    None
                } else {
                    Some(
                        p.int()
                            .map_err(|_| Error::payload(at, "an integer or null for 's'"))?,
                    )
                };
            }
            b"t" => {
                if p.null() {
                    out.t = None;
                    out.t_escaped = false;
                } else if p.peek() == Some(b'"') {
                    let (span, esc) = p.string()?;
                    out.t = Some(span);
                    out.t_escaped = esc;
                } else {
                    return Err(Error::payload(p.i, "a string or null for 't'"));
                }
            }
            b"d" => {
                let start = p.i;
                // With op (and t, for a dispatch) known, read d's fields in this pass.
                if let Some(op) = op.filter(|&o| o != OP_DISPATCH || out.t.is_some()) {
                    let need = Need::of(op, kind_of(buf, op, &out));
                    p.d_fields(need, &mut out)?;
                    deferred_d = None;
                } else {
                    p.skip_value()?;
                    deferred_d = Some(start..p.i);
                }
                out.d = Some(start..p.i);
            }
            _ => p.skip_value()?,
        }
        p.ws();
        match p.peek() {
            Some(b',') => p.i += 1,
            Some(b'}') => {
                p.i += 1;
                break;
            }
            _ => return Err(Error::payload(p.i, "',' or '}' after a top-level value")),
        }
    }
    p.ws();
    if p.i != buf.len() {
        return Err(Error::payload(
            p.i,
            "end of message after the top-level object",
        ));
    }
    let Some(op) = op else {
        return Err(Error::payload(buf.len(), "the 'op' key"));
    };
    out.op = op;
    let kind = kind_of(buf, op, &out);
    out.kind = Some(kind);
    if let Some(span) = deferred_d {
        let need = Need::of(op, kind);
        if need != Need::Nothing {
            let mut q = Parser {
                b: &buf[..span.end],
                i: span.start,
            };
            q.d_fields(need, &mut out)?;
        }
    }
    Ok(out)
}

fn kind_of(buf: &[u8], op: i64, s: &Scan) -> Kind {
    if op != OP_DISPATCH {
        return Kind::Other;
    }
    match &s.t {
        Some(t) if !s.t_escaped => Kind::from_t(&buf[t.clone()]),
        Some(t) => unescape(&buf[t.clone()], t.start)
            .map_or(Kind::Other, |name| Kind::from_t(name.as_bytes())),
        None => Kind::Other,
    }
}

/// Byte classes for the structural skip.
const C_NONE: u8 = 0;
const C_QUOTE: u8 = 1;
const C_OPEN: u8 = 2;
const C_CLOSE: u8 = 3;

static CLASS: [u8; 256] = {
    let mut t = [C_NONE; 256];
    t[b'"' as usize] = C_QUOTE;
    t[b'{' as usize] = C_OPEN;
    t[b'[' as usize] = C_OPEN;
    t[b'}' as usize] = C_CLOSE;
    t[b']' as usize] = C_CLOSE;
    t
};

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Parser<'a> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline]
    fn ws(&mut self) {
        while let Some(&c) = self.b.get(self.i) {
            if matches!(c, b' ' | b'\n' | b'\r' | b'\t') {
                self.i += 1;
            } else {
                break;
            }
        }
    }

    #[inline]
    fn expect(&mut self, c: u8, what: &'static str) -> Result<()> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(Error::payload(self.i, what))
        }
    }

    /// Consumes `null` if it is next.
    #[inline]
    fn null(&mut self) -> bool {
        if self.b[self.i..].starts_with(b"null") {
            self.i += 4;
            true
        } else {
            false
        }
    }

    /// An object key and its colon; returns the raw key bytes.
    #[inline]
    fn key(&mut self) -> Result<&'a [u8]> {
        if self.peek() != Some(b'"') {
            return Err(Error::payload(self.i, "a string key"));
        }
        let (span, _) = self.string()?;
        self.ws();
        self.expect(b':', "':' after an object key")?;
        self.ws();
        Ok(&self.b[span])
    }

    /// A string at `self.i` (which is a quote): returns the span between the quotes and
    /// whether it contains escapes.
    #[inline]
    fn string(&mut self) -> Result<(Range<usize>, bool)> {
        let start = self.i + 1;
        let mut j = start;
        let mut escaped = false;
        loop {
            match memchr2(b'"', b'\\', &self.b[j..]) {
                Some(k) => {
                    let at = j + k;
                    if self.b[at] == b'"' {
                        self.i = at + 1;
                        return Ok((start..at, escaped));
                    }
                    escaped = true;
                    j = at + 2;
                    if j > self.b.len() {
                        return Err(Error::payload(self.b.len(), "a closing '\"'"));
                    }
                }
                None => return Err(Error::payload(self.b.len(), "a closing '\"'")),
            }
        }
    }

    /// A JSON integer (no fraction or exponent).
    #[inline]
    fn int(&mut self) -> Result<i64> {
        let start = self.i;
        let neg = self.peek() == Some(b'-');
        if neg {
            self.i += 1;
        }
        let mut v: i64 = 0;
        let digits = self.i;
        while let Some(c @ b'0'..=b'9') = self.peek() {
            let d = i64::from(c - b'0');
            v = v
                .checked_mul(10)
                .and_then(|v| {
                    if neg {
                        v.checked_sub(d)
                    } else {
                        v.checked_add(d)
                    }
                })
                .ok_or_else(|| Error::payload(start, "an integer that fits in 64 bits"))?;
            self.i += 1;
        }
        if self.i == digits || matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return Err(Error::payload(start, "an integer"));
        }
        Ok(v)
    }

    /// A snowflake: a JSON string of a u64 (a bare integer is accepted too).
    fn snowflake(&mut self) -> Result<u64> {
        let at = self.i;
        let bad = || Error::payload(at, "a snowflake (a string of digits)");
        let quoted = self.peek() == Some(b'"');
        if quoted {
            self.i += 1;
        }
        let digits = self.i;
        let mut v: u64 = 0;
        while let Some(c @ b'0'..=b'9') = self.peek() {
            v = v
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(c - b'0')))
                .ok_or_else(bad)?;
            self.i += 1;
        }
        if self.i == digits {
            return Err(bad());
        }
        if quoted {
            if self.peek() != Some(b'"') {
                return Err(bad());
            }
            self.i += 1;
        } else if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return Err(bad());
        }
        Ok(v)
    }

    fn boolean(&mut self, what: &'static str) -> Result<bool> {
        if self.b[self.i..].starts_with(b"true") {
            self.i += 4;
            Ok(true)
        } else if self.b[self.i..].starts_with(b"false") {
            self.i += 5;
            Ok(false)
        } else {
            Err(Error::payload(self.i, what))
        }
    }

    /// A string value, unescaped.
    fn text(&mut self, what: &'static str) -> Result<String> {
        if self.peek() != Some(b'"') {
            return Err(Error::payload(self.i, what));
        }
        let (span, escaped) = self.string()?;
        let raw = &self.b[span.clone()];
        if escaped {
            unescape(raw, span.start)
        } else {
            std::str::from_utf8(raw)
                .map(str::to_owned)
                .map_err(|e| Error::payload(span.start + e.valid_up_to(), "valid UTF-8"))
        }
    }

    /// Skips any JSON value; containers are only bracket-matched.
    #[inline]
    fn skip_value(&mut self) -> Result<()> {
        match self.peek() {
            Some(b'"') => self.string().map(|_| ()),
            Some(b'{' | b'[') => self.skip_container(),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => {
                let start = self.i;
                self.i += 1;
                while let Some(b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') = self.peek() {
                    self.i += 1;
                }
                if self.b[start] == b'-' && self.i == start + 1 {
                    return Err(Error::payload(start, "a number"));
                }
                Ok(())
            }
            _ => Err(Error::payload(self.i, "a JSON value")),
        }
    }

    fn literal(&mut self, lit: &'static [u8]) -> Result<()> {
        if self.b[self.i..].starts_with(lit) {
            self.i += lit.len();
            Ok(())
        } else {
            Err(Error::payload(self.i, "true, false or null"))
        }
    }

    /// Skips an object or array starting at `self.i` by matching brackets outside strings.
    fn skip_container(&mut self) -> Result<()> {
        // One bit per level: 1 = object, 0 = array.
        let mut stack = [0u64; MAX_DEPTH / 64];
        let mut depth = 0usize;
        let b = self.b;
        let mut i = self.i;
        loop {
            let Some(&c) = b.get(i) else {
                return Err(Error::payload(
                    b.len(),
                    "a closing '}' or ']' (truncated message)",
                ));
            };
            match CLASS[c as usize] {
                C_NONE => i += 1,
                C_QUOTE => {
                    self.i = i;
                    self.string()?;
                    i = self.i;
                }
                C_OPEN => {
                    if depth == MAX_DEPTH {
                        return Err(Error::payload(i, "nesting at most 1024 levels deep"));
                    }
                    let bit = 1u64 << (depth % 64);
                    if c == b'{' {
                        stack[depth / 64] |= bit;
                    } else {
                        stack[depth / 64] &= !bit;
                    }
                    depth += 1;
                    i += 1;
                }
                _ => {
                    if depth == 0 {
                        return Err(Error::payload(i, "a value, not a closing bracket"));
                    }
                    depth -= 1;
                    let is_obj = stack[depth / 64] & (1u64 << (depth % 64)) != 0;
                    if is_obj != (c == b'}') {
                        return Err(Error::payload(
                            i,
                            if is_obj {
                                "'}' to close an object"
                            } else {
                                "']' to close an array"
                            },
                        ));
                    }
                    i += 1;
                    if depth == 0 {
                        self.i = i;
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Walks the top level of an object, calling `f(key, parser)` at each value; `f` must
    /// consume the value.
    #[inline]
    fn object(
        &mut self,
        what: &'static str,
        mut f: impl FnMut(&[u8], &mut Self) -> Result<()>,
    ) -> Result<()> {
        self.expect(b'{', what)?;
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.ws();
            let key = self.key()?;
            f(key, self)?;
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(Error::payload(self.i, "',' or '}' in an object")),
            }
        }
    }

    /// Reads the fields `need` asks for from `d`, consuming it.
    fn d_fields(&mut self, need: Need, out: &mut Scan) -> Result<()> {
        match need {
            Need::Nothing => self.skip_value(),
            Need::InvalidSession => {
                out.resumable = Some(self.boolean("true or false for 'd' of INVALID_SESSION")?);
                Ok(())
            }
            Need::Hello => self.object("an object for 'd' of HELLO", |k, p| {
                if k == b"heartbeat_interval" {
                    let at = p.i;
                    let v = p.int()?;
                    out.heartbeat_interval = Some(
                        u64::try_from(v)
                            .map_err(|_| Error::payload(at, "a positive heartbeat_interval"))?,
                    );
                    Ok(())
                } else {
                    p.skip_value()
                }
            }),
            Need::Ready => self.object("an object for 'd' of READY", |k, p| match k {
                b"session_id" => {
                    out.session_id = Some(p.text("a string for 'session_id'")?);
                    Ok(())
                }
                b"resume_gateway_url" => {
                    out.resume_gateway_url = Some(p.text("a string for 'resume_gateway_url'")?);
                    Ok(())
                }
                b"guilds" => {
                    out.guild_ids = Some(p.guild_list()?);
                    Ok(())
                }
                _ => p.skip_value(),
            }),
            Need::Guild => self.object("an object for 'd' of a guild event", |k, p| match k {
                b"id" => {
                    out.guild_id = Some(p.snowflake()?);
                    Ok(())
                }
                b"unavailable" => {
                    out.unavailable = if p.null() {
                        None
                    } else {
                        Some(p.boolean("true or false for 'unavailable'")?)
                    };
                    Ok(())
                }
                _ => p.skip_value(),
            }),
            Need::Message => self.object("an object for 'd' of a message event", |k, p| match k {
                b"id" => {
                    out.message_id = Some(p.snowflake()?);
                    Ok(())
                }
                b"content" => {
                    let start = p.i;
                    p.skip_value()?;
                    out.content = Some(start..p.i);
                    Ok(())
                }
                b"edited_timestamp" => {
                    let start = p.i;
                    p.skip_value()?;
                    out.edited_timestamp = Some(start..p.i);
                    Ok(())
                }
                _ => p.skip_value(),
            }),
        }
    }

    /// READY's `guilds`: an array of objects with an `id` each.
    fn guild_list(&mut self) -> Result<Vec<u64>> {
        let mut ids = Vec::new();
        self.expect(b'[', "an array for 'guilds'")?;
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(ids);
        }
        loop {
            self.ws();
            let mut id = None;
            self.object("an object in 'guilds'", |k, p| {
                if k == b"id" {
                    id = Some(p.snowflake()?);
                    Ok(())
                } else {
                    p.skip_value()
                }
            })?;
            ids.push(id.ok_or_else(|| Error::payload(self.i, "an 'id' in each guild of READY"))?);
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(ids);
                }
                _ => return Err(Error::payload(self.i, "',' or ']' in 'guilds'")),
            }
        }
    }
}

/// Decodes the raw contents of a JSON string (between the quotes). `at` is the offset of
/// `raw` in the message, for error reports.
///
/// # Errors
/// A bad escape, a lone surrogate or invalid UTF-8.
pub fn unescape(raw: &[u8], at: usize) -> Result<String> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let Some(k) = memchr::memchr(b'\\', &raw[i..]) else {
            out.extend_from_slice(&raw[i..]);
            break;
        };
        out.extend_from_slice(&raw[i..i + k]);
        i += k;
        let esc = raw.get(i + 1).copied();
        i += 2;
        let c = match esc {
            Some(b'"') => b'"',
            Some(b'\\') => b'\\',
            Some(b'/') => b'/',
            Some(b'b') => 0x08,
            Some(b'f') => 0x0c,
            Some(b'n') => b'\n',
            Some(b'r') => b'\r',
            Some(b't') => b'\t',
            Some(b'u') => {
                let hi =
                    hex4(raw, i).ok_or_else(|| Error::payload(at + i, "4 hex digits after \\u"))?;
                i += 4;
                let cp = if (0xD800..0xDC00).contains(&hi) {
                    let lo = if raw.get(i..i + 2) == Some(b"\\u") {
                        hex4(raw, i + 2)
                    } else {
                        None
                    };
                    match lo {
                        Some(lo) if (0xDC00..0xE000).contains(&lo) => {
                            i += 6;
                            0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                        }
                        _ => return Err(Error::payload(at + i, "a low surrogate \\uDC00-\\uDFFF")),
                    }
                } else if (0xDC00..0xE000).contains(&hi) {
                    return Err(Error::payload(
                        at + i - 6,
                        "a high surrogate before a low one",
                    ));
                } else {
                    hi
                };
                let ch = char::from_u32(cp)
                    .ok_or_else(|| Error::payload(at + i, "a valid code point"))?;
                let mut tmp = [0u8; 4];
                out.extend_from_slice(ch.encode_utf8(&mut tmp).as_bytes());
                continue;
            }
            _ => return Err(Error::payload(at + i - 1, "a valid escape after '\\'")),
        };
        out.push(c);
    }
    String::from_utf8(out)
        .map_err(|e| Error::payload(at + e.utf8_error().valid_up_to(), "valid UTF-8"))
}

fn hex4(raw: &[u8], i: usize) -> Option<u32> {
    let h = raw.get(i..i + 4)?;
    let mut v = 0u32;
    for &c in h {
        v = v * 16 + (c as char).to_digit(16)?;
    }
    Some(v)
}
