//! Test certificates: a private CA and leaf certificates per domain (rcgen).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Which extended key usages a leaf carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eku {
    /// serverAuth and clientAuth (what most s2s certificates carried until 2026).
    Both,
    /// serverAuth only (Let's Encrypt from 2026).
    ServerOnly,
    /// No EKU extension.
    None,
}

/// A private test CA.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// A leaf certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// Leaf certificate followed by the CA certificate.
    pub chain_pem: String,
    /// PKCS#8 private key.
    pub key_pem: String,
}

/// Files written for a leaf.
#[derive(Debug, Clone)]
pub struct LeafFiles {
    /// Chain (leaf + CA), PEM.
    pub cert: PathBuf,
    /// Key, PEM.
    pub key: PathBuf,
    /// Key + leaf + CA in one file (ejabberd's form).
    pub combined: PathBuf,
}

/// Validity from a year ago to five years ahead, in whole years: rcgen's default
/// (1975..4096) makes ejabberd 23.01's certificate code crash on the year 4096.
fn validity(p: &mut CertificateParams) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let year = 1970 + (secs / 31_556_952) as i32;
    p.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    p.not_after = rcgen::date_time_ymd(year + 5, 1, 1);
}

impl TestCa {
    /// A new CA named `name`.
    pub fn new(name: &str) -> TestCa {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("empty SAN list is valid");
        p.distinguished_name.push(DnType::CommonName, name);
        p.distinguished_name
            .push(DnType::OrganizationName, "xmpp-federator tests");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        validity(&mut p);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("key generation");
        let cert = p.self_signed(&key).expect("self-signing");
        TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// A leaf for `domain` with dNSName `domain` and `*.domain`; `xmpp_addr` adds an
    /// id-on-xmppAddr for `domain`.
    pub fn leaf(&self, domain: &str, eku: Eku, xmpp_addr: bool) -> Leaf {
        self.leaf_for(&[domain], eku, xmpp_addr)
    }

    /// A leaf for several domains (a server hosting them all, whatever name a
    /// peer asks for, or none: clients without SNI get the one certificate):
    /// dNSName `d` and `*.d` for each; `xmpp_addr` adds an id-on-xmppAddr for
    /// each. The first names the subject.
    pub fn leaf_for(&self, domains: &[&str], eku: Eku, xmpp_addr: bool) -> Leaf {
        let domain = domains.first().copied().unwrap_or("localhost");
        let names = domains
            .iter()
            .flat_map(|d| [d.to_string(), format!("*.{d}")])
            .collect::<Vec<_>>();
        let mut p = CertificateParams::new(names).expect("valid DNS names");
        if xmpp_addr {
            for d in domains {
                p.subject_alt_names.push(SanType::OtherName((
                    vec![1, 3, 6, 1, 5, 5, 7, 8, 5],
                    d.to_string().into(),
                )));
            }
        }
        p.distinguished_name.push(DnType::CommonName, domain);
        validity(&mut p);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = match eku {
            Eku::Both => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Eku::ServerOnly => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Eku::None => vec![],
        };
        let key = KeyPair::generate().expect("key generation");
        let cert = p.signed_by(&key, &self.issuer).expect("signing");
        Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.pem),
            key_pem: key.serialize_pem(),
        }
    }

    /// Write `ca.pem` into `dir`.
    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).expect("create cert dir");
        let p = dir.join("ca.pem");
        std::fs::write(&p, &self.pem).expect("write CA");
        p
    }
}

impl Leaf {
    /// Write `NAME.crt`, `NAME.key` and `NAME.pem` (key + chain) into `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> LeafFiles {
        std::fs::create_dir_all(dir).expect("create cert dir");
        let files = LeafFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            combined: dir.join(format!("{name}.pem")),
        };
        std::fs::write(&files.cert, &self.chain_pem).expect("write cert");
        std::fs::write(&files.key, &self.key_pem).expect("write key");
        std::fs::write(
            &files.combined,
            format!("{}{}", self.key_pem, self.chain_pem),
        )
        .expect("write combined");
        files
    }
}
