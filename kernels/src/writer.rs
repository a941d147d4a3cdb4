//! An indentation-aware writer for the generated CUDA C++ around the templates.
//!
//! Generated code is built line by line and block by block, so that nesting is structural (a
//! closure per block) rather than spread over large `format!` strings.

use std::fmt::Write as _;

/// Accumulates CUDA C++ text with consistent two-space indentation.
#[derive(Debug, Default)]
pub struct SourceWriter {
    out: String,
    indent: usize,
}

impl SourceWriter {
    /// An empty writer at indentation level zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes one line at the current indentation (an empty `text` writes an empty line).
    pub fn line(&mut self, text: impl AsRef<str>) -> &mut Self {
        let text = text.as_ref();
        if !text.is_empty() {
            for _ in 0..self.indent {
                self.out.push_str("  ");
            }
            self.out.push_str(text);
        }
        self.out.push('\n');
        self
    }

    /// An empty line.
    pub fn blank(&mut self) -> &mut Self {
        self.line("")
    }

    /// `// text`, one comment line per line of `text`.
    pub fn comment(&mut self, text: impl AsRef<str>) -> &mut Self {
        for line in text.as_ref().lines() {
            if line.is_empty() {
                self.line("//");
            } else {
                self.line(format!("// {line}"));
            }
        }
        self
    }

    /// `head {`, the body one level deeper, then `}`.
    pub fn block(&mut self, head: impl AsRef<str>, body: impl FnOnce(&mut Self)) -> &mut Self {
        self.block_closed_by(head, "}", body)
    }

    /// `head {`, the body one level deeper, then `close` (for example `};` after a struct).
    pub fn block_closed_by(
        &mut self,
        head: impl AsRef<str>,
        close: &str,
        body: impl FnOnce(&mut Self),
    ) -> &mut Self {
        self.line(format!("{} {{", head.as_ref()));
        self.indented(body);
        self.line(close)
    }

    /// The body one level deeper, without braces (continuation lines, argument lists).
    pub fn indented(&mut self, body: impl FnOnce(&mut Self)) -> &mut Self {
        self.indent += 1;
        body(self);
        self.indent -= 1;
        self
    }

    /// A list of items, one per line, separated by `,` (the last one followed by `last_suffix`).
    pub fn comma_list<I, S>(&mut self, items: I, last_suffix: &str) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let items: Vec<S> = items.into_iter().collect();
        let count = items.len();
        for (i, item) in items.iter().enumerate() {
            let suffix = if i + 1 == count { last_suffix } else { "," };
            self.line(format!("{}{suffix}", item.as_ref()));
        }
        self
    }

    /// Text copied verbatim (a hand-written template), followed by a newline if it lacks one.
    pub fn verbatim(&mut self, text: &str) -> &mut Self {
        self.out.push_str(text);
        if !text.ends_with('\n') {
            self.out.push('\n');
        }
        self
    }

    /// The text written so far.
    pub fn finish(self) -> String {
        self.out
    }
}

/// A C string literal for inline PTX: the text quoted, with `\n` at its end.
pub(crate) fn ptx_line(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 6);
    quoted.push('"');
    for c in text.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            _ => quoted.push(c),
        }
    }
    let _ = write!(quoted, "\\n\"");
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_indent_and_close() {
        let mut w = SourceWriter::new();
        w.comment("a\n\nb");
        w.block("struct S", |w| {
            w.line("int x;");
            w.block("void f()", |w| {
                w.line("x = 1;");
            });
        });
        w.block_closed_by("struct T", "};", |w| {
            w.blank();
        });
        assert_eq!(
            w.finish(),
            "// a\n//\n// b\nstruct S {\n  int x;\n  void f() {\n    x = 1;\n  }\n}\nstruct T {\n\n};\n"
        );
    }

    #[test]
    fn comma_lists_and_ptx_lines() {
        let mut w = SourceWriter::new();
        w.indented(|w| {
            w.comma_list(["int a", "int b"], ") {");
        });
        assert_eq!(w.finish(), "  int a,\n  int b) {\n");
        assert_eq!(
            ptx_line("setp.ne.b32 p, %66, 0;"),
            "\"setp.ne.b32 p, %66, 0;\\n\""
        );
        assert_eq!(ptx_line("a\"b"), "\"a\\\"b\\n\"");
    }
}
