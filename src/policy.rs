//! Federation policy: which remote domains may talk to us and we to them.
//!
//! Enforced inbound (stream header `from` and the authenticated domain: refused with
//! `<policy-violation/>`) and outbound (stanzas bounced with `policy-violation`).
//!
//! Two layers: the config file's mode and lists, and runtime entries the operator
//! sets through the API (a mode, and `allow`/`block` per domain) that the
//! composition root keeps in the store. For a domain with a runtime entry the
//! runtime entry wins over the file's; a runtime mode wins over the file's. The
//! compiled rules sit behind an [`ArcSwap`]: [`Policy::allows`] is a lock-free
//! load on every outbound stanza, a change swaps them whole.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::config::{Federation, FederationMode};

/// What a list entry says about a domain (and its subdomains).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// May federate (in `allowlist` mode; in `open` mode it overrides a block).
    Allow,
    /// Never federates, whatever the mode.
    Block,
}

impl Rule {
    /// `allow` or `block`.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Allow => "allow",
            Rule::Block => "block",
        }
    }

    /// From [`Rule::as_str`]'s names.
    pub fn parse(s: &str) -> Option<Rule> {
        match s {
            "allow" => Some(Rule::Allow),
            "block" => Some(Rule::Block),
            _ => None,
        }
    }
}

/// A mode's name (`open`, `allowlist`, `disabled`).
pub fn mode_str(m: FederationMode) -> &'static str {
    match m {
        FederationMode::Open => "open",
        FederationMode::Allowlist => "allowlist",
        FederationMode::Disabled => "disabled",
    }
}

/// From [`mode_str`]'s names.
pub fn parse_mode(s: &str) -> Option<FederationMode> {
    match s {
        "open" => Some(FederationMode::Open),
        "allowlist" => Some(FederationMode::Allowlist),
        "disabled" => Some(FederationMode::Disabled),
        _ => None,
    }
}

/// The runtime layer: what the operator set, over the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Runtime {
    /// The mode, if set at runtime.
    pub mode: Option<FederationMode>,
    /// Lower-case domain -> its rule.
    pub domains: BTreeMap<String, Rule>,
}

/// One domain named by either layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The domain (lower-case).
    pub domain: String,
    /// What the config file says.
    pub file: Option<Rule>,
    /// What was set at runtime.
    pub runtime: Option<Rule>,
    /// What applies: the runtime entry if any, else the file's.
    pub effective: Rule,
}

/// The mode in both layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// The config file's.
    pub file: FederationMode,
    /// Set at runtime.
    pub runtime: Option<FederationMode>,
    /// What applies.
    pub effective: FederationMode,
}

/// The rules in force, compiled from both layers.
#[derive(Debug, Clone)]
struct Rules {
    mode: FederationMode,
    allow: Vec<String>,
    block: Vec<String>,
}

impl Rules {
    fn allows(&self, domain: &str) -> bool {
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

/// A federation policy: the config file's, with runtime changes over it.
#[derive(Debug)]
pub struct Policy {
    file: Rules,
    /// Changed only by the operator (never on a stanza's path).
    runtime: Mutex<Runtime>,
    rules: ArcSwap<Rules>,
}

fn norm(d: &str) -> String {
    d.trim_end_matches('.').to_ascii_lowercase()
}

impl Policy {
    /// From the (normalized) config section, with no runtime entries.
    pub fn new(f: &Federation) -> Policy {
        let file = Rules {
            mode: f.mode,
            allow: f.allowlist.iter().map(|d| norm(d)).collect(),
            block: f.blocklist.iter().map(|d| norm(d)).collect(),
        };
        Policy {
            rules: ArcSwap::from_pointee(file.clone()),
            file,
            runtime: Mutex::default(),
        }
    }

    /// Whether `domain` (lower-case) may federate. A listed domain also covers its
    /// subdomains (`example.org` covers `conference.example.org`); a blocked one
    /// wins over an allowed one.
    pub fn allows(&self, domain: &str) -> bool {
        self.rules.load().allows(domain)
    }

    fn runtime_lock(&self) -> std::sync::MutexGuard<'_, Runtime> {
        self.runtime.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn compile(&self, rt: &Runtime) -> Rules {
        let keep = |list: &[String]| -> Vec<String> {
            list.iter()
                .filter(|d| !rt.domains.contains_key(*d))
                .cloned()
                .collect()
        };
        let (mut allow, mut block) = (keep(&self.file.allow), keep(&self.file.block));
        for (d, r) in &rt.domains {
            match r {
                Rule::Allow => allow.push(d.clone()),
                Rule::Block => block.push(d.clone()),
            }
        }
        Rules {
            mode: rt.mode.unwrap_or(self.file.mode),
            allow,
            block,
        }
    }

    /// Replace the runtime layer (at startup, from the store).
    pub fn set_runtime(&self, rt: Runtime) {
        let mut cur = self.runtime_lock();
        self.rules.store(Arc::new(self.compile(&rt)));
        *cur = rt;
    }

    /// The runtime layer.
    pub fn runtime(&self) -> Runtime {
        self.runtime_lock().clone()
    }

    /// Set (`Some`) or forget (`None`) the runtime entry of `domain`; returns
    /// the entry it had.
    pub fn set_domain(&self, domain: &str, rule: Option<Rule>) -> Option<Rule> {
        let mut rt = self.runtime_lock();
        let d = norm(domain);
        let old = match rule {
            Some(r) => rt.domains.insert(d, r),
            None => rt.domains.remove(&d),
        };
        self.rules.store(Arc::new(self.compile(&rt)));
        old
    }

    /// Set (`Some`) or forget (`None`) the runtime mode; returns the one it had.
    pub fn set_mode(&self, mode: Option<FederationMode>) -> Option<FederationMode> {
        let mut rt = self.runtime_lock();
        let old = std::mem::replace(&mut rt.mode, mode);
        self.rules.store(Arc::new(self.compile(&rt)));
        old
    }

    /// The mode in both layers.
    pub fn mode(&self) -> Mode {
        let runtime = self.runtime_lock().mode;
        Mode {
            file: self.file.mode,
            runtime,
            effective: runtime.unwrap_or(self.file.mode),
        }
    }

    /// What the config file says about exactly `domain` (a block wins).
    fn file_rule(&self, domain: &str) -> Option<Rule> {
        if self.file.block.iter().any(|d| d == domain) {
            Some(Rule::Block)
        } else if self.file.allow.iter().any(|d| d == domain) {
            Some(Rule::Allow)
        } else {
            None
        }
    }

    /// Every domain either layer names, sorted.
    pub fn entries(&self) -> Vec<Entry> {
        let rt = self.runtime_lock();
        let mut names: std::collections::BTreeSet<&str> =
            rt.domains.keys().map(String::as_str).collect();
        names.extend(self.file.allow.iter().map(String::as_str));
        names.extend(self.file.block.iter().map(String::as_str));
        names
            .into_iter()
            .filter_map(|d| {
                let file = self.file_rule(d);
                let runtime = rt.domains.get(d).copied();
                Some(Entry {
                    domain: d.to_string(),
                    file,
                    runtime,
                    effective: runtime.or(file)?,
                })
            })
            .collect()
    }

    /// The entry of one domain, if either layer names it.
    pub fn entry(&self, domain: &str) -> Option<Entry> {
        let d = norm(domain);
        let file = self.file_rule(&d);
        let runtime = self.runtime_lock().domains.get(&d).copied();
        Some(Entry {
            effective: runtime.or(file)?,
            domain: d,
            file,
            runtime,
        })
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

    #[test]
    fn runtime_entries_win_over_the_file_for_their_domain() {
        let pol = p(FederationMode::Open, &[], &["bad.test"]);
        assert_eq!(pol.set_domain("Bad.Test", Some(Rule::Allow)), None);
        assert!(pol.allows("bad.test"));
        let e = pol.entry("bad.test").unwrap();
        assert_eq!(
            (e.file, e.runtime, e.effective),
            (Some(Rule::Block), Some(Rule::Allow), Rule::Allow)
        );
        assert_eq!(pol.set_domain("new.test", Some(Rule::Block)), None);
        assert!(!pol.allows("new.test") && !pol.allows("a.new.test"));
        assert_eq!(pol.entries().len(), 2);
        // Forgetting the runtime entry gives the file's back.
        assert_eq!(pol.set_domain("bad.test", None), Some(Rule::Allow));
        assert!(!pol.allows("bad.test"));
        // A runtime mode wins over the file's.
        pol.set_mode(Some(FederationMode::Allowlist));
        assert!(!pol.allows("good.test"));
        pol.set_domain("good.test", Some(Rule::Allow));
        assert!(pol.allows("good.test"));
        assert_eq!(pol.mode().effective, FederationMode::Allowlist);
        assert_eq!(pol.set_mode(None), Some(FederationMode::Allowlist));
        assert_eq!(pol.mode().effective, FederationMode::Open);
        // The whole runtime layer, as loaded at startup.
        let rt = pol.runtime();
        let fresh = p(FederationMode::Open, &[], &["bad.test"]);
        fresh.set_runtime(rt);
        assert!(!fresh.allows("new.test") && fresh.allows("good.test"));
    }
}
