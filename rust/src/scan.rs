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
/// Opcode of `HEARTBEAT_ACK`.
pub const OP_HEARTBEAT_ACK: i64 = 11;

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
    if let Some(s) = scan_discord_layout(buf) {
        return Ok(s);
    }
    scan_any_layout(buf)
}

/// The envelope exactly as Discord lays it out, `{"t":…,"s":…,"op":…,"d":…}` without
/// whitespace, read without the general key loop; `None` (then [`scan_any_layout`] does
/// the work, and reports any error) for anything else, an escaped `t` or an error.
fn scan_discord_layout(buf: &[u8]) -> Option<Scan> {
    let mut p = Parser {
        b: buf,
        i: b"{\"t\":".len(),
    };
    let mut out = Scan::default();
    if !buf.starts_with(b"{\"t\":") {
        return None;
    }
    if !p.null() {
        if p.peek() != Some(b'"') {
            return None;
        }
        let (span, escaped) = p.short_string().ok()?;
        if escaped {
            return None;
        }
        out.t = Some(span);
    }
    p.literal_key(b",\"s\":")?;
    if !p.null() {
        out.seq = Some(p.int().ok()?);
    }
    p.literal_key(b",\"op\":")?;
    let op = p.int().ok()?;
    p.literal_key(b",\"d\":")?;
    let start = p.i;
    let kind = kind_of(buf, op, &out);
    p.d_fields(Need::of(op, kind), &mut out).ok()?;
    if p.i + 1 != buf.len() || buf[p.i] != b'}' {
        return None;
    }
    out.op = op;
    out.kind = Some(kind);
    out.d = Some(start..p.i);
    Some(out)
}

/// [`scan`] without the fast path for Discord's own layout: any valid envelope, keys in
/// any order, whitespace, unknown keys (public so tests can compare the two).
///
/// # Errors
/// As [`scan`].
pub fn scan_any_layout(buf: &[u8]) -> Result<Scan> {
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
                    let (span, esc) = p.short_string()?;
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

    /// Consumes `lit` if it is next.
    #[inline]
    fn literal_key(&mut self, lit: &[u8]) -> Option<()> {
        if self.b[self.i..].starts_with(lit) {
            self.i += lit.len();
            Some(())
        } else {
            None
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
        let (span, _) = self.short_string()?;
        self.ws();
        self.expect(b':', "':' after an object key")?;
        self.ws();
        Ok(&self.b[span])
    }

    /// [`Parser::string`] for strings that are usually short (keys, event names): a
    /// plain loop beats memchr's setup there.
    #[inline]
    fn short_string(&mut self) -> Result<(Range<usize>, bool)> {
        let start = self.i + 1;
        let end = self.b.len().min(start + 24);
        let mut k = start;
        while k < end {
            match self.b[k] {
                b'"' => {
                    self.i = k + 1;
                    return Ok((start..k, false));
                }
                b'\\' => break,
                _ => k += 1,
            }
        }
        self.string()
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

    /// A snowflake: a JSON string of a u64 (a bare integer is accepted too); `None` (with
    /// the position unspecified) for anything else.
    fn snowflake(&mut self) -> Option<u64> {
        let quoted = self.peek() == Some(b'"');
        if quoted {
            self.i += 1;
        }
        let digits = self.i;
        let mut v: u64 = 0;
        while let Some(c @ b'0'..=b'9') = self.peek() {
            v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
            self.i += 1;
        }
        if self.i == digits {
            return None;
        }
        if quoted {
            if self.peek() != Some(b'"') {
                return None;
            }
            self.i += 1;
        } else if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        Some(v)
    }

    /// `true` or `false`; `None` (position unchanged) for anything else.
    fn boolean(&mut self) -> Option<bool> {
        if self.b[self.i..].starts_with(b"true") {
            self.i += 4;
            Some(true)
        } else if self.b[self.i..].starts_with(b"false") {
            self.i += 5;
            Some(false)
        } else {
            None
        }
    }

    /// A string value, unescaped; `None` for a non-string or a bad escape.
    fn text(&mut self) -> Option<String> {
        if self.peek() != Some(b'"') {
            return None;
        }
        let (span, escaped) = self.string().ok()?;
        let raw = &self.b[span.clone()];
        if escaped {
            unescape(raw, span.start).ok()
        } else {
            std::str::from_utf8(raw).ok().map(str::to_owned)
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

    /// Skips an object or array starting at `self.i` (an opening bracket).
    #[inline]
    fn skip_container(&mut self) -> Result<()> {
        self.walk::<false>(0, &mut |_, _| Ok(false))
    }

    /// Skips an object or array starting at `self.i` (an opening bracket) by matching
    /// brackets outside strings, 64 bytes at a time: the block's quote, backslash and
    /// bracket bitmasks give the in-string mask by a prefix XOR (as in simdjson), so
    /// only the structural characters are visited one by one.
    ///
    /// With `KEYS`, `on_key(key, value)` is called with the raw key and the offset of the
    /// value for every key of the outermost object whose length is a bit set in
    /// `key_lens`; it reads the value on its own.
    fn walk<const KEYS: bool>(
        &mut self,
        key_lens: u64,
        on_key: &mut impl FnMut(&'a [u8], usize) -> Result<bool>,
    ) -> Result<()> {
        let b = self.b;
        let mut stack = [0u64; MAX_DEPTH / 64];
        let (mut depth, mut pos) = (0usize, self.i);
        let (mut prev_escaped, mut prev_in_string) = (0u64, 0u64);
        let (mut tail, mut keys_on) = ([b' '; 64], KEYS); // keys: until on_key has all
        while pos < b.len() {
            let block: &[u8; 64] = if let Some(full) = b.get(pos..pos + 64) {
                full.try_into()
                    .map_err(|_| Error::payload(pos, "a full block"))?
            } else {
                let rest = &b[pos..];
                tail[..rest.len()].copy_from_slice(rest);
                &tail
            };
            let m = block_masks(block);
            let escaped = if m.backslash | prev_escaped == 0 {
                0 // the common case: no backslash in or just before this block
            } else {
                find_escaped(m.backslash, &mut prev_escaped)
            };
            let quotes = m.quote & !escaped;
            let in_string = prefix_xor(quotes) ^ prev_in_string;
            prev_in_string = 0u64.wrapping_sub(in_string >> 63);
            let mut brackets = m.bracket & !in_string;
            // Colons are only needed while at depth 1: computed on first use per block.
            let mut colons: Option<u64> = None;
            // Depth only changes at brackets, so the colons of the outermost object are
            // those between brackets while the depth is 1.
            let mut from = 0u32;
            loop {
                let next = brackets.trailing_zeros();
                if keys_on && depth == 1 && stack[0] & 1 != 0 {
                    let all = *colons.get_or_insert_with(|| block_colons(block) & !in_string);
                    let mut keys = all & bits_between(from, next);
                    while keys != 0 {
                        let bit = keys.trailing_zeros();
                        keys &= keys - 1;
                        let at = pos + bit as usize;
                        let key = key_of_colon(b, pos, quotes, bit);
                        // Most keys are not wanted: their length alone says so.
                        if key.len() >= 64 || key_lens & (1u64 << key.len()) == 0 {
                            continue;
                        }
                        let mut v = at + 1;
                        while matches!(b.get(v), Some(b' ' | b'\n' | b'\r' | b'\t')) {
                            v += 1;
                        }
                        keys_on = !on_key(key, v)?;
                        if !keys_on {
                            break;
                        }
                    }
                }
                if next == 64 {
                    break;
                }
                brackets &= brackets - 1;
                from = next + 1;
                let bit = next as usize;
                let at = pos + bit;
                let is_brace = block[bit] & 0x20 != 0; // '{' and '}' have bit 5 set, '[' and ']' do not.
                                                       // '[' (5B) and '{' (7B) have bit 1 set, ']' (5D) and '}' (7D) do not.
                if block[bit] & 0x02 != 0 {
                    if depth == MAX_DEPTH {
                        return Err(Error::payload(at, "nesting at most 1024 levels deep"));
                    }
                    let word = &mut stack[depth / 64];
                    let flag = 1u64 << (depth % 64);
                    if is_brace {
                        *word |= flag;
                    } else {
                        *word &= !flag;
                    }
                    depth += 1;
                } else {
                    depth -= 1;
                    let is_obj = stack[depth / 64] & (1u64 << (depth % 64)) != 0;
                    if is_obj != is_brace {
                        let what = if is_obj {
                            "'}' to close an object"
                        } else {
                            "']' to close an array"
                        };
                        return Err(Error::payload(at, what));
                    }
                    if depth == 0 {
                        self.i = at + 1;
                        return Ok(());
                    }
                }
            }
            pos += 64;
        }
        if prev_in_string != 0 {
            Err(Error::payload(
                b.len(),
                "a closing '\"' (truncated message)",
            ))
        } else {
            Err(Error::payload(
                b.len(),
                "a closing '}' or ']' (truncated message)",
            ))
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
    ///
    /// A field of the wrong type (or `d` itself of the wrong type) is left absent
    /// (`None`) instead of failing the message: the event must still be forwarded. The
    /// structural check of the whole value is the same either way.
    fn d_fields(&mut self, need: Need, out: &mut Scan) -> Result<()> {
        match need {
            Need::Nothing => return self.skip_value(),
            Need::InvalidSession => {
                let at = self.i;
                out.resumable = self.boolean();
                if out.resumable.is_none() {
                    self.i = at;
                    self.skip_value()?;
                }
                return Ok(());
            }
            _ => {}
        }
        if self.peek() != Some(b'{') {
            return self.skip_value();
        }
        let b = self.b;
        let lens = |keys: &[&[u8]]| keys.iter().fold(0u64, |m, k| m | 1u64 << k.len());
        let key_lens = match need {
            Need::Hello => lens(&[b"heartbeat_interval"]),
            Need::Ready => lens(&[b"session_id", b"resume_gateway_url", b"guilds"]),
            Need::Guild => lens(&[b"id", b"unavailable"]),
            _ => lens(&[b"id", b"content", b"edited_timestamp"]),
        };
        let wanted: u8 = match need {
            Need::Hello => 0b1,
            Need::Guild => 0b11,
            _ => 0b111,
        };
        let mut seen = 0u8;
        self.walk::<true>(key_lens, &mut |key, at| {
            let mut p = Parser { b, i: at };
            // `walk` checks the structure of every value itself: a value the callback
            // cannot read is simply not extracted. Once every wanted key has been seen the
            // walk stops looking at keys (a later duplicate key is ignored).
            seen |= match (need, key) {
                (Need::Hello, b"heartbeat_interval") => {
                    out.heartbeat_interval = p.int().ok().and_then(|v| u64::try_from(v).ok());
                    0b1
                }
                (Need::Ready, b"session_id") => {
                    out.session_id = p.text();
                    0b1
                }
                (Need::Ready, b"resume_gateway_url") => {
                    out.resume_gateway_url = p.text();
                    0b10
                }
                (Need::Ready, b"guilds") => {
                    out.guild_ids = p.guild_list();
                    0b100
                }
                (Need::Guild, b"id") => {
                    out.guild_id = p.snowflake();
                    0b1
                }
                (Need::Guild, b"unavailable") => {
                    out.unavailable = p.boolean();
                    0b10
                }
                (Need::Message, b"id") => {
                    out.message_id = p.snowflake();
                    0b1
                }
                (Need::Message, b"content") => {
                    out.content = p.skip_value().ok().map(|()| at..p.i);
                    0b10
                }
                (Need::Message, b"edited_timestamp") => {
                    out.edited_timestamp = p.skip_value().ok().map(|()| at..p.i);
                    0b100
                }
                _ => 0,
            };
            Ok(seen == wanted)
        })
    }

    /// READY's `guilds`: the ids of an array of objects. An element without a valid
    /// `id` is skipped; `None` when `guilds` is not an array of that shape.
    fn guild_list(&mut self) -> Option<Vec<u64>> {
        if self.peek() != Some(b'[') {
            return None;
        }
        self.i += 1;
        let mut ids = Vec::new();
        self.ws();
        if self.peek() == Some(b']') {
            return Some(ids);
        }
        loop {
            self.ws();
            if self.peek() == Some(b'{') {
                let mut id = None;
                self.object("an object in 'guilds'", |k, p| {
                    if k != b"id" {
                        return p.skip_value();
                    }
                    let at = p.i;
                    id = p.snowflake();
                    if id.is_none() {
                        p.i = at;
                        p.skip_value()?;
                    }
                    Ok(())
                })
                .ok()?;
                ids.extend(id);
            } else {
                self.skip_value().ok()?;
            }
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Some(ids);
                }
                _ => return None,
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

/// Bitmasks (bit i = byte i) of one 64-byte block.
struct Masks {
    quote: u64,
    backslash: u64,
    /// Any of `{}[]`.
    bracket: u64,
}

/// SIMD version: AVX2 when the CPU has it (detected once, then a cached flag), else SSE2,
/// which is part of the `x86_64` baseline.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
#[inline]
#[allow(unsafe_code)]
fn block_masks(block: &[u8; 64]) -> Masks {
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 support was just detected at run time.
        unsafe { avx2::masks(block) }
    } else {
        // SAFETY: the only requirement of a `#[target_feature(enable = "sse2")]` function is
        // that the CPU supports SSE2, which the cfg above guarantees at compile time.
        unsafe { sse2::masks(block) }
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
mod avx2 {
    use std::arch::x86_64::{
        __m256i, _mm256_cmpeq_epi8, _mm256_movemask_epi8, _mm256_or_si256, _mm256_set1_epi8,
        _mm256_set_epi64x,
    };

    use super::Masks;

    #[inline]
    #[target_feature(enable = "avx2")]
    fn lane(block: &[u8; 64], k: usize) -> __m256i {
        let w = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&block[k * 32 + i * 8..k * 32 + i * 8 + 8]);
            i64::from_le_bytes(x)
        };
        _mm256_set_epi64x(w(3), w(2), w(1), w(0))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    #[allow(clippy::cast_sign_loss)]
    fn bits(x: __m256i, k: usize) -> u64 {
        u64::from(_mm256_movemask_epi8(x) as u32) << (32 * k)
    }

    #[target_feature(enable = "avx2")]
    #[allow(clippy::cast_possible_wrap)]
    pub(super) fn masks(block: &[u8; 64]) -> Masks {
        let quote = _mm256_set1_epi8(b'"' as i8);
        let backslash = _mm256_set1_epi8(b'\\' as i8);
        let open = _mm256_set1_epi8(b'{' as i8);
        let close = _mm256_set1_epi8(b'}' as i8);
        let lower = _mm256_set1_epi8(0x20);
        let mut m = Masks {
            quote: 0,
            backslash: 0,
            bracket: 0,
        };
        for k in 0..2 {
            let v = lane(block, k);
            let l = _mm256_or_si256(v, lower);
            m.quote |= bits(_mm256_cmpeq_epi8(v, quote), k);
            m.backslash |= bits(_mm256_cmpeq_epi8(v, backslash), k);
            m.bracket |= bits(
                _mm256_or_si256(_mm256_cmpeq_epi8(l, open), _mm256_cmpeq_epi8(l, close)),
                k,
            );
        }
        m
    }
}

/// The colons of a block.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
#[inline]
#[allow(unsafe_code)]
fn block_colons(block: &[u8; 64]) -> u64 {
    // SAFETY: as for `block_masks`.
    unsafe { sse2::eq_mask(block, b':') }
}

#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
mod sse2 {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8, _mm_set_epi64x,
    };

    use super::Masks;

    #[inline]
    #[target_feature(enable = "sse2")]
    fn lane(block: &[u8; 64], k: usize) -> __m128i {
        let mut lo = [0u8; 8];
        let mut hi = [0u8; 8];
        lo.copy_from_slice(&block[k * 16..k * 16 + 8]);
        hi.copy_from_slice(&block[k * 16 + 8..k * 16 + 16]);
        _mm_set_epi64x(i64::from_le_bytes(hi), i64::from_le_bytes(lo))
    }

    #[inline]
    #[target_feature(enable = "sse2")]
    #[allow(clippy::cast_sign_loss)] // movemask bits
    fn bits(x: __m128i, k: usize) -> u64 {
        u64::from(_mm_movemask_epi8(x) as u16) << (16 * k)
    }

    #[inline]
    #[target_feature(enable = "sse2")]
    #[allow(clippy::cast_possible_wrap)] // byte patterns
    pub(super) fn eq_mask(block: &[u8; 64], byte: u8) -> u64 {
        let pattern = _mm_set1_epi8(byte as i8);
        let mut m = 0;
        for k in 0..4 {
            m |= bits(_mm_cmpeq_epi8(lane(block, k), pattern), k);
        }
        m
    }

    #[inline]
    #[target_feature(enable = "sse2")]
    #[allow(clippy::cast_possible_wrap)] // byte patterns
    pub(super) fn masks(block: &[u8; 64]) -> Masks {
        let quote = _mm_set1_epi8(b'"' as i8);
        let backslash = _mm_set1_epi8(b'\\' as i8);
        let open = _mm_set1_epi8(b'{' as i8);
        let close = _mm_set1_epi8(b'}' as i8);
        // '[' | 0x20 == '{' and ']' | 0x20 == '}'; no other byte maps onto those.
        let lower = _mm_set1_epi8(0x20);
        let mut m = Masks {
            quote: 0,
            backslash: 0,
            bracket: 0,
        };
        let mut any_backslash = _mm_set1_epi8(0);
        for k in 0..4 {
            let v = lane(block, k);
            let l = _mm_or_si128(v, lower);
            m.quote |= bits(_mm_cmpeq_epi8(v, quote), k);
            any_backslash = _mm_or_si128(any_backslash, _mm_cmpeq_epi8(v, backslash));
            m.bracket |= bits(
                _mm_or_si128(_mm_cmpeq_epi8(l, open), _mm_cmpeq_epi8(l, close)),
                k,
            );
        }
        // Most blocks have no backslash: one test instead of four masks.
        if _mm_movemask_epi8(any_backslash) != 0 {
            m.backslash = eq_mask(block, b'\\');
        }
        m
    }
}

/// Portable version (LLVM vectorises it where the target has SIMD).
#[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
#[inline]
fn block_masks(block: &[u8; 64]) -> Masks {
    scalar_masks(block)
}

/// Portable version of the colon mask.
#[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
#[inline]
fn block_colons(block: &[u8; 64]) -> u64 {
    scalar_eq(block, b':')
}

#[cfg_attr(all(target_arch = "x86_64", target_feature = "sse2"), allow(dead_code))]
#[inline]
fn scalar_eq(block: &[u8; 64], byte: u8) -> u64 {
    let mut m = 0;
    for (j, &c) in block.iter().enumerate() {
        m |= u64::from(c == byte) << j;
    }
    m
}

#[cfg_attr(all(target_arch = "x86_64", target_feature = "sse2"), allow(dead_code))]
#[inline]
fn scalar_masks(block: &[u8; 64]) -> Masks {
    let mut m = Masks {
        quote: 0,
        backslash: 0,
        bracket: 0,
    };
    for (j, &c) in block.iter().enumerate() {
        m.quote |= u64::from(c == b'"') << j;
        m.backslash |= u64::from(c == b'\\') << j;
        m.bracket |= u64::from(c | 0x20 == b'{' || c | 0x20 == b'}') << j;
    }
    m
}

/// Bits of the bytes escaped by a backslash, carrying odd backslash runs across blocks
/// (simdjson's branchless algorithm).
#[inline]
fn find_escaped(backslash: u64, prev_escaped: &mut u64) -> u64 {
    const EVEN: u64 = 0x5555_5555_5555_5555;
    let backslash = backslash & !*prev_escaped;
    let follows_escape = (backslash << 1) | *prev_escaped;
    let odd_starts = backslash & !EVEN & !follows_escape;
    let (even_starts, overflow) = odd_starts.overflowing_add(backslash);
    *prev_escaped = u64::from(overflow);
    (EVEN ^ (even_starts << 1)) & follows_escape
}

/// Bit i = XOR of bits 0..=i: 1 inside strings (opening quote included).
#[inline]
fn prefix_xor(mut x: u64) -> u64 {
    x ^= x << 1;
    x ^= x << 2;
    x ^= x << 4;
    x ^= x << 8;
    x ^= x << 16;
    x ^= x << 32;
    x
}

/// The raw key before the structural colon at bit `bit` of the block at `pos` whose real
/// (unescaped) quotes are `quotes`.
#[inline]
fn key_of_colon(b: &[u8], pos: usize, quotes: u64, bit: u32) -> &[u8] {
    // Compact JSON: the key's quotes are the last two real quotes before the colon,
    // usually in this block.
    let before = quotes & bits_between(0, bit);
    if bit > 0 && before >> (bit - 1) == 1 && before.count_ones() >= 2 {
        let open = (before & !(1u64 << (bit - 1))).ilog2() as usize;
        &b[pos + open + 1..pos + bit as usize - 1]
    } else {
        key_at(b, pos + bit as usize)
    }
}

/// The raw key of the string just before the structural colon at `colon`; empty when
/// the key has escapes (no key the codec reads has any).
#[inline]
fn key_at(b: &[u8], colon: usize) -> &[u8] {
    let mut end = colon;
    while end > 0 && matches!(b[end - 1], b' ' | b'\n' | b'\r' | b'\t') {
        end -= 1;
    }
    // b[end - 1] is the closing quote. A raw quote inside a key is always escaped, so
    // the previous quote is the opening one unless a backslash precedes it.
    let Some(close) = end.checked_sub(1) else {
        return &[];
    };
    let mut open = close;
    while open > 0 {
        open -= 1;
        if b[open] == b'"' {
            if open > 0 && b[open - 1] == b'\\' {
                return &[];
            }
            return &b[open + 1..close];
        }
    }
    &[]
}

/// Bits `from..to` of a block (`from <= to <= 64`).
#[inline]
fn bits_between(from: u32, to: u32) -> u64 {
    let below_to = if to >= 64 { u64::MAX } else { (1u64 << to) - 1 };
    let below_from = if from >= 64 {
        u64::MAX
    } else {
        (1u64 << from) - 1
    };
    below_to & !below_from
}

/// What a message without `d` hashes as in [`d_hash`]: the same as `"d":null`.
pub const NO_D: &[u8] = b"null";

/// The identity of a `d` value: XXH3-64 (seed 0) of its raw JSON text exactly as it
/// appears in the payload, or of [`NO_D`] when there is none. Seedless and specified
/// (the same bytes give the same hash in every process, version and machine), so two
/// sessions that receive the same event (a reshard) can tell it is the same one.
pub fn d_hash(d: Option<&[u8]>) -> u64 {
    xxhash_rust::xxh3::xxh3_64(d.unwrap_or(NO_D))
}

/// The top-level key of `d` that names the guild a message belongs to: `id` for
/// `GUILD_CREATE`, `GUILD_UPDATE` and `GUILD_DELETE`, `guild_id` for any other dispatch,
/// `None` for other opcodes (nothing to route). `t` is the unescaped event name.
pub fn route_key(op: i64, t: Option<&[u8]>) -> Option<&'static [u8]> {
    if op != OP_DISPATCH {
        return None;
    }
    Some(match t {
        Some(b"GUILD_CREATE" | b"GUILD_UPDATE" | b"GUILD_DELETE") => b"id",
        _ => b"guild_id",
    })
}

/// The snowflake under `key` at the top level of the object `buf[d]`: a JSON string of
/// ASCII digits (escapes decoded) or a bare non-negative integer, that fits in a `u64`.
/// As JSON parsers do, the last of duplicate keys wins. `None` when the key is absent,
/// its value is anything else, or `buf[d]` is not an object (or is malformed); never
/// an error. Only the top level is walked; nested values are skipped structurally, and
/// keys are compared as raw bytes (a key spelled with escapes is not recognised).
pub fn top_level_snowflake(buf: &[u8], d: Range<usize>, key: &[u8]) -> Option<u64> {
    if key.is_empty() || key.len() >= 64 {
        return None;
    }
    let b = buf.get(..d.end)?;
    let mut p = Parser { b, i: d.start };
    if p.peek() != Some(b'{') {
        return None;
    }
    let mut found = None;
    p.walk::<true>(1u64 << key.len(), &mut |k, at| {
        if k == key {
            found = Parser { b, i: at }.routing_snowflake();
        }
        Ok(false) // keep walking: a later duplicate overrides
    })
    .ok()?;
    found
}

/// The guild a scanned message belongs to, for routing (see [`route_key`] and
/// [`top_level_snowflake`]); `buf` is the payload `scan` indexes.
pub fn route_guild_id(buf: &[u8], scan: &Scan) -> Option<u64> {
    let unescaped;
    let t = match &scan.t {
        Some(raw) if scan.t_escaped => {
            unescaped = unescape(buf.get(raw.clone())?, raw.start).ok()?;
            Some(unescaped.as_bytes())
        }
        Some(raw) => Some(buf.get(raw.clone())?),
        None => None,
    };
    top_level_snowflake(buf, scan.d.clone()?, route_key(scan.op, t)?)
}

impl Parser<'_> {
    /// A snowflake as [`top_level_snowflake`] accepts it; `None` for anything else.
    fn routing_snowflake(&mut self) -> Option<u64> {
        match self.peek()? {
            b'"' => {
                let (span, escaped) = self.string().ok()?;
                let raw = &self.b[span.clone()];
                if escaped {
                    digits_u64(unescape(raw, span.start).ok()?.as_bytes())
                } else {
                    digits_u64(raw)
                }
            }
            b'0'..=b'9' => {
                let start = self.i;
                while let Some(b'0'..=b'9') = self.peek() {
                    self.i += 1;
                }
                if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
                    return None;
                }
                digits_u64(&self.b[start..self.i])
            }
            _ => None,
        }
    }
}

/// A non-empty run of ASCII digits as a `u64`; `None` for anything else or an overflow.
fn digits_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |v, &c| {
        if c.is_ascii_digit() {
            v.checked_mul(10)?.checked_add(u64::from(c - b'0'))
        } else {
            None
        }
    })
}

/// Skips the JSON value at `buf[at..]` and returns where it ends (the structural skip
/// the scanner uses for everything it does not read); for tests and benches.
///
/// # Errors
/// As [`scan`].
pub fn skip_value_at(buf: &[u8], at: usize) -> Result<usize> {
    let mut p = Parser { b: buf, i: at };
    p.skip_value()?;
    Ok(p.i)
}

#[cfg(test)]
mod mask_tests {
    use super::{block_colons, block_masks, scalar_eq, scalar_masks};

    #[test]
    fn simd_and_portable_masks_agree() {
        let alphabet = b"\"\\{}[]:, aZy_\x7f\xff{";
        let mut state = 0x1234_5678_9abc_def0u64;
        for _ in 0..2000 {
            let mut block = [0u8; 64];
            for b in &mut block {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = alphabet[(state % alphabet.len() as u64) as usize];
            }
            let (a, b) = (block_masks(&block), scalar_masks(&block));
            #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
            #[allow(unsafe_code)]
            {
                // SAFETY: SSE2 is guaranteed by the cfg; both SIMD versions are checked
                // whichever one `block_masks` picks on this machine.
                let c = unsafe { super::sse2::masks(&block) };
                assert_eq!(
                    (c.quote, c.backslash, c.bracket),
                    (b.quote, b.backslash, b.bracket)
                );
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: AVX2 support was just detected.
                    let d = unsafe { super::avx2::masks(&block) };
                    assert_eq!(
                        (d.quote, d.backslash, d.bracket),
                        (b.quote, b.backslash, b.bracket)
                    );
                }
            }
            assert_eq!(
                (a.quote, a.backslash, a.bracket),
                (b.quote, b.backslash, b.bracket)
            );
            assert_eq!(block_colons(&block), scalar_eq(&block, b':'));
        }
    }
}
