//! The little JSON the exec stream needs: events from the daemon (parsed) and
//! the request body (written). Strings are kept as code points, lone
//! surrogates included, as JavaScript holds them, so the texts said from them
//! are escaped as the Node CLI escapes them.

#[derive(Debug, Clone)]
pub enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(Vec<u32>),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            // the last of a repeated key, as JSON.parse keeps it
            Json::Obj(fields) => fields.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<String> {
        match self {
            Json::Str(s) => Some(s.iter().map(|&c| char::from_u32(c).unwrap_or('\u{fffd}')).collect()),
            _ => None,
        }
    }

    /// JavaScript truthiness
    pub fn truthy(&self) -> bool {
        match self {
            Json::Null => false,
            Json::Bool(b) => *b,
            Json::Num(n) => *n != 0.0 && !n.is_nan(),
            Json::Str(s) => !s.is_empty(),
            Json::Arr(_) | Json::Obj(_) => true,
        }
    }
}

pub fn parse(bytes: &[u8]) -> Option<Json> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut p = Parser { text, s: text.as_bytes(), i: 0, depth: 0 };
    let v = p.value()?;
    p.ws();
    (p.i == p.s.len()).then_some(v)
}

struct Parser<'a> {
    text: &'a str,
    s: &'a [u8],
    i: usize,
    depth: u32,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn eat(&mut self, lit: &[u8]) -> Option<()> {
        self.s[self.i..].starts_with(lit).then(|| self.i += lit.len())
    }

    fn value(&mut self) -> Option<Json> {
        self.ws();
        match *self.s.get(self.i)? {
            b'n' => self.eat(b"null").map(|_| Json::Null),
            b't' => self.eat(b"true").map(|_| Json::Bool(true)),
            b'f' => self.eat(b"false").map(|_| Json::Bool(false)),
            b'"' => self.string().map(Json::Str),
            b'[' => self.nested(|p| {
                let mut items = Vec::new();
                p.i += 1;
                p.ws();
                if p.eat(b"]").is_some() {
                    return Some(Json::Arr(items));
                }
                loop {
                    items.push(p.value()?);
                    p.ws();
                    if p.eat(b"]").is_some() {
                        return Some(Json::Arr(items));
                    }
                    p.eat(b",")?;
                }
            }),
            b'{' => self.nested(|p| {
                let mut fields = Vec::new();
                p.i += 1;
                p.ws();
                if p.eat(b"}").is_some() {
                    return Some(Json::Obj(fields));
                }
                loop {
                    p.ws();
                    if p.s.get(p.i) != Some(&b'"') {
                        return None;
                    }
                    let key: String = p.string()?.into_iter().map(|c| char::from_u32(c).unwrap_or('\u{fffd}')).collect();
                    p.ws();
                    p.eat(b":")?;
                    fields.push((key, p.value()?));
                    p.ws();
                    if p.eat(b"}").is_some() {
                        return Some(Json::Obj(fields));
                    }
                    p.eat(b",")?;
                }
            }),
            _ => self.number(),
        }
    }

    fn nested(&mut self, f: impl FnOnce(&mut Self) -> Option<Json>) -> Option<Json> {
        self.depth += 1;
        if self.depth > 256 {
            return None;
        }
        let v = f(self);
        self.depth -= 1;
        v
    }

    fn number(&mut self) -> Option<Json> {
        let start = self.i;
        while self.i < self.s.len() && matches!(self.s[self.i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
            self.i += 1;
        }
        let text = std::str::from_utf8(&self.s[start..self.i]).ok()?;
        let ok = {
            let t = text.strip_prefix('-').unwrap_or(text);
            let int_end = t.find(['.', 'e', 'E']).unwrap_or(t.len());
            let int = &t[..int_end];
            !int.is_empty() && int.bytes().all(|b| b.is_ascii_digit()) && (int == "0" || !int.starts_with('0'))
        };
        if !ok {
            return None;
        }
        text.parse::<f64>().ok().map(Json::Num)
    }

    fn hex4(&mut self) -> Option<u32> {
        let h = std::str::from_utf8(self.s.get(self.i..self.i + 4)?).ok()?;
        self.i += 4;
        u32::from_str_radix(h, 16).ok()
    }

    fn string(&mut self) -> Option<Vec<u32>> {
        self.i += 1; // the opening quote
        let mut out = Vec::new();
        loop {
            // self.i is always on a character boundary: it moves by whole characters and ASCII escapes
            let c = self.text.get(self.i..)?.chars().next()?;
            self.i += c.len_utf8();
            match c {
                '"' => return Some(out),
                '\\' => {
                    let e = *self.s.get(self.i)?;
                    self.i += 1;
                    let cp = match e {
                        b'"' => 0x22,
                        b'\\' => 0x5c,
                        b'/' => 0x2f,
                        b'b' => 0x08,
                        b'f' => 0x0c,
                        b'n' => 0x0a,
                        b'r' => 0x0d,
                        b't' => 0x09,
                        b'u' => {
                            let hi = self.hex4()?;
                            // a surrogate pair is one code point; a lone surrogate stays as it is
                            if (0xd800..0xdc00).contains(&hi) && self.s[self.i..].starts_with(b"\\u") {
                                let save = self.i;
                                self.i += 2;
                                match self.hex4() {
                                    Some(lo) if (0xdc00..0xe000).contains(&lo) => 0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00),
                                    _ => {
                                        self.i = save;
                                        hi
                                    }
                                }
                            } else {
                                hi
                            }
                        }
                        _ => return None,
                    };
                    out.push(cp);
                }
                c if (c as u32) < 0x20 => return None,
                c => out.push(c as u32),
            }
        }
    }
}

/// JSON.stringify of a string into `out`.
pub fn quote(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// String(n) for the numbers the daemon sends (integers and plain fractions).
pub fn js_number(n: f64) -> String {
    if n.is_nan() {
        return "NaN".into();
    }
    if n.is_infinite() {
        return if n > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if n == n.trunc() && n.abs() < 1e21 {
        return format!("{}", n as i64);
    }
    format!("{n}")
}
