//! Recursive-descent parser: `||` binds loosest, then `&&`, then prefix `!`,
//! which applies to a single operation or parenthesised group.

use super::lexer::{Token, TokenKind, tokenize};
use super::{Expr, SelectorError};

pub(crate) fn parse(input: &str) -> Result<Expr, SelectorError> {
    let tokens = tokenize(input)?;
    if tokens[0].kind == TokenKind::Eof {
        return Ok(Expr::All);
    }
    let mut p = Parser {
        input,
        tokens: &tokens,
        pos: 0,
        depth: 0,
    };
    let expr = p.or_expr()?;
    let tok = p.peek();
    if tok.kind != TokenKind::Eof {
        return Err(p.error_at(tok, "'&&', '||' or the end of the selector"));
    }
    Ok(expr)
}

/// Nesting limit: parentheses deeper than this are rejected rather than
/// risking the stack (Calico has no limit, but a 1024-character selector
/// cannot legitimately come near it).
const MAX_DEPTH: usize = 512;

struct Parser<'a> {
    input: &'a str,
    tokens: &'a [Token],
    pos: usize,
    depth: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> &'a Token {
        // The token list always ends with Eof and the parser never moves past it.
        &self.tokens[self.pos.min(self.tokens.len() - 1)]
    }

    fn advance(&mut self) -> &'a Token {
        let t = self.peek();
        if t.kind != TokenKind::Eof {
            self.pos += 1;
        }
        t
    }

    fn error_at(&self, tok: &Token, expected: &str) -> SelectorError {
        SelectorError::new(self.input, tok.offset, expected, tok.kind.describe())
    }

    fn or_expr(&mut self) -> Result<Expr, SelectorError> {
        let first = self.and_expr()?;
        if self.peek().kind != TokenKind::Or {
            return Ok(first);
        }
        let mut operands = vec![first];
        while self.peek().kind == TokenKind::Or {
            self.advance();
            operands.push(self.and_expr()?);
        }
        Ok(Expr::Or(operands))
    }

    fn and_expr(&mut self) -> Result<Expr, SelectorError> {
        let first = self.operation()?;
        if self.peek().kind != TokenKind::And {
            return Ok(first);
        }
        let mut operands = vec![first];
        while self.peek().kind == TokenKind::And {
            self.advance();
            operands.push(self.operation()?);
        }
        Ok(Expr::And(operands))
    }

    fn string_operand(&mut self) -> Result<String, SelectorError> {
        let tok = self.advance();
        match &tok.kind {
            TokenKind::StringLiteral(s) => Ok(s.clone()),
            _ => Err(self.error_at(tok, "a quoted string")),
        }
    }

    fn operation(&mut self) -> Result<Expr, SelectorError> {
        // Leading '!'s collapse to one boolean, as in Calico.
        let mut negated = false;
        while self.peek().kind == TokenKind::Not {
            self.advance();
            negated = !negated;
        }
        let tok = self.advance();
        let expr = match &tok.kind {
            TokenKind::Has(label) => Expr::Has(label.clone()),
            TokenKind::All => Expr::All,
            TokenKind::Global => Expr::Global,
            TokenKind::Label(label) => {
                let op = self.advance();
                match &op.kind {
                    TokenKind::Eq => Expr::Eq(label.clone(), self.string_operand()?),
                    TokenKind::Ne => Expr::Ne(label.clone(), self.string_operand()?),
                    TokenKind::Contains => Expr::Contains(label.clone(), self.string_operand()?),
                    TokenKind::StartsWith => {
                        Expr::StartsWith(label.clone(), self.string_operand()?)
                    }
                    TokenKind::EndsWith => Expr::EndsWith(label.clone(), self.string_operand()?),
                    TokenKind::In | TokenKind::NotIn => {
                        let values = self.set_literal()?;
                        if op.kind == TokenKind::In {
                            Expr::In(label.clone(), values)
                        } else {
                            Expr::NotIn(label.clone(), values)
                        }
                    }
                    _ => {
                        return Err(self.error_at(
                            op,
                            "an operator (==, !=, in, not in, contains, starts with, ends with)",
                        ));
                    }
                }
            }
            TokenKind::LParen => {
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return Err(self.error_at(tok, "at most 512 nested parentheses"));
                }
                let inner = self.or_expr()?;
                self.depth -= 1;
                let close = self.advance();
                if close.kind != TokenKind::RParen {
                    return Err(self.error_at(close, "')'"));
                }
                inner
            }
            _ => {
                return Err(self.error_at(
                    tok,
                    "a selector operation (label comparison, has(), all(), global(), '!' or '(')",
                ));
            }
        };
        Ok(if negated {
            Expr::Not(Box::new(expr))
        } else {
            expr
        })
    }

    /// `{` already expected next: a possibly empty, comma-separated list of
    /// strings, an optional trailing comma, then `}`.
    fn set_literal(&mut self) -> Result<Vec<String>, SelectorError> {
        let open = self.advance();
        if open.kind != TokenKind::LBrace {
            return Err(self.error_at(open, "'{' starting a set of strings"));
        }
        let mut values = Vec::new();
        while let TokenKind::StringLiteral(s) = &self.peek().kind {
            values.push(s.clone());
            self.advance();
            if self.peek().kind == TokenKind::Comma {
                self.advance();
            } else {
                break;
            }
        }
        let close = self.advance();
        if close.kind != TokenKind::RBrace {
            return Err(self.error_at(close, "a quoted string or '}'"));
        }
        values.sort();
        values.dedup();
        Ok(values)
    }
}
