//! TLS for s2s: our certificates (selected by SNI), trust roots, and our own peer
//! certificate verification (RFC 6120 §13.7.2, XEP-0178, RFC 6125/9525).
//!
//! Why our own verifier: rustls' `WebPkiClientVerifier` requires the clientAuth EKU,
//! but since 2026 public CAs (Let's Encrypt) issue serverAuth-only certificates and
//! Prosody/ejabberd present exactly those as s2s client certificates. We accept a
//! peer certificate whose EKU is absent, serverAuth or clientAuth, and we match the
//! *XMPP domain* against dNSName (with wildcards), id-on-xmppAddr and SRV-ID.
//!
//! Inbound, the TLS handshake accepts any client certificate whose handshake
//! signature verifies (proof of key possession); the chain and the names are
//! checked after the stream restart, against the peer's stream `from`, so that a
//! refused peer gets a `<not-authorized/>` stream error that says why instead of a
//! bare TLS alert.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::config::Config;

/// ALPN protocol of XEP-0368 direct TLS s2s.
pub const ALPN_XMPP_SERVER: &[u8] = b"xmpp-server";

const OID_XMPP_ADDR: &str = "1.3.6.1.5.5.7.8.5";
const OID_SRV_NAME: &str = "1.3.6.1.5.5.7.8.7";

/// Errors setting up TLS.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the material.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// A hosted domain has no certificate.
    #[error(
        "no certificate covers `{0}` (a hosted domain or room service; set rooms.subdomain = \"\" to run without rooms)"
    )]
    NoCertificate(String),
    /// Certificate generation failed.
    #[error("generating a development certificate: {0}")]
    Generate(String),
}

/// Why a peer certificate does not authenticate a domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerCertError {
    /// The peer presented no certificate.
    #[error("no certificate was presented")]
    Missing,
    /// The chain does not verify against our trust roots (or has expired...).
    #[error("certificate not trusted: {0}")]
    Untrusted(String),
    /// The chain is fine but no name in it is the domain.
    #[error("certificate is not valid for {domain} (it names {names})")]
    WrongName {
        /// The domain asked for.
        domain: String,
        /// What the certificate names.
        names: String,
    },
}

/// Whether a DER certificate may be used as a TLS client certificate by the
/// extended key usage a strict peer checks: `Some(false)` when it has an EKU
/// extension without clientAuth (Let's Encrypt's serverAuth-only certificates
/// since 2026; ejabberd before 25.07 and Metronome refuse them for SASL
/// EXTERNAL), `Some(true)` when clientAuth is there or there is no EKU
/// extension, `None` when the certificate cannot be read.
pub fn allows_client_auth(der: &[u8]) -> Option<bool> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    match cert.extended_key_usage() {
        Ok(Some(eku)) => Some(eku.value.client_auth || eku.value.any),
        Ok(None) => Some(true),
        Err(_) => None,
    }
}

/// The names a certificate asserts, per kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertNames {
    /// dNSName entries (possibly wildcards).
    pub dns: Vec<String>,
    /// id-on-xmppAddr entries.
    pub xmpp_addr: Vec<String>,
    /// SRV-ID entries (`_service.domain`).
    pub srv: Vec<String>,
}

impl CertNames {
    /// Read the subjectAltName of a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<CertNames, String> {
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        let mut names = CertNames::default();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for gn in &san.value.general_names {
                match gn {
                    GeneralName::DNSName(d) => names.dns.push(d.to_ascii_lowercase()),
                    GeneralName::OtherName(oid, value) => {
                        let oid = oid.to_id_string();
                        if let Some(s) = der_string(value) {
                            if oid == OID_XMPP_ADDR {
                                names.xmpp_addr.push(s.to_lowercase());
                            } else if oid == OID_SRV_NAME {
                                names.srv.push(s.to_ascii_lowercase());
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(names)
    }

    /// Whether these names authenticate the XMPP server `domain` (RFC 6120 §13.7.1.2,
    /// RFC 9525 §6.3: a wildcard matches exactly one leftmost label).
    pub fn matches(&self, domain: &str) -> bool {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        self.xmpp_addr.contains(&domain)
            || self.srv.iter().any(|s| {
                s.strip_prefix("_xmpp-server.")
                    .or_else(|| s.strip_prefix("_xmpps-server."))
                    == Some(domain.as_str())
            })
            || self.dns.iter().any(|d| dns_name_matches(d, &domain))
    }

    fn summary(&self) -> String {
        let all: Vec<&str> = self
            .dns
            .iter()
            .chain(&self.xmpp_addr)
            .chain(&self.srv)
            .map(String::as_str)
            .collect();
        if all.is_empty() {
            "no names".into()
        } else {
            all.join(", ")
        }
    }
}

fn dns_name_matches(pattern: &str, domain: &str) -> bool {
    let pattern = pattern.trim_end_matches('.');
    if let Some(suffix) = pattern.strip_prefix("*.") {
        match domain.split_once('.') {
            Some((label, rest)) => !label.is_empty() && rest == suffix && suffix.contains('.'),
            None => false,
        }
    } else {
        pattern == domain
    }
}

/// The string inside an otherName value: `[0] EXPLICIT` around a UTF8String or
/// IA5String (x509-parser hands us the undecoded value).
fn der_string(mut v: &[u8]) -> Option<String> {
    fn take_tlv(v: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = v.split_first()?;
        let (&len0, rest) = rest.split_first()?;
        let (len, rest) = if len0 < 0x80 {
            (len0 as usize, rest)
        } else {
            let n = (len0 & 0x7f) as usize;
            if n == 0 || n > 3 || rest.len() < n {
                return None;
            }
            let len = rest[..n].iter().fold(0usize, |a, b| (a << 8) | *b as usize);
            (len, &rest[n..])
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }
    if v.first() == Some(&0xa0) {
        v = take_tlv(v)?.1;
    }
    let (tag, body, _) = take_tlv(v)?;
    matches!(tag, 0x0c | 0x16)
        .then(|| String::from_utf8(body.to_vec()).ok())
        .flatten()
}

/// Accept an EKU extension that is absent or lists serverAuth or clientAuth.
struct ServerIdentityEku;

impl webpki::ExtendedKeyUsageValidator for ServerIdentityEku {
    fn validate(&self, iter: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        const SERVER_AUTH: &[u8] = &[0x2b, 6, 1, 5, 5, 7, 3, 1];
        const CLIENT_AUTH: &[u8] = &[0x2b, 6, 1, 5, 5, 7, 3, 2];
        let mut empty = true;
        for id in iter {
            empty = false;
            let id = id?;
            if id == webpki::KeyPurposeId::new(SERVER_AUTH)
                || id == webpki::KeyPurposeId::new(CLIENT_AUTH)
            {
                return Ok(());
            }
        }
        if empty {
            Ok(())
        } else {
            #[allow(deprecated)] // the context variant cannot be built outside webpki
            Err(webpki::Error::RequiredEkuNotFound)
        }
    }
}

/// Verifies peer certificates for XMPP domains, in both directions.
#[derive(Debug)]
pub struct PeerVerifier {
    roots: Vec<TrustAnchor<'static>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PeerVerifier {
    /// A verifier trusting these roots.
    pub fn new(roots: Vec<TrustAnchor<'static>>, provider: &CryptoProvider) -> Self {
        PeerVerifier {
            roots,
            algorithms: provider.signature_verification_algorithms,
        }
    }

    /// Number of trust anchors.
    pub fn root_count(&self) -> usize {
        self.roots.len()
    }

    /// Check a presented chain (leaf first) for `domain` at time `now`.
    pub fn authenticate(
        &self,
        chain: &[CertificateDer<'_>],
        domain: &str,
        now: UnixTime,
    ) -> Result<(), PeerCertError> {
        let (leaf, intermediates) = chain.split_first().ok_or(PeerCertError::Missing)?;
        let cert = webpki::EndEntityCert::try_from(leaf)
            .map_err(|e| PeerCertError::Untrusted(format!("{e:?}")))?;
        cert.verify_for_usage(
            self.algorithms.all,
            &self.roots,
            intermediates,
            now,
            ServerIdentityEku,
            None,
            None,
        )
        .map_err(|e| PeerCertError::Untrusted(describe_webpki(&e)))?;
        let names = CertNames::from_der(leaf).map_err(PeerCertError::Untrusted)?;
        if names.matches(domain) {
            Ok(())
        } else {
            Err(PeerCertError::WrongName {
                domain: domain.to_string(),
                names: names.summary(),
            })
        }
    }
}

fn describe_webpki(e: &webpki::Error) -> String {
    match e {
        webpki::Error::UnknownIssuer => "issued by an unknown CA".into(),
        webpki::Error::CertExpired { .. } => "expired".into(),
        webpki::Error::CertNotValidYet { .. } => "not valid yet".into(),
        other => format!("{other:?}"),
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let domain = match server_name {
            ServerName::DnsName(d) => d.as_ref().to_string(),
            other => other.to_str().to_string(),
        };
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        self.authenticate(&chain, &domain, now)
            .map(|()| ServerCertVerified::assertion())
            .map_err(|e| rustls::Error::General(e.to_string()))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A server certificate verifier that lets every handshake through (its
/// signature still proves the peer holds the certificate's key) and leaves the
/// chain and name to [`PeerVerifier::authenticate`] after the handshake: for
/// outbound streams where dialback may stand in for an unverifiable certificate
/// (`federation.dialback = "fallback"`), so a peer with a self-signed
/// certificate can still be reached and is told who we are.
#[derive(Debug)]
pub struct DeferredServerVerifier(pub Arc<PeerVerifier>);

impl ServerCertVerifier for DeferredServerVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls12_signature(&*self.0, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls13_signature(&*self.0, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ServerCertVerifier::supported_verify_schemes(&*self.0)
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // A peer without a certificate gets a clear stream error after TLS.
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Deferred on purpose: the chain and the names are checked against the
        // stream's `from` after TLS (module docs). The handshake signature below
        // still proves the peer holds the certificate's key.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// One of our certificates with the names it covers.
#[derive(Debug)]
struct OurCert {
    key: Arc<CertifiedKey>,
    names: CertNames,
}

/// Picks our certificate by SNI; falls back to the first hosted domain's.
#[derive(Debug)]
struct SniResolver {
    by_domain: HashMap<String, Arc<CertifiedKey>>,
    fallback: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let key = hello
            .server_name()
            .and_then(|n| self.by_domain.get(&n.to_ascii_lowercase()))
            .unwrap_or(&self.fallback);
        Some(key.clone())
    }
}

/// Always presents our certificate for the local domain as client certificate.
#[derive(Debug)]
struct ClientCert(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Everything TLS the server needs, built once from the config.
#[derive(Debug)]
pub struct TlsContext {
    /// For STARTTLS (no ALPN).
    pub server_starttls: Arc<rustls::ServerConfig>,
    /// For direct TLS (ALPN `xmpp-server`).
    pub server_direct: Arc<rustls::ServerConfig>,
    /// Per hosted domain: (STARTTLS, direct TLS) client configs with that domain's certificate.
    pub clients: HashMap<String, (Arc<rustls::ClientConfig>, Arc<rustls::ClientConfig>)>,
    /// The same with the server certificate checked after the handshake
    /// ([`DeferredServerVerifier`]), for when dialback may stand in for it.
    pub clients_deferred: HashMap<String, (Arc<rustls::ClientConfig>, Arc<rustls::ClientConfig>)>,
    /// The peer verifier (also used after STARTTLS inbound).
    pub verifier: Arc<PeerVerifier>,
    /// Whether the certificates were generated (development mode).
    pub generated: bool,
    /// Per served domain: when our certificate for it expires (unix seconds,
    /// its `notAfter`).
    pub not_after: HashMap<String, i64>,
}

/// A certificate's `notAfter` (unix seconds).
pub fn cert_not_after(der: &[u8]) -> Option<i64> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// The crypto provider we use everywhere.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Read a PEM chain.
pub fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |message: String| TlsError::Pem {
        path: path.display().to_string(),
        message,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no certificate in file".into()));
    }
    Ok(certs)
}

/// Read a PEM private key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// A self-signed development certificate for `domains` (and their subdomains).
pub fn generate_dev_cert(
    domains: &[String],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let mut names = Vec::new();
    for d in domains {
        names.push(d.clone());
        names.push(format!("*.{d}"));
    }
    let ck =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    Ok((vec![ck.cert.der().clone()], key))
}

impl TlsContext {
    /// Build from the config: load (or generate) certificates and trust roots.
    pub fn from_config(config: &Config) -> Result<TlsContext, TlsError> {
        let provider = provider();
        let mut chains = Vec::new();
        let generated = config.tls.certificates.is_empty();
        if generated {
            chains.push(generate_dev_cert(&config.served_domains())?);
        } else {
            for c in &config.tls.certificates {
                chains.push((load_chain(&c.cert)?, load_key(&c.key)?));
            }
        }
        let mut ours = Vec::new();
        for (chain, key) in chains {
            let names = CertNames::from_der(&chain[0]).map_err(|m| TlsError::Pem {
                path: "certificate".into(),
                message: m,
            })?;
            let signing = provider.key_provider.load_private_key(key)?;
            ours.push(OurCert {
                key: Arc::new(CertifiedKey::new(chain, signing)),
                names,
            });
        }
        let mut by_domain = HashMap::new();
        let mut not_after = HashMap::new();
        for d in &config.served_domains() {
            let c = ours
                .iter()
                .find(|c| c.names.matches(d))
                .ok_or_else(|| TlsError::NoCertificate(d.clone()))?;
            by_domain.insert(d.clone(), c.key.clone());
            if let Some(t) = c.key.cert.first().and_then(|der| cert_not_after(der)) {
                not_after.insert(d.clone(), t);
            }
        }
        let fallback = by_domain[&config.domains[0]].clone();

        let mut roots = Vec::new();
        if config.tls.system_roots {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                if let Ok(ta) = webpki::anchor_from_trusted_cert(&c) {
                    roots.push(ta.to_owned());
                }
            }
        }
        for path in &config.tls.ca_files {
            for c in load_chain(path)? {
                let ta = webpki::anchor_from_trusted_cert(&c).map_err(|e| TlsError::Pem {
                    path: path.display().to_string(),
                    message: format!("not a usable CA certificate: {e:?}"),
                })?;
                roots.push(ta.to_owned());
            }
        }
        let verifier = Arc::new(PeerVerifier::new(roots, &provider));
        let resolver = Arc::new(SniResolver {
            by_domain: by_domain.clone(),
            fallback,
        });
        let server = |alpn: bool| -> Result<Arc<rustls::ServerConfig>, TlsError> {
            let mut sc = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()?
                .with_client_cert_verifier(verifier.clone())
                .with_cert_resolver(resolver.clone());
            if alpn {
                sc.alpn_protocols = vec![ALPN_XMPP_SERVER.to_vec()];
            }
            Ok(Arc::new(sc))
        };
        let mut clients = HashMap::new();
        let mut clients_deferred = HashMap::new();
        let deferred: Arc<dyn ServerCertVerifier> =
            Arc::new(DeferredServerVerifier(verifier.clone()));
        for (d, key) in &by_domain {
            let client = |alpn: bool,
                          v: Arc<dyn ServerCertVerifier>|
             -> Result<Arc<rustls::ClientConfig>, TlsError> {
                let mut cc = rustls::ClientConfig::builder_with_provider(provider.clone())
                    .with_safe_default_protocol_versions()?
                    .dangerous()
                    .with_custom_certificate_verifier(v)
                    .with_client_cert_resolver(Arc::new(ClientCert(key.clone())));
                if alpn {
                    cc.alpn_protocols = vec![ALPN_XMPP_SERVER.to_vec()];
                }
                Ok(Arc::new(cc))
            };
            let strict: Arc<dyn ServerCertVerifier> = verifier.clone();
            clients.insert(
                d.clone(),
                (client(false, strict.clone())?, client(true, strict)?),
            );
            clients_deferred.insert(
                d.clone(),
                (
                    client(false, deferred.clone())?,
                    client(true, deferred.clone())?,
                ),
            );
        }
        Ok(TlsContext {
            server_starttls: server(false)?,
            server_direct: server(true)?,
            clients,
            clients_deferred,
            verifier,
            generated,
            not_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_one_label() {
        assert!(dns_name_matches("*.example.com", "a.example.com"));
        assert!(!dns_name_matches("*.example.com", "example.com"));
        assert!(!dns_name_matches("*.example.com", "a.b.example.com"));
        assert!(!dns_name_matches("*.com", "example.com"));
        assert!(dns_name_matches("example.com", "example.com"));
    }

    #[test]
    fn names_match_kinds() {
        let n = CertNames {
            dns: vec!["*.a.test".into()],
            xmpp_addr: vec!["x.test".into()],
            srv: vec!["_xmpp-server.s.test".into()],
        };
        assert!(n.matches("b.a.test"));
        assert!(n.matches("X.TEST"));
        assert!(n.matches("s.test"));
        assert!(!n.matches("a.test"));
        assert!(!n.matches("y.test"));
    }

    #[test]
    fn der_strings() {
        assert_eq!(
            der_string(&[0xa0, 4, 0x0c, 2, b'h', b'i']).as_deref(),
            Some("hi")
        );
        assert_eq!(der_string(&[0x16, 1, b'x']).as_deref(), Some("x"));
        assert_eq!(der_string(&[0x04, 1, b'x']), None);
        assert_eq!(der_string(&[0xa0, 9, 0x0c]), None);
    }
}
