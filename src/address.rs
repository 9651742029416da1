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
    /// Parse and check an address: one pass over the bare part (the resource is
    /// only measured), since every routed stanza's `to` and `from` come here.
    pub fn parse(raw: impl Into<String>) -> Result<Addr, AddrError> {
        let raw = raw.into();
        let bytes = raw.as_bytes();
        let (mut at, mut slash) = (None, None);
        // Flags of the bytes before the first `@` (the domain if no `@`
        // follows) and after it (the domain): a byte no domain may hold, a
        // non-ASCII byte (checked as characters after the scan).
        let (mut bad, mut wide) = ([false; 2], [false; 2]);
        for (i, &b) in bytes.iter().enumerate() {
            if b == b'/' {
                slash = Some(i);
                break;
            }
            let part = usize::from(at.is_some());
            if b == b'@' && at.is_none() {
                at = Some(i);
                continue;
            }
            bad[part] |= b <= b' ' || b == b'@' || b == 0x7f;
            wide[part] |= b >= 0x80;
        }
        let a = Addr {
            at: at.map(|i| i as u32),
            slash: slash.map(|i| i as u32),
            raw,
        };
        if a.raw.len() > 3 * MAX_PART + 2 {
            return Err(AddrError::TooLong);
        }
        if a.at == Some(0) {
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
        let part = usize::from(at.is_some());
        if bad[part] || (wide[part] && d.chars().any(|c| c.is_whitespace() || c.is_control())) {
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

    /// The one-pass parse agrees with the definition written plainly, on every
    /// string of up to five characters over an alphabet of the cases that matter.
    #[test]
    fn one_pass_parse_agrees_with_the_plain_definition() {
        fn plain(s: &str) -> Result<(Option<&str>, &str, Option<&str>), ()> {
            let (bare, resource) = match s.split_once('/') {
                Some((b, r)) => (b, Some(r)),
                None => (s, None),
            };
            let (local, domain) = match bare.split_once('@') {
                Some((l, d)) => (Some(l), d),
                None => (None, bare),
            };
            let bad = domain.is_empty()
                || local == Some("")
                || resource == Some("")
                || domain
                    .chars()
                    .any(|c| c == '@' || c.is_whitespace() || c.is_control());
            if bad {
                Err(())
            } else {
                Ok((local, domain, resource))
            }
        }
        let alphabet = ['a', '@', '/', ' ', 'é', '\u{2003}', '\u{7f}'];
        let mut strings = vec![String::new()];
        for _ in 0..5 {
            let longer: Vec<String> = strings
                .iter()
                .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                .collect();
            strings.extend(longer);
            strings.sort();
            strings.dedup();
        }
        for s in &strings {
            let ours = Addr::parse(s.as_str())
                .map(|a| {
                    (
                        a.local().map(String::from),
                        a.domain().to_string(),
                        a.resource().map(String::from),
                    )
                })
                .map_err(|_| ());
            let want =
                plain(s).map(|(l, d, r)| (l.map(String::from), d.to_string(), r.map(String::from)));
            assert_eq!(ours, want, "{s:?}");
        }
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
