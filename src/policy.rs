//! Federation policy: which remote domains may talk to us and we to them.
//!
//! Enforced inbound (stream header `from` and the authenticated domain: refused with
//! `<policy-violation/>`) and outbound (stanzas bounced with `policy-violation`).

use crate::config::{Federation, FederationMode};

/// A compiled federation policy.
#[derive(Debug, Clone)]
pub struct Policy {
    mode: FederationMode,
    allow: Vec<String>,
    block: Vec<String>,
}

impl Policy {
    /// From the (normalized) config section.
    pub fn new(f: &Federation) -> Policy {
        Policy {
            mode: f.mode,
            allow: f.allowlist.clone(),
            block: f.blocklist.clone(),
        }
    }

    /// Whether `domain` (lower-case) may federate. A listed domain also covers its
    /// subdomains (`example.org` covers `conference.example.org`).
    pub fn allows(&self, domain: &str) -> bool {
        let listed = |list: &[String]| {
            list.iter().any(|d| {
                domain.eq_ignore_ascii_case(d)
                    || (domain.len() > d.len()
                        && domain.as_bytes()[domain.len() - d.len() - 1] == b'.'
                        && domain[domain.len() - d.len()..].eq_ignore_ascii_case(d))
            })
        };
        if listed(&self.block) {
            return false;
        }
        match self.mode {
            FederationMode::Disabled => false,
            FederationMode::Allowlist => listed(&self.allow),
            FederationMode::Open => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(mode: FederationMode, allow: &[&str], block: &[&str]) -> Policy {
        Policy::new(&Federation {
            mode,
            allowlist: allow.iter().map(|s| s.to_string()).collect(),
            blocklist: block.iter().map(|s| s.to_string()).collect(),
            ..Federation::default()
        })
    }

    #[test]
    fn modes() {
        let open = p(FederationMode::Open, &[], &["bad.test"]);
        assert!(open.allows("good.test"));
        assert!(!open.allows("bad.test"));
        assert!(!open.allows("muc.bad.test"));
        assert!(open.allows("notbad.test"));
        let allow = p(
            FederationMode::Allowlist,
            &["friend.test"],
            &["x.friend.test"],
        );
        assert!(allow.allows("friend.test"));
        assert!(allow.allows("conference.friend.test"));
        assert!(!allow.allows("x.friend.test"));
        assert!(!allow.allows("other.test"));
        let off = p(FederationMode::Disabled, &["friend.test"], &[]);
        assert!(!off.allows("friend.test"));
    }
}
