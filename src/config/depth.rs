//! Refuses YAML nested deeper than [`MAX_DEPTH`], in linear time, before serde_norway sees it.
//!
//! serde_norway (a port of libyaml) is slow on deeply nested flow text: for every token its
//! scanner revisits the pending implicit key of each open flow level (up to the last 1024
//! bytes' worth), so 2.4 MB of `[` took 19 s of a release build to reject while hot reloads
//! waited. Its own recursion limit (128) applies only once the whole document has been parsed
//! into events, too late to help.
//!
//! This scan follows libyaml's scanner token by token (the same indicators, simple keys,
//! indentation rules and scalar extents) but keeps only what nesting needs: the flow level
//! and the stack of open block collections. Every level it counts is a collection the parser
//! opens, so a valid file is never refused for nesting it does not have. (A collection used
//! as a key, `[a]: b`, or a flow pair, `[a: b]`, counts one level less: harmless, and not
//! found in rule files.) Where libyaml stops with an error the scan stops too and leaves the
//! message to it. Each byte is read a bounded number of times and the stack never holds more
//! than [`MAX_DEPTH`] + 1 entries, so the scan is linear; it reads the text only through
//! [`yaml_reader`](super::yaml_reader), so no input makes it panic.

use super::yaml_reader::{is_alpha, is_tag_char, Mark, Reader};

/// Deepest nesting accepted: the number of mappings and sequences enclosing a node.
///
/// A rule file nests one level for its top mapping, two per descriptor level (the
/// `descriptors` list and the descriptor's mapping) and one to three for a `rate_limit`
/// block: the reference's own rule files (its examples and test configs) nest at most 8
/// levels (the Envoy configs among its examples reach 24), and 64 leaves room for
/// about 30 descriptor levels. It is half of serde_norway's own recursion limit (128), so a
/// file that passes is never refused later for depth, and with at most 64 open levels
/// libyaml's work per token stays small, so a file that passes parses in linear time.
pub const MAX_DEPTH: usize = 64;

/// Where a text first nests deeper than [`MAX_DEPTH`]: the start of the collection that
/// crosses the limit, 1-based, counted as serde_norway counts (lines and characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooDeep {
    pub line: usize,
    pub column: usize,
}

/// `Err` with the position where `text` first nests deeper than [`MAX_DEPTH`]; `Ok` for
/// every text nested less deeply, and for texts libyaml refuses before reaching that depth.
pub fn check(text: &str) -> Result<(), TooDeep> {
    scan(text.as_bytes(), MAX_DEPTH)
}

fn scan(text: &[u8], limit: usize) -> Result<(), TooDeep> {
    let mut s = Scanner {
        text: Reader::new(text),
        limit,
        flow_level: 0,
        blocks: Vec::new(),
        simple_key_allowed: true,
        simple_key: None,
    };
    match s.run() {
        Err(Stop::TooDeep(at)) => Err(TooDeep {
            line: at.line + 1,
            column: at.column + 1,
        }),
        Ok(()) | Err(Stop::Invalid) => Ok(()),
    }
}

/// Why a scan ended early.
enum Stop {
    /// The collection starting here is one level too deep.
    TooDeep(Mark),
    /// libyaml stops with an error here (or the scan cannot follow it): what follows is never
    /// parsed, so it is not checked either.
    Invalid,
}

/// An open block collection (an entry of libyaml's `indents` stack).
struct Block {
    column: usize,
    mapping: bool,
    /// A sequence whose `-` sit in this mapping's own column (`key:\n- a`): libyaml opens it
    /// without an indentation level of its own, yet it nests like any other.
    indentless: bool,
}

/// The parts of libyaml's scanner state that decide where collections open and close.
struct Scanner<'a> {
    text: Reader<'a>,
    limit: usize,
    flow_level: usize,
    blocks: Vec<Block>,
    simple_key_allowed: bool,
    /// Where the pending implicit key of the block context starts, if one may (libyaml's
    /// `simple_keys[0]`); a `:` after it opens a block mapping at its column. Implicit keys in
    /// flow context never change the block indentation, so they are not tracked.
    simple_key: Option<Mark>,
}

impl Scanner<'_> {
    /// libyaml's `yaml_parser_fetch_next_token`, in a loop until the end of the text.
    fn run(&mut self) -> Result<(), Stop> {
        loop {
            self.skip_to_next_token();
            self.unroll(Some(self.text.column()));
            if self.text.is_z(0) {
                return Ok(());
            }
            let start = self.text.mark().pos;
            self.next_token()?;
            if self.text.mark().pos == start {
                // Every token consumes input; stopping here guarantees termination regardless.
                return Err(Stop::Invalid);
            }
        }
    }

    fn next_token(&mut self) -> Result<(), Stop> {
        let mark = self.text.mark();
        let flow = self.flow_level > 0;
        let c = self.text.at(0);
        let block_entry = c == b'-' && self.text.is_blankz(1);
        if !(flow || block_entry) {
            self.end_indentless_sequence(mark.column);
        }
        if mark.column == 0 && c == b'%' {
            self.unroll(None);
            self.remove_simple_key();
            self.simple_key_allowed = false;
            while !self.text.is_breakz(0) {
                self.text.bump();
            }
            self.text.bump();
            return Ok(());
        }
        if mark.column == 0 && self.document_indicator() {
            self.unroll(None);
            self.remove_simple_key();
            self.simple_key_allowed = false;
            for _ in 0..3 {
                self.text.bump();
            }
            return Ok(());
        }
        match c {
            b'[' | b'{' => {
                self.save_simple_key(mark);
                self.flow_level += 1;
                self.open(mark)?;
                self.simple_key_allowed = true;
                self.text.bump();
            }
            b']' | b'}' => {
                self.remove_simple_key();
                self.flow_level = self.flow_level.saturating_sub(1);
                self.simple_key_allowed = false;
                self.text.bump();
            }
            b',' => {
                self.remove_simple_key();
                self.simple_key_allowed = true;
                self.text.bump();
            }
            b'-' if block_entry => {
                if !flow {
                    self.block_allowed()?;
                    self.block_entry(mark)?;
                }
                self.remove_simple_key();
                self.simple_key_allowed = true;
                self.text.bump();
            }
            b'?' if flow || self.text.is_blankz(1) => {
                if !flow {
                    self.block_allowed()?;
                    self.roll(mark, true)?;
                }
                self.remove_simple_key();
                self.simple_key_allowed = !flow;
                self.text.bump();
            }
            b':' if flow || self.text.is_blankz(1) => {
                if !flow {
                    // A mapping opens at the implicit key, or at the `:` after an explicit
                    // `?` key. libyaml forgets a key on a new line or 1024 bytes on.
                    let key = self
                        .simple_key
                        .take()
                        .filter(|k| k.line == mark.line && mark.pos.saturating_sub(k.pos) <= 1024);
                    match key {
                        Some(key) => self.roll(key, true)?,
                        None => {
                            self.block_allowed()?;
                            self.roll(mark, true)?;
                        }
                    }
                    self.simple_key_allowed = key.is_none();
                } else {
                    self.simple_key_allowed = false;
                }
                self.text.bump();
            }
            b'*' | b'&' => {
                self.save_simple_key(mark);
                self.simple_key_allowed = false;
                self.text.bump();
                while is_alpha(self.text.at(0)) {
                    self.text.bump();
                }
            }
            b'!' => {
                self.save_simple_key(mark);
                self.simple_key_allowed = false;
                self.tag();
            }
            b'|' | b'>' if !flow => {
                self.remove_simple_key();
                self.simple_key_allowed = true;
                self.block_scalar()?;
            }
            b'\'' | b'"' => {
                self.save_simple_key(mark);
                self.simple_key_allowed = false;
                self.quoted(c == b'\'')?;
            }
            _ if self.plain_start(flow) => {
                self.save_simple_key(mark);
                self.simple_key_allowed = false;
                self.plain()?;
            }
            _ => return Err(Stop::Invalid),
        }
        Ok(())
    }

    /// libyaml refuses `-`, `?` and `:` in block context where a key could not start.
    fn block_allowed(&self) -> Result<(), Stop> {
        if self.simple_key_allowed {
            Ok(())
        } else {
            Err(Stop::Invalid)
        }
    }

    /// One level deeper, starting at `mark`.
    fn open(&mut self, mark: Mark) -> Result<(), Stop> {
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| 1 + usize::from(b.indentless))
            .sum();
        if self.flow_level + blocks > self.limit {
            return Err(Stop::TooDeep(mark));
        }
        Ok(())
    }

    /// The current block indentation column; `None` is libyaml's -1.
    fn indent(&self) -> Option<usize> {
        self.blocks.last().map(|b| b.column)
    }

    /// libyaml's `yaml_parser_roll_indent`: a block collection opens at `mark` when it is
    /// indented deeper than the current one.
    fn roll(&mut self, mark: Mark, mapping: bool) -> Result<(), Stop> {
        if self.flow_level > 0 || self.indent().is_some_and(|i| i >= mark.column) {
            return Ok(());
        }
        self.blocks.push(Block {
            column: mark.column,
            mapping,
            indentless: false,
        });
        self.open(mark)
    }

    /// libyaml's `yaml_parser_unroll_indent`: block collections indented deeper than `column`
    /// (all of them for `None`) end.
    fn unroll(&mut self, column: Option<usize>) {
        if self.flow_level > 0 {
            return;
        }
        while self
            .blocks
            .last()
            .is_some_and(|b| column.is_none_or(|c| b.column > c))
        {
            self.blocks.pop();
        }
    }

    /// A `-` in block context: a new sequence when indented deeper, the first entry of an
    /// indentless sequence when in the column of a mapping, else one more entry.
    fn block_entry(&mut self, mark: Mark) -> Result<(), Stop> {
        if self.indent().is_none_or(|i| i < mark.column) {
            return self.roll(mark, false);
        }
        match self.blocks.last_mut() {
            Some(b) if b.mapping && !b.indentless => {
                b.indentless = true;
                self.open(mark)
            }
            _ => Ok(()),
        }
    }

    /// Any token but `-` in a mapping's own column ends that mapping's indentless sequence.
    fn end_indentless_sequence(&mut self, column: usize) {
        if let Some(b) = self.blocks.last_mut() {
            if b.column == column {
                b.indentless = false;
            }
        }
    }

    fn save_simple_key(&mut self, mark: Mark) {
        if self.simple_key_allowed && self.flow_level == 0 {
            self.simple_key = Some(mark);
        }
    }

    fn remove_simple_key(&mut self) {
        if self.flow_level == 0 {
            self.simple_key = None;
        }
    }

    /// libyaml's `yaml_parser_scan_to_next_token`: blanks, comments, line breaks, and a byte
    /// order mark at the start of a line.
    fn skip_to_next_token(&mut self) {
        loop {
            if self.text.column() == 0 && self.text.starts_with(b"\xEF\xBB\xBF") {
                self.text.bump();
            }
            while self.text.at(0) == b' '
                || ((self.flow_level > 0 || !self.simple_key_allowed) && self.text.at(0) == b'\t')
            {
                self.text.bump();
            }
            if self.text.at(0) == b'#' {
                while !self.text.is_breakz(0) {
                    self.text.bump();
                }
            }
            if !self.text.is_break(0) {
                return;
            }
            self.text.bump();
            if self.flow_level == 0 {
                self.simple_key_allowed = true;
            }
        }
    }

    /// `---` or `...` followed by a blank or the end (the caller checks the column).
    fn document_indicator(&self) -> bool {
        (self.text.starts_with(b"---") || self.text.starts_with(b"...")) && self.text.is_blankz(3)
    }

    /// libyaml's test for the start of a plain scalar, after every other token was ruled out.
    fn plain_start(&self, flow: bool) -> bool {
        let c = self.text.at(0);
        !(self.text.is_blankz(0) || b"-?:,[]{}#&*!|>'\"%@`".contains(&c))
            || (c == b'-' && !self.text.is_blank(1))
            || (!flow && (c == b'?' || c == b':') && !self.text.is_blankz(1))
    }

    /// libyaml's `yaml_parser_scan_tag`: `!`, then tag characters, or `!<...>`.
    fn tag(&mut self) {
        self.text.bump();
        if self.text.at(0) == b'<' {
            self.text.bump();
            while is_tag_char(self.text.at(0)) || matches!(self.text.at(0), b',' | b'[' | b']') {
                self.text.bump();
            }
            if self.text.at(0) == b'>' {
                self.text.bump();
            }
        } else {
            while is_tag_char(self.text.at(0)) {
                self.text.bump();
            }
        }
    }

    /// libyaml's `yaml_parser_scan_block_scalar`: the header line, then every line indented
    /// at least as deep as the first non-empty one.
    fn block_scalar(&mut self) -> Result<(), Stop> {
        self.text.bump();
        // Chomping (`+`/`-`) and indentation (1-9) indicators, in either order.
        let mut increment = 0;
        let chomping_first = matches!(self.text.at(0), b'+' | b'-');
        if chomping_first {
            self.text.bump();
        }
        if self.text.at(0) == b'0' {
            return Err(Stop::Invalid);
        }
        if self.text.at(0).is_ascii_digit() {
            increment = usize::from(self.text.at(0) - b'0');
            self.text.bump();
            if !chomping_first && matches!(self.text.at(0), b'+' | b'-') {
                self.text.bump();
            }
        }
        while self.text.is_blank(0) {
            self.text.bump();
        }
        if self.text.at(0) == b'#' {
            while !self.text.is_breakz(0) {
                self.text.bump();
            }
        }
        if !self.text.is_breakz(0) {
            return Err(Stop::Invalid);
        }
        self.text.bump();
        let parent = self.indent();
        let mut indent = match (increment, parent) {
            (0, _) => 0,
            (n, Some(p)) => p + n,
            (n, None) => n,
        };
        self.block_scalar_breaks(&mut indent, parent)?;
        while self.text.column() == indent && !self.text.is_z(0) {
            while !self.text.is_breakz(0) {
                self.text.bump();
            }
            self.text.bump();
            self.block_scalar_breaks(&mut indent, parent)?;
        }
        Ok(())
    }

    /// libyaml's `yaml_parser_scan_block_scalar_breaks`: empty lines and indentation; fixes
    /// the indentation from the first non-empty line when the header did not give it.
    fn block_scalar_breaks(
        &mut self,
        indent: &mut usize,
        parent: Option<usize>,
    ) -> Result<(), Stop> {
        let mut max_indent = 0;
        loop {
            while (*indent == 0 || self.text.column() < *indent) && self.text.at(0) == b' ' {
                self.text.bump();
            }
            max_indent = max_indent.max(self.text.column());
            if (*indent == 0 || self.text.column() < *indent) && self.text.at(0) == b'\t' {
                return Err(Stop::Invalid);
            }
            if !self.text.is_break(0) {
                break;
            }
            self.text.bump();
        }
        if *indent == 0 {
            *indent = max_indent.max(parent.map_or(0, |p| p + 1)).max(1);
        }
        Ok(())
    }

    /// libyaml's `yaml_parser_scan_flow_scalar`: a quoted scalar, over as many lines as it
    /// takes.
    fn quoted(&mut self, single: bool) -> Result<(), Stop> {
        let quote = if single { b'\'' } else { b'"' };
        self.text.bump();
        loop {
            if (self.text.column() == 0 && self.document_indicator()) || self.text.is_z(0) {
                return Err(Stop::Invalid);
            }
            while !self.text.is_blankz(0) {
                let c = self.text.at(0);
                if single && c == b'\'' && self.text.at(1) == b'\'' {
                    self.text.bump();
                    self.text.bump();
                } else if c == quote {
                    break;
                } else if !single && c == b'\\' && self.text.is_break(1) {
                    self.text.bump();
                    self.text.bump();
                    break;
                } else if !single && c == b'\\' {
                    self.text.bump();
                    self.text.bump();
                } else {
                    self.text.bump();
                }
            }
            if self.text.at(0) == quote {
                self.text.bump();
                return Ok(());
            }
            while self.text.is_blank(0) || self.text.is_break(0) {
                self.text.bump();
            }
        }
    }

    /// libyaml's `yaml_parser_scan_plain_scalar`: up to `: `, a comment, a flow indicator in
    /// flow context, or a line indented no deeper than the enclosing block collection.
    fn plain(&mut self) -> Result<(), Stop> {
        let flow = self.flow_level > 0;
        let indent = self.indent().map_or(0, |i| i + 1);
        let mut leading_blanks = false;
        loop {
            if (self.text.column() == 0 && self.document_indicator()) || self.text.at(0) == b'#' {
                break;
            }
            while !self.text.is_blankz(0) {
                let c = self.text.at(0);
                if flow && c == b':' && b",?[]{}".contains(&self.text.at(1)) {
                    return Err(Stop::Invalid);
                }
                if (c == b':' && self.text.is_blankz(1)) || (flow && b",[]{}".contains(&c)) {
                    break;
                }
                self.text.bump();
            }
            if !(self.text.is_blank(0) || self.text.is_break(0)) {
                break;
            }
            while self.text.is_blank(0) || self.text.is_break(0) {
                if self.text.is_break(0) {
                    leading_blanks = true;
                } else if leading_blanks && self.text.column() < indent && self.text.at(0) == b'\t'
                {
                    return Err(Stop::Invalid);
                }
                self.text.bump();
            }
            if !flow && self.text.column() < indent {
                break;
            }
        }
        if leading_blanks {
            self.simple_key_allowed = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_norway::Value;

    use super::*;

    /// How deeply `v` nests, counted like [`MAX_DEPTH`].
    fn value_depth(v: &Value) -> usize {
        match v {
            Value::Sequence(s) => 1 + s.iter().map(value_depth).max().unwrap_or(0),
            Value::Mapping(m) => {
                1 + m
                    .iter()
                    .map(|(k, v)| value_depth(k).max(value_depth(v)))
                    .max()
                    .unwrap_or(0)
            }
            Value::Tagged(t) => value_depth(&t.value),
            _ => 0,
        }
    }

    /// Asserts `text` nests exactly `depth` levels for serde_norway and for the scan.
    fn assert_exact(text: &str, depth: usize) {
        let v: Value = serde_norway::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(value_depth(&v), depth, "{text}");
        assert_eq!(scan(text.as_bytes(), depth), Ok(()), "{text}");
        assert!(scan(text.as_bytes(), depth - 1).is_err(), "{text}");
    }

    /// xorshift64*: reproducible without a dependency.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
        }
    }

    fn block_mappings(n: usize) -> String {
        (0..n)
            .map(|i| {
                format!(
                    "{}k:{}\n",
                    "  ".repeat(i),
                    if i + 1 == n { " v" } else { "" }
                )
            })
            .collect()
    }

    /// `k:` then `- k:` one level further per line: a mapping, then a sequence and a mapping
    /// per line, the sequences indentless.
    fn indentless(lines: usize) -> String {
        let mut s = "k:\n".to_owned();
        for i in 0..lines {
            s += &format!("{}- k:\n", "  ".repeat(i));
        }
        s + &format!("{}- v\n", "  ".repeat(lines))
    }

    #[test]
    fn each_style_is_counted_exactly_and_refused_one_level_past_the_limit() {
        let flow_seqs = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let flow_maps = |n: usize| format!("{}v{}", "{k: ".repeat(n), "}".repeat(n));
        let compact = |n: usize| format!("{}x\n", "- ".repeat(n));
        for n in [1, 2, 5, MAX_DEPTH] {
            assert_exact(&block_mappings(n), n);
            assert_exact(&flow_seqs(n), n);
            assert_exact(&flow_maps(n), n);
            assert_exact(&compact(n), n);
        }
        assert_exact(&indentless(1), 4);
        assert_exact(&indentless(31), MAX_DEPTH);
        let at = |line, column| Err(TooDeep { line, column });
        assert_eq!(check(&block_mappings(MAX_DEPTH + 1)), at(65, 129));
        assert_eq!(check(&flow_seqs(MAX_DEPTH + 1)), at(1, 65));
        assert_eq!(check(&flow_maps(MAX_DEPTH + 1)), at(1, 257));
        assert_eq!(check(&compact(MAX_DEPTH + 1)), at(1, 129));
        // The 65th level is the mapping of the 32nd `- k:` line (each adds an indentless
        // sequence and a mapping).
        assert_eq!(check(&indentless(32)), at(33, 65));
        // Block and flow levels add up.
        let mut mixed: String = (0..63).map(|i| format!("{}k:\n", "  ".repeat(i))).collect();
        mixed += &format!("{}k: [[v]]\n", "  ".repeat(63));
        assert_eq!(check(&mixed), at(64, 130));
        assert_eq!(check(&"[".repeat(2_000_000)), at(1, 65));
    }

    #[test]
    fn indicators_inside_scalars_and_comments_do_not_count() {
        let deep = "[[[[ {{{{ - - - - ".repeat(20);
        let files = [
            format!("k: '{deep}'\n"),
            format!("k: \"\\\" {deep}\"\n"),
            format!("k: \"a\n  {deep}\n  b\"\n"),
            format!("k: |\n  {deep}\n  {deep}\nj: v\n"),
            format!("k: >-\n\n  {deep}\n"),
            format!("k: a\n  {deep}\n"),
            format!("k: v # {deep}\n"),
            format!("# {deep}\nk: v\n"),
            format!("- a{deep}\n"),
            "k: !<tag:x,[[[[[[]]]]]]> v\n".to_owned(),
            format!("[a, '{deep}', \"{deep}\"]\n"),
        ];
        for text in files {
            let v: Value = serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
            assert!(value_depth(&v) <= 2, "{text}");
            assert_eq!(scan(text.as_bytes(), 2), Ok(()), "{text}");
        }
    }

    /// Texts made of YAML's indicators and awkward characters: serde_norway parses a good
    /// share of them, and for each, the scan must count no more levels than there are.
    #[test]
    fn random_yaml_is_never_counted_deeper_than_it_is() {
        const PIECES: &[&str] = &[
            "\n",
            " ",
            "  ",
            "    ",
            "- ",
            "-",
            "? ",
            "?",
            ": ",
            ":",
            "[",
            "]",
            "{",
            "}",
            ", ",
            ",",
            "a",
            "b c",
            "#c",
            " #c",
            "'q'",
            "'a\nb'",
            "\"d\\\"q\"",
            "\"a\\\nb\"",
            "|\n",
            ">-\n",
            "|2\n",
            "&x ",
            "*x",
            "!t ",
            "!!str ",
            "!<a,[b]> ",
            "---\n",
            "...\n",
            "\t",
            "%YAML 1.1\n",
            "\r\n",
            "\u{85}",
            "\u{2028}",
            "é",
            "\u{feff}",
            "k: ",
            "- k: ",
            "\n  ",
            "\n- ",
            "x:\n  ",
            "\n    ",
            "a: b\n",
            "[a]: b\n",
            "- - ",
            "k:\n- ",
        ];
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut parsed = 0;
        for _ in 0..40_000 {
            let text: String = (0..1 + rng.below(14))
                .map(|_| PIECES[rng.below(PIECES.len())])
                .collect();
            if let Ok(v) = serde_norway::from_str::<Value>(&text) {
                parsed += 1;
                let depth = value_depth(&v);
                assert_eq!(scan(text.as_bytes(), depth), Ok(()), "{text:?}");
            }
        }
        assert!(parsed > 4_000, "only {parsed} texts parsed");
    }

    /// A random tree, written in random styles: block, indentless, compact (`- - x`,
    /// `- k: v`) and flow collections, with scalars of every kind holding indicators.
    #[test]
    fn random_trees_in_every_style_are_counted_exactly() {
        enum Node {
            Scalar,
            Seq(Vec<Node>),
            Map(Vec<Node>),
        }
        fn tree(rng: &mut Rng, levels: usize) -> Node {
            let n = rng.below(4);
            let children = |rng: &mut Rng| (0..n).map(|_| tree(rng, levels - 1)).collect();
            match rng.below(if levels == 0 { 1 } else { 5 }) {
                0 => Node::Scalar,
                1 | 2 => Node::Seq(children(rng)),
                _ => Node::Map(children(rng)),
            }
        }
        fn depth(n: &Node) -> usize {
            match n {
                Node::Scalar => 0,
                Node::Seq(c) | Node::Map(c) => 1 + c.iter().map(depth).max().unwrap_or(0),
            }
        }
        /// A scalar on a line whose content may continue at column `cont`.
        fn scalar(rng: &mut Rng, cont: usize) -> String {
            let pad = " ".repeat(cont);
            match rng.below(8) {
                0 => "'[{ - ''x'' # :'".to_owned(),
                1 => "\"[{ \\\" - #: \\\\\"".to_owned(),
                2 => format!("\"a [\n{pad}- b {{\""),
                3 => format!("|\n{pad}[[ - {{\n\n{pad}  - ]: x"),
                4 => format!("a [b\n{pad}- c {{d"),
                5 => "x # [[ {{ - - -".to_owned(),
                6 => "&a !t a-[b]:c".to_owned(),
                _ => "v".to_owned(),
            }
        }
        fn flow(rng: &mut Rng, n: &Node, out: &mut String) {
            let (open, close, children) = match n {
                Node::Scalar => {
                    out.push_str(["a", "'[ ]'", "\"{ }\""][rng.below(3)]);
                    return;
                }
                Node::Seq(c) => ('[', ']', c),
                Node::Map(c) => ('{', '}', c),
            };
            out.push(open);
            for (i, c) in children.iter().enumerate() {
                if i > 0 {
                    out.push_str([", ", ",\n   ", " ,"][rng.below(3)]);
                }
                if open == '{' {
                    out.push_str(&format!("k{i}: "));
                }
                flow(rng, c, out);
            }
            out.push(close);
        }
        /// `n` written in block style at column `col`; `inline` when the first line's
        /// indentation is already written (after `- `).
        fn block(rng: &mut Rng, n: &Node, col: usize, inline: bool, out: &mut String) {
            let (seq, children) = match n {
                Node::Seq(c) => (true, c),
                Node::Map(c) => (false, c),
                Node::Scalar => unreachable!(),
            };
            for (i, c) in children.iter().enumerate() {
                if i > 0 || !inline {
                    out.push_str(&" ".repeat(col));
                }
                if seq {
                    out.push('-');
                } else {
                    out.push_str(&format!("k{i}:"));
                }
                let empty = matches!(c, Node::Seq(v) | Node::Map(v) if v.is_empty());
                match c {
                    Node::Scalar => {
                        let s = scalar(rng, col + 2);
                        out.push_str(&format!(" {s}\n"));
                    }
                    _ if empty || rng.below(4) == 0 => {
                        out.push(' ');
                        flow(rng, c, out);
                        out.push('\n');
                    }
                    _ if seq => {
                        out.push(' ');
                        block(rng, c, col + 2, true, out);
                    }
                    Node::Seq(_) if rng.below(2) == 0 => {
                        out.push('\n');
                        block(rng, c, col, false, out);
                    }
                    _ => {
                        out.push('\n');
                        block(rng, c, col + 2, false, out);
                    }
                }
            }
        }
        let mut rng = Rng(42);
        for _ in 0..3_000 {
            let root = tree(&mut rng, 6);
            let d = depth(&root);
            if d == 0 || matches!(&root, Node::Seq(c) | Node::Map(c) if c.is_empty()) {
                continue;
            }
            let mut text = String::new();
            block(&mut rng, &root, 0, false, &mut text);
            assert_exact(&text, d);
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(7);
        const BYTES: &[u8] =
            b"[]{}-?:,#'\"\\|>&*!%@` \t\r\n\0ab12+\xC2\x85\xE2\x80\xA8\xEF\xBB\xBF\xFF";
        for _ in 0..50_000 {
            let bytes: Vec<u8> = (0..rng.below(64))
                .map(|_| BYTES[rng.below(BYTES.len())])
                .collect();
            for limit in [0, 1, 3, MAX_DEPTH] {
                let _ = scan(&bytes, limit);
            }
            let _ = check(&String::from_utf8_lossy(&bytes));
        }
    }

    /// Every YAML file in the repository, rule files or not, passes; only the fixtures made
    /// to be too deep do not.
    #[test]
    fn the_repository_yaml_files_pass() {
        fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                    out.push(p);
                }
            }
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = vec![root.join("docker-compose.yml")];
        for dir in [
            "config",
            "examples",
            "tests/config",
            "bench",
            "deploy",
            "envoy",
        ] {
            walk(&root.join(dir), &mut files);
        }
        assert!(files.len() > 30, "{files:?}");
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            let deep = f
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("too_deep"));
            assert_eq!(check(&text).is_err(), deep, "{}", f.display());
        }
    }
}
