//! A small indentation-aware writer for generated CUDA C++.
//!
//! Code is built line by line and block by block (a closure per block), so nesting is
//! structural rather than spread over large `format!` strings. The kernels crate has the same
//! writer; this crate cannot depend on it (it produces text and knows no devices), so this is
//! its minimal twin.

/// Accumulates text with two-space indentation.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    out: String,
    indent: usize,
}

impl Writer {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// One line at the current indentation (an empty `text` writes an empty line).
    pub(crate) fn line(&mut self, text: impl AsRef<str>) -> &mut Self {
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

    pub(crate) fn blank(&mut self) -> &mut Self {
        self.line("")
    }

    /// `// text`, one comment line per line of `text`.
    pub(crate) fn comment(&mut self, text: impl AsRef<str>) -> &mut Self {
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
    pub(crate) fn block(
        &mut self,
        head: impl AsRef<str>,
        body: impl FnOnce(&mut Self),
    ) -> &mut Self {
        self.line(format!("{} {{", head.as_ref()));
        self.indented(body);
        self.line("}")
    }

    /// The body one level deeper, without braces.
    pub(crate) fn indented(&mut self, body: impl FnOnce(&mut Self)) -> &mut Self {
        self.indent += 1;
        body(self);
        self.indent -= 1;
        self
    }

    pub(crate) fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_indent_and_close() {
        let mut w = Writer::new();
        w.comment("a\n\nb");
        w.block("if (x)", |w| {
            w.line("y();");
            w.block("for (;;)", |w| {
                w.line("z();");
            });
        });
        w.blank();
        assert_eq!(
            w.finish(),
            "// a\n//\n// b\nif (x) {\n  y();\n  for (;;) {\n    z();\n  }\n}\n\n"
        );
    }
}
