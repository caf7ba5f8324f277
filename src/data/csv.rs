//! A small delimited-text reader: RFC 4180 CSV and Common Voice style TSV, plus the text file
//! helper every loader uses. No external crate: manifests are small and the rules are few.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// One record and the (1-based) line it starts on, for error messages.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Record {
    pub line: usize,
    pub fields: Vec<String>,
}

/// Reads a UTF-8 text file (a leading byte order mark is dropped). Errors name the file.
pub(super) fn read_text(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|source| Error::Open { path: path.into(), source })?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(|e| Error::io(path, "reading failed", e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::config(path, format!("not UTF-8 text (invalid byte at offset {}); save it as UTF-8", e.utf8_error().valid_up_to()))
    })?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

/// Parses RFC 4180 CSV with `delim` as the separator: a field that starts with `"` is quoted,
/// may hold separators and line breaks, and writes a quote as `""`. Records end at LF or CRLF.
/// Blank lines are skipped. A quote inside an unquoted field is kept as a character (as
/// Python's `csv` module does). Errors are `(line, message)`.
pub(super) fn parse_csv(text: &str, delim: char) -> std::result::Result<Vec<Record>, (usize, String)> {
    let mut records = Vec::new();
    let mut fields: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut line = 1;
    let mut record_line = 1;
    let mut quote_line = 1;
    let mut at_field_start = true;
    let mut in_quotes = false;
    // The current field was quoted and its closing quote has been read.
    let mut after_quote = false;
    // Some field of the current record was quoted (so it is not a blank line).
    let mut record_quoted = false;
    let mut chars = text.chars().peekable();
    loop {
        let Some(c) = chars.next() else {
            if in_quotes {
                return Err((quote_line, "unterminated quoted field: the `\"` that opens it is never closed".into()));
            }
            fields.push(std::mem::take(&mut field));
            if record_quoted || fields.len() > 1 || !fields[0].is_empty() {
                records.push(Record { line: record_line, fields });
            }
            return Ok(records);
        };
        if in_quotes {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    field.push('"');
                } else {
                    in_quotes = false;
                    after_quote = true;
                }
            } else {
                if c == '\n' {
                    line += 1;
                }
                field.push(c);
            }
            continue;
        }
        if c == '\r' && chars.peek() == Some(&'\n') {
            continue;
        }
        if c == delim {
            fields.push(std::mem::take(&mut field));
            at_field_start = true;
            after_quote = false;
        } else if c == '\n' {
            fields.push(std::mem::take(&mut field));
            if record_quoted || fields.len() > 1 || !fields[0].is_empty() {
                records.push(Record { line: record_line, fields: std::mem::take(&mut fields) });
            } else {
                fields.clear();
            }
            line += 1;
            record_line = line;
            at_field_start = true;
            after_quote = false;
            record_quoted = false;
        } else if c == '"' && at_field_start {
            in_quotes = true;
            record_quoted = true;
            quote_line = line;
            at_field_start = false;
        } else if after_quote {
            if c == ' ' || c == '\t' {
                continue; // padding after a closing quote
            }
            return Err((
                line,
                format!("unexpected `{c}` after the closing quote of a field; inside a quoted field write a quote as `\"\"`"),
            ));
        } else {
            field.push(c);
            at_field_start = false;
        }
    }
}

/// Parses tab-separated values without any quoting, as Common Voice's TSVs need (their
/// sentences hold bare `"` characters; Hugging Face reads them with `csv.QUOTE_NONE`). Blank
/// lines are skipped.
pub(super) fn parse_tsv(text: &str) -> Vec<Record> {
    text.split('\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l.strip_suffix('\r').unwrap_or(l)))
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(line, l)| Record { line, fields: l.split('\t').map(str::to_string).collect() })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(r: &[Record]) -> Vec<Vec<&str>> {
        r.iter().map(|r| r.fields.iter().map(String::as_str).collect()).collect()
    }

    #[test]
    fn csv_quotes_commas_newlines() {
        let r = parse_csv("a,b\r\n\"x, y\",\"say \"\"hi\"\"\"\n\n\"multi\nline\",z\n,\n", ',').unwrap();
        assert_eq!(fields(&r), vec![vec!["a", "b"], vec!["x, y", "say \"hi\""], vec!["multi\nline", "z"], vec!["", ""]]);
        assert_eq!(r.iter().map(|r| r.line).collect::<Vec<_>>(), vec![1, 2, 4, 6]);
        assert_eq!(fields(&parse_csv("a,b", ',').unwrap()), vec![vec!["a", "b"]]);
        assert_eq!(fields(&parse_csv("a 5\"x,b", ',').unwrap()), vec![vec!["a 5\"x", "b"]]);
        assert_eq!(parse_csv("a\n\"open,b\n", ',').unwrap_err().0, 2);
        assert!(parse_csv("\"a\"b,c", ',').unwrap_err().1.contains("after the closing quote"));
    }

    #[test]
    fn tsv_keeps_quotes() {
        let r = parse_tsv("p\ts\r\nx.mp3\tHe said \"hi\n\n");
        assert_eq!(fields(&r), vec![vec!["p", "s"], vec!["x.mp3", "He said \"hi"]]);
    }
}
