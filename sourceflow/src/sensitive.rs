//! Masking of `#[sensitive]` fields in `Debug` output (and so in logs and error messages).
//!
//! The scheme:
//! * `#[sensitive]` prints `"***"` whatever the value;
//! * `#[sensitive(card)]` prints the last four digits only: `"****1111"`;
//! * `#[sensitive(email)]` keeps the first character and the domain: `"j***@example.com"`.

use std::fmt;

/// Prints `"***"` in place of a value.
pub struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// Prints a card number as `"****"` followed by its last four digits.
pub struct MaskedCard<'a, T: fmt::Display + ?Sized>(pub &'a T);

impl<T: fmt::Display + ?Sized> fmt::Debug for MaskedCard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits: Vec<char> = self
            .0
            .to_string()
            .chars()
            .filter(char::is_ascii_digit)
            .collect();
        // Short numbers are not cards; showing "last four" of them would show them whole.
        let tail: String = if digits.len() >= 12 {
            digits[digits.len() - 4..].iter().collect()
        } else {
            String::new()
        };
        write!(f, "\"****{tail}\"")
    }
}

/// Prints an e-mail address as its first character, `***`, and the domain.
pub struct MaskedEmail<'a, T: fmt::Display + ?Sized>(pub &'a T);

impl<T: fmt::Display + ?Sized> fmt::Debug for MaskedEmail<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.to_string();
        match s.split_once('@') {
            Some((local, domain)) if !local.is_empty() => {
                let first = local.chars().next().unwrap_or('*');
                write!(f, "\"{first}***@{domain}\"")
            }
            _ => f.write_str("\"***\""),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(format!("{:?}", Redacted), "\"***\"");
        assert_eq!(
            format!("{:?}", MaskedCard("4111 1111 1111 1234")),
            "\"****1234\""
        );
        assert_eq!(format!("{:?}", MaskedCard("1234")), "\"****\"");
        assert_eq!(
            format!("{:?}", MaskedEmail("jane@example.com")),
            "\"j***@example.com\""
        );
        assert_eq!(format!("{:?}", MaskedEmail("nope")), "\"***\"");
    }
}
