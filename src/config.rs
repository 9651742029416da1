//! Configuration: TOML, every field documented, defaults in one place.
//!
//! `serve` with no file runs on the embedded defaults: domain `localhost`, listeners
//! on loopback, a generated development certificate. `validate` parses and checks a
//! file; every error names the field (exit status 64, `EX_USAGE`... `EX_DATAERR`'s
//! neighbour that sysexits reserves for bad input).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Errors loading or checking a configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown field or a value of the wrong type.
    #[error("{0}")]
    Parse(String),
    /// A value that parses but is not acceptable.
    #[error("field `{field}`: {message}")]
    Invalid {
        /// Dotted path of the field.
        field: String,
        /// What is wrong.
        message: String,
    },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// XMPP domains this server is authoritative for (the backend's domain, and any
    /// others). Stanzas to any other domain are federated.
    pub domains: Vec<String>,
    /// Where to accept server-to-server connections.
    pub listen: Listen,
    /// Certificates and trust roots.
    pub tls: Tls,
    /// Which remote domains may federate with us.
    pub federation: Federation,
    /// How remote domains are found.
    pub dns: Dns,
    /// Resource limits for peers.
    pub limits: LimitsConfig,
    /// Timeouts and keepalives.
    pub timeouts: Timeouts,
    /// The durable store.
    pub store: StoreConfig,
    /// The backend HTTP API.
    pub api: Api,
    /// Delivery of the backend's outgoing messages.
    pub delivery: DeliveryConfig,
    /// Group conversations as rooms (XEP-0045).
    pub rooms: RoomsConfig,
}

/// Where state lives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sled` or `redb`.
    pub backend: crate::store::Backend,
    /// Directory of the database (created if missing).
    pub path: PathBuf,
    /// redb's page cache, in MiB (its memory grows to this under load, on top
    /// of the operating system's file cache). sled ignores it.
    pub cache_mib: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: crate::store::Backend::default(),
            path: PathBuf::from("xmpp-federator-data"),
            // A quarter of redb's own default (1 GiB): the drain of a large
            // backlog and room fan-out measured no slower at 64 or 256 MiB
            // than at 1024 (README), and the process stays ~1 GB smaller.
            cache_mib: 256,
        }
    }
}

/// The backend API (HTTP/JSON).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Api {
    /// Where to listen; loopback by default (the backend runs beside us).
    pub listen: SocketAddr,
    /// Bearer token the backend must send. Unset: a random one is generated at start
    /// and logged (development only).
    pub token: Option<String>,
    /// A read-only token for the status page (`/status`) only; the page also
    /// takes `token`. Unset: only `token` logs in.
    pub status_token: Option<String>,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Largest total size of a message's extension elements.
    pub max_extension_bytes: usize,
    /// Most messages in one `POST /v1/messages/batch`.
    pub max_batch: usize,
}

impl Default for Api {
    fn default() -> Self {
        Api {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token: None,
            status_token: None,
            max_body_bytes: 256 * 1024,
            max_extension_bytes: 64 * 1024,
            max_batch: 1000,
        }
    }
}

/// Outgoing message delivery.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// A message not delivered within this many seconds expires (an `expired` event).
    pub expire_secs: u64,
    /// How often undelivered messages are retried (seconds).
    pub retry_secs: u64,
    /// A domain that stays unreachable is retried after `retry_secs`, then twice
    /// as long each time (with jitter), up to this many seconds between attempts.
    pub max_retry_secs: u64,
    /// The most messages per remote domain in flight (sent, not yet confirmed
    /// and settled on disk): what a crash may make us send twice. The rest wait
    /// their turn in the queue.
    pub window: usize,
    /// Without XEP-0198 acks, a confirmation ping unanswered for this many
    /// seconds is followed by another on the same stream (which confirms the
    /// same: a peer may drop an answer); the wait doubles each time, up to a
    /// minute. The pings of a stream that ended are waited for this long
    /// after its end; then what they followed goes again.
    pub confirm_wait_secs: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            expire_secs: 7 * 24 * 3600,
            retry_secs: 5,
            max_retry_secs: 900,
            window: 1000,
            confirm_wait_secs: 5,
        }
    }
}

/// Group conversations: rooms on a component of each hosted domain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoomsConfig {
    /// The rooms of `domain` live on `<subdomain>.<domain>`; empty: no rooms.
    pub subdomain: String,
    /// Messages of history sent on join when the client sets no limit.
    pub history_default: usize,
    /// The most messages of history sent on join, whatever the client asks.
    pub history_max: usize,
    /// Archived messages older than this many days are removed (0: kept forever).
    pub archive_retention_days: u64,
    /// A remote room a local user is in, silent for this long, is pinged
    /// (XEP-0410) to learn whether it still has us.
    pub self_ping_secs: u64,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        RoomsConfig {
            subdomain: "conference".into(),
            history_default: 20,
            history_max: 100,
            archive_retention_days: 0,
            self_ping_secs: 300,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            domains: vec!["localhost".into()],
            listen: Listen::default(),
            tls: Tls::default(),
            federation: Federation::default(),
            dns: Dns::default(),
            limits: LimitsConfig::default(),
            timeouts: Timeouts::default(),
            store: StoreConfig::default(),
            api: Api::default(),
            delivery: DeliveryConfig::default(),
            rooms: RoomsConfig::default(),
        }
    }
}

/// Listening sockets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Plain TCP listeners that require STARTTLS (RFC 6120 §5); the standard port is 5269.
    pub starttls: Vec<SocketAddr>,
    /// Direct TLS listeners (XEP-0368, ALPN `xmpp-server`); commonly port 5270.
    pub direct_tls: Vec<SocketAddr>,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            starttls: vec![SocketAddr::from(([127, 0, 0, 1], 5269))],
            direct_tls: vec![SocketAddr::from(([127, 0, 0, 1], 5270))],
        }
    }
}

/// TLS material.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// Certificate chains with their keys (PEM). Each one serves the hosted domains its
    /// names cover (selected by SNI inbound, used as client certificate outbound).
    /// Empty: a self-signed development certificate is generated for every domain.
    pub certificates: Vec<CertificateFiles>,
    /// Trust the operating system's root certificates for peer certificates.
    pub system_roots: bool,
    /// Extra CA certificates (PEM files) trusted for peer certificates, e.g. a private CA.
    pub ca_files: Vec<PathBuf>,
}

impl Default for Tls {
    fn default() -> Self {
        Tls {
            certificates: Vec::new(),
            system_roots: true,
            ca_files: Vec::new(),
        }
    }
}

/// One certificate chain and its private key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    /// PEM file with the leaf certificate first, then intermediates.
    pub cert: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Federation policy mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FederationMode {
    /// No federation at all: every remote domain is refused.
    Disabled,
    /// Only the domains in `allowlist`.
    Allowlist,
    /// Any domain not in `blocklist`.
    #[default]
    Open,
}

/// When server dialback (XEP-0220) may authenticate a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DialbackMode {
    /// Only where certificate authentication is not possible: the peer offers
    /// no SASL EXTERNAL or refuses our certificate (outbound), or its
    /// certificate does not verify for its domain (inbound). A peer whose
    /// certificate we cannot verify is then trusted as far as DNS is.
    #[default]
    Fallback,
    /// Certificates only (SASL EXTERNAL, XEP-0178).
    Never,
}

/// Federation policy, enforced on inbound and outbound streams.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Federation {
    /// `disabled`, `allowlist` or `open`.
    pub mode: FederationMode,
    /// Domains allowed in `allowlist` mode.
    pub allowlist: Vec<String>,
    /// Domains always refused, whatever the mode.
    pub blocklist: Vec<String>,
    /// Server dialback: `fallback` (default) or `never`. The policy above
    /// applies to dialback-authenticated peers too.
    pub dialback: DialbackMode,
    /// The secret dialback keys are made from (XEP-0185). Unset: one is
    /// generated once and kept in the store, so keys survive restarts; set it
    /// when several instances serve the same domains.
    pub dialback_secret: Option<String>,
    /// Bidirectional streams (XEP-0288): offered to peers on our inbound
    /// streams and asked for on our outbound ones where offered, so one
    /// connection carries both directions. `false`: two streams, one each way.
    #[serde(deserialize_with = "true_or_false")]
    pub bidi: bool,
}

/// A boolean, and only a boolean: `bidi = "yes"` is refused with what is
/// expected (TOML quotes make a string).
fn true_or_false<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = bool;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("true or false (a TOML boolean, without quotes)")
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<bool, E> {
            Ok(v)
        }
    }
    d.deserialize_bool(V)
}

impl Default for Federation {
    fn default() -> Self {
        Federation {
            mode: FederationMode::default(),
            allowlist: Vec::new(),
            blocklist: Vec::new(),
            dialback: DialbackMode::default(),
            dialback_secret: None,
            bidi: true,
        }
    }
}

/// Name resolution.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Dns {
    /// A nameserver (`IP:PORT`) to ask instead of the system's resolver configuration.
    pub nameserver: Option<SocketAddr>,
    /// Static targets per remote domain, bypassing DNS: `"IP:PORT"` for STARTTLS,
    /// `"tls://IP:PORT"` for direct TLS. Tried in order.
    pub overrides: BTreeMap<String, Vec<String>>,
}

/// Resource limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest element a peer may send before it has authenticated (negotiation only).
    pub max_stanza_bytes_unauthenticated: usize,
    /// Largest stanza an authenticated peer may send.
    pub max_stanza_bytes: usize,
    /// Deepest element nesting inside a stanza.
    pub max_depth: usize,
    /// Most attributes on one element.
    pub max_attributes: usize,
    /// Most simultaneous inbound connections.
    pub max_connections: usize,
    /// Most simultaneous inbound connections from one IP address.
    pub max_connections_per_ip: usize,
    /// Stanzas waiting for one remote domain before new ones are bounced with
    /// `resource-constraint`.
    pub outbound_queue: usize,
    /// Bytes a second one authenticated inbound stream may send; above it (and
    /// its burst) the stream stops being read for a while (TCP backpressure,
    /// nothing dropped). The default never bites a normal server.
    pub peer_bytes_per_sec: u64,
    /// Stanzas a second one authenticated inbound stream may send (as above).
    pub peer_stanzas_per_sec: u64,
    /// The burst above those rates: this many seconds' worth at once.
    pub peer_burst_secs: u64,
    /// Most authenticated inbound streams from one domain at once; one more is
    /// closed with `policy-violation`.
    pub max_streams_per_domain: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_stanza_bytes_unauthenticated: 16 * 1024,
            max_stanza_bytes: 512 * 1024,
            max_depth: 48,
            max_attributes: 64,
            max_connections: 10_000,
            max_connections_per_ip: 200,
            outbound_queue: 10_000,
            peer_bytes_per_sec: 32 * 1024 * 1024,
            peer_stanzas_per_sec: 100_000,
            peer_burst_secs: 5,
            max_streams_per_domain: 16,
        }
    }
}

/// Timeouts, in seconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// A peer must finish TLS and authentication within this time.
    pub negotiation_secs: u64,
    /// A stream with no traffic either way for this long is closed.
    pub idle_secs: u64,
    /// Send a whitespace keepalive after this long without writing.
    pub keepalive_secs: u64,
    /// One TCP connection attempt (per address).
    pub connect_secs: u64,
    /// How long stanzas for an unreachable domain wait (while reconnecting with
    /// backoff) before they are bounced.
    pub retry_window_secs: u64,
    /// On shutdown, how long inbound streams get to settle and acknowledge
    /// what they received (XEP-0198) while everything else still runs, and
    /// then how long connections and tasks get to close cleanly.
    pub shutdown_grace_secs: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            negotiation_secs: 30,
            idle_secs: 600,
            keepalive_secs: 60,
            connect_secs: 10,
            retry_window_secs: 30,
            shutdown_grace_secs: 5,
        }
    }
}

impl Timeouts {
    /// As durations: (negotiation, idle, keepalive, connect, retry window).
    pub fn negotiation(&self) -> Duration {
        Duration::from_secs(self.negotiation_secs)
    }
    /// Idle timeout.
    pub fn idle(&self) -> Duration {
        Duration::from_secs(self.idle_secs)
    }
    /// Keepalive interval.
    pub fn keepalive(&self) -> Duration {
        Duration::from_secs(self.keepalive_secs)
    }
    /// Connect timeout.
    pub fn connect(&self) -> Duration {
        Duration::from_secs(self.connect_secs)
    }
    /// Retry window.
    pub fn retry_window(&self) -> Duration {
        Duration::from_secs(self.retry_window_secs)
    }
}

/// A resolved static target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticTarget {
    /// Address to connect to.
    pub addr: SocketAddr,
    /// XEP-0368 direct TLS rather than STARTTLS.
    pub direct_tls: bool,
}

impl StaticTarget {
    /// Parse `IP:PORT` or `tls://IP:PORT`.
    pub fn parse(s: &str) -> Option<StaticTarget> {
        let (direct_tls, rest) = match s.strip_prefix("tls://") {
            Some(r) => (true, r),
            None => (false, s),
        };
        rest.parse()
            .ok()
            .map(|addr| StaticTarget { addr, direct_tls })
    }
}

/// Normalize a domain name as XMPP compares them (RFC 7622 §3.2).
pub fn normalize_domain(d: &str) -> Option<String> {
    let j = jid::BareJid::new(d).ok()?;
    if j.node().is_some() {
        return None;
    }
    Some(j.domain().as_str().to_string())
}

impl Config {
    /// Parse TOML text and check it.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let mut c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        c.check()?;
        Ok(c)
    }

    /// Read, parse and check a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text)
    }

    /// The room services: (`<subdomain>.<domain>`, its hosted domain) for each
    /// hosted domain; none when rooms are off.
    pub fn room_services(&self) -> Vec<(String, String)> {
        if self.rooms.subdomain.is_empty() {
            return Vec::new();
        }
        self.domains
            .iter()
            .map(|d| (format!("{}.{d}", self.rooms.subdomain), d.clone()))
            .collect()
    }

    /// Every domain we answer for: the hosted domains, then the room services.
    pub fn served_domains(&self) -> Vec<String> {
        let mut all = self.domains.clone();
        all.extend(self.room_services().into_iter().map(|(s, _)| s));
        all
    }

    /// Check values and normalize domains in place.
    pub fn check(&mut self) -> Result<(), ConfigError> {
        if self.domains.is_empty() {
            return Err(invalid("domains", "at least one hosted domain is required"));
        }
        let norm = |field: String, list: &mut Vec<String>| -> Result<(), ConfigError> {
            for (i, d) in list.iter_mut().enumerate() {
                *d = normalize_domain(d).ok_or_else(|| {
                    invalid(
                        format!("{field}[{i}]"),
                        format!("`{d}` is not a valid domain"),
                    )
                })?;
            }
            Ok(())
        };
        norm("domains".into(), &mut self.domains)?;
        norm(
            "federation.allowlist".into(),
            &mut self.federation.allowlist,
        )?;
        norm(
            "federation.blocklist".into(),
            &mut self.federation.blocklist,
        )?;
        for d in &self.domains {
            if self.federation.blocklist.contains(d) || self.federation.allowlist.contains(d) {
                return Err(invalid(
                    "federation",
                    format!("`{d}` is hosted here and cannot be a federation peer"),
                ));
            }
        }
        if !self.rooms.subdomain.is_empty() {
            let sub = &self.rooms.subdomain;
            match normalize_domain(sub) {
                Some(n) if !n.contains('.') => self.rooms.subdomain = n,
                _ => {
                    return Err(invalid(
                        "rooms.subdomain",
                        format!("`{sub}` is not one DNS label (like `conference`)"),
                    ));
                }
            }
            for (service, _) in self.room_services() {
                if self.domains.contains(&service) {
                    return Err(invalid(
                        "rooms.subdomain",
                        format!("the room service `{service}` is also a hosted domain"),
                    ));
                }
            }
        }
        if self.rooms.history_default > self.rooms.history_max {
            return Err(invalid(
                "rooms.history_default",
                "must not be more than rooms.history_max",
            ));
        }
        if self.rooms.self_ping_secs < 10 {
            return Err(invalid(
                "rooms.self_ping_secs",
                "must be at least 10 (a self-ping takes up to 30 s)",
            ));
        }
        let mut overrides = BTreeMap::new();
        for (domain, targets) in &self.dns.overrides {
            let field = format!("dns.overrides.\"{domain}\"");
            let d =
                normalize_domain(domain).ok_or_else(|| invalid(&field, "not a valid domain"))?;
            if targets.is_empty() {
                return Err(invalid(&field, "needs at least one target"));
            }
            for t in targets {
                if StaticTarget::parse(t).is_none() {
                    return Err(invalid(
                        &field,
                        format!("`{t}` is not `IP:PORT` or `tls://IP:PORT`"),
                    ));
                }
            }
            overrides.insert(d, targets.clone());
        }
        self.dns.overrides = overrides;
        let l = &self.limits;
        for (field, v, min) in [
            (
                "limits.max_stanza_bytes_unauthenticated",
                l.max_stanza_bytes_unauthenticated,
                4096,
            ),
            ("limits.max_stanza_bytes", l.max_stanza_bytes, 10_000),
            ("limits.max_depth", l.max_depth, 8),
            ("limits.max_attributes", l.max_attributes, 8),
            ("limits.max_connections", l.max_connections, 1),
            ("limits.max_connections_per_ip", l.max_connections_per_ip, 1),
            ("limits.outbound_queue", l.outbound_queue, 1),
            ("limits.max_streams_per_domain", l.max_streams_per_domain, 1),
            ("api.max_batch", self.api.max_batch, 1),
        ] {
            if v < min {
                return Err(invalid(field, format!("must be at least {min}")));
            }
        }
        if l.peer_bytes_per_sec < l.max_stanza_bytes as u64 {
            return Err(invalid(
                "limits.peer_bytes_per_sec",
                "must be at least limits.max_stanza_bytes (a largest stanza a second)",
            ));
        }
        for (field, v) in [
            ("limits.peer_stanzas_per_sec", l.peer_stanzas_per_sec),
            ("limits.peer_burst_secs", l.peer_burst_secs),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        let t = &self.timeouts;
        for (field, v) in [
            ("timeouts.negotiation_secs", t.negotiation_secs),
            ("timeouts.idle_secs", t.idle_secs),
            ("timeouts.keepalive_secs", t.keepalive_secs),
            ("timeouts.connect_secs", t.connect_secs),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        if self.api.token.as_deref().is_some_and(|t| t.len() < 16) {
            return Err(invalid("api.token", "must be at least 16 characters"));
        }
        if self
            .api
            .status_token
            .as_deref()
            .is_some_and(|t| t.len() < 16)
        {
            return Err(invalid(
                "api.status_token",
                "must be at least 16 characters",
            ));
        }
        if self.delivery.retry_secs == 0 {
            return Err(invalid("delivery.retry_secs", "must be at least 1"));
        }
        if self.delivery.max_retry_secs < self.delivery.retry_secs {
            return Err(invalid(
                "delivery.max_retry_secs",
                "must be at least delivery.retry_secs",
            ));
        }
        if self.delivery.window == 0 || self.delivery.window > l.outbound_queue {
            return Err(invalid(
                "delivery.window",
                format!(
                    "must be between 1 and limits.outbound_queue ({})",
                    l.outbound_queue
                ),
            ));
        }
        if !(1..=1 << 20).contains(&self.store.cache_mib) {
            return Err(invalid("store.cache_mib", "must be between 1 and 1048576"));
        }
        if !(1..=60).contains(&self.delivery.confirm_wait_secs) {
            return Err(invalid(
                "delivery.confirm_wait_secs",
                "must be between 1 and 60",
            ));
        }
        if self.listen.starttls.is_empty() && self.listen.direct_tls.is_empty() {
            return Err(invalid("listen", "needs at least one listener"));
        }
        Ok(())
    }

    /// Parsed static targets for a domain, if overridden.
    pub fn static_targets(&self, domain: &str) -> Option<Vec<StaticTarget>> {
        self.dns
            .overrides
            .get(domain)
            .map(|v| v.iter().filter_map(|t| StaticTarget::parse(t)).collect())
    }

    /// The framer limits before and after authentication.
    pub fn framer_limits(&self, authenticated: bool) -> crate::xml::Limits {
        crate::xml::Limits {
            max_stanza_bytes: if authenticated {
                self.limits.max_stanza_bytes
            } else {
                self.limits.max_stanza_bytes_unauthenticated
            },
            max_depth: self.limits.max_depth,
            max_attrs: self.limits.max_attributes,
            max_header_bytes: 4096,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let text = include_str!("../fixtures/config/example.toml");
        let c = Config::from_toml(text).unwrap();
        assert_eq!(c.domains, vec!["wire.example".to_string()]);
        assert_eq!(c.federation.mode, FederationMode::Open);
        assert!(c.federation.bidi);
    }

    #[test]
    fn empty_config_is_the_default() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.domains, vec!["localhost".to_string()]);
        assert_eq!(c.listen.starttls.len(), 1);
    }

    #[test]
    fn errors_name_the_field() {
        let e = Config::from_toml("domains = ['a@b']")
            .unwrap_err()
            .to_string();
        assert!(e.contains("domains[0]"), "{e}");
        let e = Config::from_toml("[limits]\nmax_depth = 2")
            .unwrap_err()
            .to_string();
        assert!(e.contains("limits.max_depth"), "{e}");
        for (toml, field, why) in [
            (
                "[limits]\npeer_bytes_per_sec = 1000",
                "limits.peer_bytes_per_sec",
                "",
            ),
            (
                "[limits]\npeer_stanzas_per_sec = 0",
                "limits.peer_stanzas_per_sec",
                "",
            ),
            (
                "[limits]\npeer_burst_secs = 0",
                "limits.peer_burst_secs",
                "",
            ),
            (
                "[limits]\nmax_streams_per_domain = 0",
                "limits.max_streams_per_domain",
                "",
            ),
            ("[store]\ncache_mib = 0", "store.cache_mib", ""),
            (
                "[delivery]\nconfirm_wait_secs = 0",
                "delivery.confirm_wait_secs",
                "between 1 and 60",
            ),
            (
                "[delivery]\nconfirm_wait_secs = 61",
                "delivery.confirm_wait_secs",
                "between 1 and 60",
            ),
        ] {
            let e = Config::from_toml(toml).unwrap_err().to_string();
            assert!(e.contains(field) && e.contains(why), "{e}");
        }
        let e = Config::from_toml("[dns.overrides]\n'x.test' = ['nope']")
            .unwrap_err()
            .to_string();
        assert!(e.contains("dns.overrides"), "{e}");
        let e = Config::from_toml("[federation]\nmood = 'open'")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mood"), "{e}");
        let e = Config::from_toml("[federation]\nmode = 'maybe'")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mode"), "{e}");
        for bad in ["'yes'", "1", "'true'"] {
            let e = Config::from_toml(&format!("[federation]\nbidi = {bad}"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("bidi = ") && e.contains("expected true or false"),
                "{e}"
            );
        }
    }

    #[test]
    fn bidi_is_on_by_default_and_can_be_turned_off() {
        assert!(Config::from_toml("").unwrap().federation.bidi);
        let c = Config::from_toml("[federation]\nbidi = false").unwrap();
        assert!(!c.federation.bidi);
    }

    #[test]
    fn domains_are_normalized() {
        let c = Config::from_toml("domains = ['Wire.EXAMPLE']").unwrap();
        assert_eq!(c.domains, vec!["wire.example".to_string()]);
    }
}
