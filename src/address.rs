//! XMPP addresses (RFC 7622) as routing sees them: the string as received, split
//! once into localpart, domainpart and resourcepart.
//!
//! [`Addr`] keeps the original text and the offsets of its parts, so routing reads
//! the domain of every stanza without allocating or splitting again. It checks the
//! structure (RFC 7622 §3.1: the resource starts at the first `/`, the localpart
//! ends at the first `@` before it; no part empty; a domainpart holds no `@`, no
//! whitespace and no control character; each part at most 1023 bytes) but does
//! not apply PRECIS profiles: that costs more than routing a stanza, and only the
//! lookups of local users need it (they use the `jid` crate, off the hot path).
//! Domainparts compare ASCII case-insensitively (§3.2).

use std::fmt;
use std::ops::Deref;

/// Why a string is not an XMPP address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddrError {
    /// Nothing before the `/` or after the `@`.
    #[error("empty domainpart")]
    EmptyDomain,
    /// `@domain`.
    #[error("empty localpart")]
    EmptyLocal,
    /// `domain/`.
    #[error("empty resourcepart")]
    EmptyResource,
    /// A character no domainpart may hold (`@`, whitespace, controls).
    #[error("the domainpart {0:?} is not a domain")]
    BadDomain(String),
    /// A part longer than 1023 bytes (RFC 7622 §3.1).
    #[error("a part is longer than 1023 bytes")]
    TooLong,
}

/// A parsed XMPP address: `[local@]domain[/resource]`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Addr {
    raw: String,
    /// Index of the `@` that ends the localpart.
    at: Option<u32>,
    /// Index of the `/` that starts the resourcepart.
    slash: Option<u32>,
}

const MAX_PART: usize = 1023;

impl Addr {
    /// Parse and check an address.
    pub fn parse(raw: impl Into<String>) -> Result<Addr, AddrError> {
        let a = Addr::split(raw.into());
        if a.raw.len() > 3 * MAX_PART + 2 {
            return Err(AddrError::TooLong);
        }
        if a.local() == Some("") {
            return Err(AddrError::EmptyLocal);
        }
        if a.resource() == Some("") {
            return Err(AddrError::EmptyResource);
        }
        let d = a.domain();
        if d.is_empty() {
            return Err(AddrError::EmptyDomain);
        }
        if d.len() > MAX_PART
            || a.local().is_some_and(|l| l.len() > MAX_PART)
            || a.resource().is_some_and(|r| r.len() > MAX_PART)
        {
            return Err(AddrError::TooLong);
        }
        let bad_ascii = |b: u8| b <= b' ' || b == b'@' || b == b'/' || b == 0x7f;
        if d.bytes().any(bad_ascii)
            || (!d.is_ascii() && d.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(AddrError::BadDomain(d.to_string()));
        }
        Ok(a)
    }

    /// An address we built ourselves from checked parts: split, not checked again.
    pub fn trusted(raw: impl Into<String>) -> Addr {
        Addr::split(raw.into())
    }

    fn split(raw: String) -> Addr {
        let slash = memchr::memchr(b'/', raw.as_bytes());
        let bare = &raw.as_bytes()[..slash.unwrap_or(raw.len())];
        let at = memchr::memchr(b'@', bare);
        Addr {
            at: at.map(|i| i as u32),
            slash: slash.map(|i| i as u32),
            raw,
        }
    }

    /// The domainpart, as written.
    pub fn domain(&self) -> &str {
        let start = self.at.map_or(0, |i| i as usize + 1);
        let end = self.slash.map_or(self.raw.len(), |i| i as usize);
        &self.raw[start..end]
    }

    /// The localpart, if any.
    pub fn local(&self) -> Option<&str> {
        self.at.map(|i| &self.raw[..i as usize])
    }

    /// The resourcepart, if any.
    pub fn resource(&self) -> Option<&str> {
        self.slash.map(|i| &self.raw[i as usize + 1..])
    }

    /// The bare address (`local@domain` or `domain`).
    pub fn bare(&self) -> &str {
        &self.raw[..self.slash.map_or(self.raw.len(), |i| i as usize)]
    }

    /// The whole address.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Whether the domainpart is `domain` (ASCII case-insensitive).
    pub fn is_in(&self, domain: &str) -> bool {
        self.domain().eq_ignore_ascii_case(domain)
    }
}

impl Deref for Addr {
    type Target = str;
    fn deref(&self) -> &str {
        &self.raw
    }
}

impl fmt::Debug for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.raw, f)
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl From<Addr> for String {
    fn from(a: Addr) -> String {
        a.raw
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_follow_rfc_7622() {
        let a = Addr::parse("juliet@example.com/foo@bar/baz").unwrap();
        assert_eq!(a.local(), Some("juliet"));
        assert_eq!(a.domain(), "example.com");
        assert_eq!(a.resource(), Some("foo@bar/baz"));
        assert_eq!(a.bare(), "juliet@example.com");
        let d = Addr::parse("example.com/a@b").unwrap();
        assert_eq!((d.local(), d.domain()), (None, "example.com"));
        assert_eq!(d.bare(), "example.com");
        assert!(Addr::parse("EXAMPLE.com").unwrap().is_in("example.COM"));
        assert_eq!(&*Addr::parse("a@b").unwrap(), "a@b");
    }

    #[test]
    fn malformed_addresses_are_refused() {
        for (s, e) in [
            ("", AddrError::EmptyDomain),
            ("a@", AddrError::EmptyDomain),
            ("a@/r", AddrError::EmptyDomain),
            ("@d", AddrError::EmptyLocal),
            ("d/", AddrError::EmptyResource),
            ("nobody@@domain", AddrError::BadDomain("@domain".into())),
            ("a@b c", AddrError::BadDomain("b c".into())),
        ] {
            assert_eq!(Addr::parse(s), Err(e), "{s:?}");
        }
        assert_eq!(
            Addr::parse(format!("{}@d", "x".repeat(1024))),
            Err(AddrError::TooLong)
        );
    }
}
