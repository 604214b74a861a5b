//! A cursor over YAML text that moves as libyaml's reader does, for the [`depth`](super::depth)
//! scan: UTF-8 characters, line breaks (CR LF as one, NEL, LS, PS) counted into lines and
//! columns, and libyaml's character classes.
//!
//! Kept apart from the scan so that the scan follows libyaml's tokens and this its characters.
//! It reads the text only through `get`, so no input makes it panic.

/// A position: byte offset (libyaml's `index`), 0-based line and 0-based column in characters.
#[derive(Debug, Clone, Copy)]
pub(super) struct Mark {
    pub(super) pos: usize,
    pub(super) line: usize,
    pub(super) column: usize,
}

/// The text and the position of its next character.
pub(super) struct Reader<'a> {
    text: &'a [u8],
    /// Where the next character starts.
    next: Mark,
}

impl<'a> Reader<'a> {
    pub(super) fn new(text: &'a [u8]) -> Self {
        Self {
            text,
            next: Mark {
                pos: 0,
                line: 0,
                column: 0,
            },
        }
    }

    /// Where the next character starts.
    pub(super) fn mark(&self) -> Mark {
        self.next
    }

    /// The next character's column (0-based, in characters).
    pub(super) fn column(&self) -> usize {
        self.next.column
    }

    /// The byte `k` bytes on; 0 past the end, which libyaml reads as the end too.
    pub(super) fn at(&self, k: usize) -> u8 {
        self.next
            .pos
            .checked_add(k)
            .and_then(|i| self.text.get(i))
            .copied()
            .unwrap_or(0)
    }

    pub(super) fn starts_with(&self, s: &[u8]) -> bool {
        self.text
            .get(self.next.pos..)
            .is_some_and(|t| t.starts_with(s))
    }

    /// One character on: a line break (CR LF counting as one) starts a new line.
    pub(super) fn bump(&mut self) {
        let width = match self.at(0) {
            b'\r' if self.at(1) == b'\n' => 2,
            b if b < 0x80 => 1,
            b if b & 0xE0 == 0xC0 => 2,
            b if b & 0xF0 == 0xE0 => 3,
            b if b & 0xF8 == 0xF0 => 4,
            _ => 1,
        };
        if self.is_break(0) {
            self.next.line += 1;
            self.next.column = 0;
        } else {
            self.next.column += 1;
        }
        self.next.pos = self.next.pos.saturating_add(width).min(self.text.len());
    }

    /// The end, or a NUL (which libyaml's reader refuses).
    pub(super) fn is_z(&self, k: usize) -> bool {
        self.at(k) == 0
    }

    pub(super) fn is_blank(&self, k: usize) -> bool {
        matches!(self.at(k), b' ' | b'\t')
    }

    /// CR, LF, NEL, LS or PS, as libyaml reads line breaks.
    pub(super) fn is_break(&self, k: usize) -> bool {
        match self.at(k) {
            b'\r' | b'\n' => true,
            0xC2 => self.at(k + 1) == 0x85,
            0xE2 => self.at(k + 1) == 0x80 && matches!(self.at(k + 2), 0xA8 | 0xA9),
            _ => false,
        }
    }

    pub(super) fn is_breakz(&self, k: usize) -> bool {
        self.is_break(k) || self.is_z(k)
    }

    pub(super) fn is_blankz(&self, k: usize) -> bool {
        self.is_blank(k) || self.is_breakz(k)
    }
}

/// libyaml's `IS_ALPHA`: the characters of anchor names.
pub(super) fn is_alpha(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Characters of a tag outside `!<...>`: libyaml's handle and URI characters.
pub(super) fn is_tag_char(b: u8) -> bool {
    is_alpha(b) || b";/?:@&=+$.%!~*'()".contains(&b)
}
