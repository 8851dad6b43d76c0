//! JSON paths that name a place in a VM spec, and the line:column where that place is in the text.
//!
//! serde reports syntax and type errors with a position, but checks that run after parsing (a
//! file that does not exist, 0 vCPUs, memory that cannot be mapped) only know the field. This
//! module finds the field's value in the original text so those errors point at it too.

use std::fmt;

/// One step of a path: an object key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Key(&'static str),
    Index(usize),
}

/// A path from the document root, displayed as `machine-config.vcpu_count` or `drives[1].path`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JsonPath(pub Vec<Segment>);

impl JsonPath {
    /// A path of object keys.
    pub fn keys(keys: &[&'static str]) -> Self {
        Self(keys.iter().map(|k| Segment::Key(k)).collect())
    }
}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str(".");
        }
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Segment::Key(k) if i == 0 => write!(f, "{k}")?,
                Segment::Key(k) => write!(f, ".{k}")?,
                Segment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// The 1-based line and column where the value at `path` starts in `text`, if it is there.
pub fn locate(text: &str, path: &JsonPath) -> Option<(usize, usize)> {
    let mut scanner = Scanner {
        bytes: text.as_bytes(),
        pos: 0,
    };
    scanner.skip_ws();
    for seg in &path.0 {
        scanner.enter(seg)?;
    }
    let before = &text.as_bytes()[..scanner.pos];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let column = text[line_start..scanner.pos].chars().count() + 1;
    Some((line, column))
}

/// A forgiving JSON walker: it only needs to find positions in text that serde already accepted.
struct Scanner<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, b: u8) -> Option<()> {
        self.skip_ws();
        (self.peek()? == b).then(|| self.pos += 1)
    }

    /// Reads a string token and returns its raw (still escaped) contents.
    fn string(&mut self) -> Option<&[u8]> {
        self.eat(b'"')?;
        let start = self.pos;
        loop {
            match self.peek()? {
                b'\\' => self.pos += 2,
                b'"' => break,
                _ => self.pos += 1,
            }
        }
        let s = &self.bytes[start..self.pos];
        self.pos += 1;
        Some(s)
    }

    /// Skips one value of any kind.
    fn skip_value(&mut self) -> Option<()> {
        self.skip_ws();
        match self.peek()? {
            b'"' => self.string().map(|_| ()),
            open @ (b'{' | b'[') => {
                let close = if open == b'{' { b'}' } else { b']' };
                self.pos += 1;
                loop {
                    self.skip_ws();
                    if self.peek()? == close {
                        self.pos += 1;
                        return Some(());
                    }
                    if open == b'{' {
                        self.string()?;
                        self.eat(b':')?;
                    }
                    self.skip_value()?;
                    self.skip_ws();
                    if self.peek()? == b',' {
                        self.pos += 1;
                    }
                }
            }
            _ => {
                while !matches!(
                    self.peek(),
                    None | Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
                ) {
                    self.pos += 1;
                }
                Some(())
            }
        }
    }

    /// Moves to the start of the child value named by `seg` of the value at the current position.
    fn enter(&mut self, seg: &Segment) -> Option<()> {
        match seg {
            Segment::Key(key) => {
                self.eat(b'{')?;
                loop {
                    self.skip_ws();
                    let k = self.string()?;
                    let hit = k == key.as_bytes();
                    self.eat(b':')?;
                    self.skip_ws();
                    if hit {
                        return Some(());
                    }
                    self.skip_value()?;
                    self.eat(b',')?;
                }
            }
            Segment::Index(n) => {
                self.eat(b'[')?;
                for _ in 0..*n {
                    self.skip_value()?;
                    self.eat(b',')?;
                }
                self.skip_ws();
                Some(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"{
  "boot-source": {"kernel_image_path": "a\"b", "boot_args": "x y"},
  "machine-config": {
    "vcpu_count": 0,
    "nested": [1, {"k": [2, 3]}, "é"]
  }
}"#;

    #[test]
    fn finds_nested_keys_and_indices() {
        let p = JsonPath::keys(&["machine-config", "vcpu_count"]);
        assert_eq!(locate(DOC, &p), Some((4, 19)));
        let p = JsonPath::keys(&["boot-source", "boot_args"]);
        assert_eq!(locate(DOC, &p), Some((2, 61)));
        let mut p = JsonPath::keys(&["machine-config", "nested"]);
        p.0.push(Segment::Index(2));
        assert_eq!(locate(DOC, &p), Some((5, 34)));
    }

    #[test]
    fn missing_places_are_none() {
        assert_eq!(locate(DOC, &JsonPath::keys(&["drives"])), None);
        let mut p = JsonPath::keys(&["machine-config", "nested"]);
        p.0.push(Segment::Index(7));
        assert_eq!(locate(DOC, &p), None);
        assert_eq!(locate("not json", &JsonPath::keys(&["a"])), None);
    }

    #[test]
    fn displays_like_serde_path_to_error() {
        let mut p = JsonPath::keys(&["drives"]);
        p.0.push(Segment::Index(1));
        p.0.push(Segment::Key("path_on_host"));
        assert_eq!(p.to_string(), "drives[1].path_on_host");
        assert_eq!(JsonPath::default().to_string(), ".");
    }
}
