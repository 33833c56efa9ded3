//! Tokenizer for Calico's selector language.
//!
//! It follows libcalico-go's tokenizer token for token, including its quirks:
//! only space and tab are whitespace, `has(` must be written without a space
//! before the parenthesis, operator words (`in`, `not in`, `contains`,
//! `starts with`, `ends with`) are only recognised directly after a label, and
//! strings have no escapes.

use super::SelectorError;

/// Longest label key the selector language accepts, in bytes.
pub const MAX_LABEL_LENGTH: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokenKind {
    Label(String),
    StringLiteral(String),
    LBrace,
    RBrace,
    Comma,
    Eq,
    Ne,
    In,
    Not,
    NotIn,
    Contains,
    StartsWith,
    EndsWith,
    All,
    Has(String),
    LParen,
    RParen,
    And,
    Or,
    Global,
    Eof,
}

impl TokenKind {
    /// How the token reads in an error message.
    pub(crate) fn describe(&self) -> String {
        match self {
            TokenKind::Label(l) => format!("label {l:?}"),
            TokenKind::StringLiteral(s) => format!("string {s:?}"),
            TokenKind::LBrace => "'{'".into(),
            TokenKind::RBrace => "'}'".into(),
            TokenKind::Comma => "','".into(),
            TokenKind::Eq => "'=='".into(),
            TokenKind::Ne => "'!='".into(),
            TokenKind::In => "'in'".into(),
            TokenKind::Not => "'!'".into(),
            TokenKind::NotIn => "'not in'".into(),
            TokenKind::Contains => "'contains'".into(),
            TokenKind::StartsWith => "'starts with'".into(),
            TokenKind::EndsWith => "'ends with'".into(),
            TokenKind::All => "'all()'".into(),
            TokenKind::Has(l) => format!("'has({l})'"),
            TokenKind::LParen => "'('".into(),
            TokenKind::RParen => "')'".into(),
            TokenKind::And => "'&&'".into(),
            TokenKind::Or => "'||'".into(),
            TokenKind::Global => "'global()'".into(),
            TokenKind::Eof => "end of selector".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Token {
    pub kind: TokenKind,
    /// Byte offset of the token's first character in the selector.
    pub offset: usize,
}

pub(crate) fn is_identifier_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'/' | b'-')
}

fn is_whitespace(c: u8) -> bool {
    c == b' ' || c == b'\t'
}

/// Whether `label` is a valid label key for selectors.
pub fn is_valid_label_key(label: &str) -> bool {
    !label.is_empty() && label.len() <= MAX_LABEL_LENGTH && label.bytes().all(is_identifier_char)
}

struct Lexer<'a> {
    input: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn rest(&self) -> &'a str {
        &self.input[self.pos..]
    }

    fn skip_whitespace(&mut self) {
        while self.pos < self.input.len() && is_whitespace(self.input.as_bytes()[self.pos]) {
            self.pos += 1;
        }
    }

    fn error(&self, offset: usize, expected: impl Into<String>) -> SelectorError {
        let found = match self.input[offset..].chars().next() {
            Some(c) => format!("{c:?}"),
            None => "end of selector".to_string(),
        };
        SelectorError::new(self.input, offset, expected, found)
    }

    /// True when the text after `len` bytes from the current position is a word boundary.
    fn boundary_after(&self, at: usize) -> bool {
        match self.input.as_bytes().get(at) {
            None => true,
            Some(&c) => !is_identifier_char(c),
        }
    }

    /// Matches `word` at the current position followed by a word boundary.
    fn try_word(&mut self, word: &str) -> bool {
        if self.rest().starts_with(word) && self.boundary_after(self.pos + word.len()) {
            self.pos += word.len();
            true
        } else {
            false
        }
    }

    /// Matches two words separated by optional whitespace ("starts with", "startswith").
    fn try_two_words(&mut self, first: &str, second: &str) -> bool {
        let start = self.pos;
        if !self.rest().starts_with(first) {
            return false;
        }
        self.pos += first.len();
        self.skip_whitespace();
        if self.rest().starts_with(second) && self.boundary_after(self.pos + second.len()) {
            self.pos += second.len();
            true
        } else {
            self.pos = start;
            false
        }
    }

    fn identifier(&mut self) -> Result<String, SelectorError> {
        let start = self.pos;
        let bytes = self.input.as_bytes();
        while self.pos < bytes.len() && is_identifier_char(bytes[self.pos]) {
            self.pos += 1;
        }
        let ident = &self.input[start..self.pos];
        if ident.is_empty() {
            return Err(self.error(start, "a label"));
        }
        if ident.len() > MAX_LABEL_LENGTH {
            return Err(SelectorError::new(
                self.input,
                start,
                format!("a label of at most {MAX_LABEL_LENGTH} characters"),
                format!("a label of {} characters", ident.len()),
            ));
        }
        Ok(ident.to_string())
    }

    /// `name(` was consumed; expects optional whitespace then `)`.
    fn close_paren(&mut self, what: &str) -> Result<(), SelectorError> {
        self.skip_whitespace();
        if self.rest().starts_with(')') {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.error(self.pos, format!("')' to close {what}(")))
        }
    }

    fn string(&mut self, quote: char) -> Result<String, SelectorError> {
        let start = self.pos;
        self.pos += 1;
        match self.rest().find(quote) {
            Some(end) => {
                let value = self.rest()[..end].to_string();
                self.pos += end + 1;
                Ok(value)
            }
            None => Err(SelectorError::new(
                self.input,
                start,
                format!("closing {quote} of the string"),
                "end of selector".to_string(),
            )),
        }
    }
}

pub(crate) fn tokenize(input: &str) -> Result<Vec<Token>, SelectorError> {
    let mut lx = Lexer { input, pos: 0 };
    let mut tokens: Vec<Token> = Vec::new();
    loop {
        lx.skip_whitespace();
        let offset = lx.pos;
        let Some(c) = lx.rest().chars().next() else {
            tokens.push(Token {
                kind: TokenKind::Eof,
                offset,
            });
            return Ok(tokens);
        };
        let after_label = matches!(
            tokens.last(),
            Some(Token {
                kind: TokenKind::Label(_),
                ..
            })
        );
        let kind = match c {
            '(' => {
                lx.pos += 1;
                TokenKind::LParen
            }
            ')' => {
                lx.pos += 1;
                TokenKind::RParen
            }
            '{' => {
                lx.pos += 1;
                TokenKind::LBrace
            }
            '}' => {
                lx.pos += 1;
                TokenKind::RBrace
            }
            ',' => {
                lx.pos += 1;
                TokenKind::Comma
            }
            '"' | '\'' => TokenKind::StringLiteral(lx.string(c)?),
            '=' => {
                if lx.rest().starts_with("==") {
                    lx.pos += 2;
                    TokenKind::Eq
                } else {
                    return Err(lx.error(offset, "'=='"));
                }
            }
            '!' => {
                if lx.rest().starts_with("!=") {
                    lx.pos += 2;
                    TokenKind::Ne
                } else {
                    lx.pos += 1;
                    TokenKind::Not
                }
            }
            '&' => {
                if lx.rest().starts_with("&&") {
                    lx.pos += 2;
                    TokenKind::And
                } else {
                    return Err(lx.error(offset, "'&&'"));
                }
            }
            '|' => {
                if lx.rest().starts_with("||") {
                    lx.pos += 2;
                    TokenKind::Or
                } else {
                    return Err(lx.error(offset, "'||'"));
                }
            }
            _ if after_label => {
                if lx.try_word("contains") {
                    TokenKind::Contains
                } else if lx.try_two_words("starts", "with") {
                    TokenKind::StartsWith
                } else if lx.try_two_words("ends", "with") {
                    TokenKind::EndsWith
                } else if lx.try_two_words("not", "in") {
                    TokenKind::NotIn
                } else if lx.try_word("in") {
                    TokenKind::In
                } else {
                    return Err(lx.error(
                        offset,
                        "an operator (==, !=, in, not in, contains, starts with, ends with) after the label",
                    ));
                }
            }
            _ => {
                if lx.rest().starts_with("has(") {
                    lx.pos += 4;
                    lx.skip_whitespace();
                    let label = lx.identifier()?;
                    lx.close_paren("has")?;
                    TokenKind::Has(label)
                } else if lx.rest().starts_with("all(") {
                    lx.pos += 4;
                    lx.close_paren("all")?;
                    TokenKind::All
                } else if lx.rest().starts_with("global(") {
                    lx.pos += 7;
                    lx.close_paren("global")?;
                    TokenKind::Global
                } else {
                    TokenKind::Label(lx.identifier()?)
                }
            }
        };
        tokens.push(Token { kind, offset });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(s: &str) -> Vec<TokenKind> {
        tokenize(s).unwrap().into_iter().map(|t| t.kind).collect()
    }

    #[test]
    fn operators_need_a_preceding_label() {
        assert_eq!(
            kinds("a startswith 'x'"),
            vec![
                TokenKind::Label("a".into()),
                TokenKind::StartsWith,
                TokenKind::StringLiteral("x".into()),
                TokenKind::Eof
            ]
        );
        // "in" after a string is a label, not an operator.
        assert_eq!(
            kinds("in == 'x'"),
            vec![
                TokenKind::Label("in".into()),
                TokenKind::Eq,
                TokenKind::StringLiteral("x".into()),
                TokenKind::Eof
            ]
        );
        assert_eq!(
            kinds("a notin {}"),
            vec![
                TokenKind::Label("a".into()),
                TokenKind::NotIn,
                TokenKind::LBrace,
                TokenKind::RBrace,
                TokenKind::Eof
            ]
        );
    }

    #[test]
    fn errors_carry_offsets() {
        let e = tokenize("a == \"b\" & has(foo)").unwrap_err();
        assert_eq!(e.offset, 9);
        assert!(e.expected.contains("&&"), "{e}");
        let e = tokenize("label == \"value").unwrap_err();
        assert_eq!(e.offset, 9);
        let e = tokenize("has(foo").unwrap_err();
        assert_eq!(e.offset, 7);
    }

    #[test]
    fn label_length_limit() {
        let ok = "a".repeat(MAX_LABEL_LENGTH);
        assert!(tokenize(&format!("{ok} == 'x'")).is_ok());
        let long = "a".repeat(MAX_LABEL_LENGTH + 1);
        let e = tokenize(&format!("{long} == 'x'")).unwrap_err();
        assert_eq!(e.offset, 0);
    }

    #[test]
    fn newline_is_not_whitespace() {
        assert!(tokenize("a == 'b'\n").is_err());
    }
}
