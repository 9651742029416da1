//! A scripted s2s initiator that can present any certificate (or none) and claim any
//! domain, to show how a receiving server treats it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use xmpp_federator::s2s::tls::{self, PeerVerifier};

const NS: &str = "xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'";

/// What the receiving server did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// SASL EXTERNAL succeeded.
    Authenticated,
    /// Refused; the text is what the server sent last.
    Refused(String),
}

async fn read_until<S: AsyncRead + Unpin>(io: &mut S, needles: &[&str]) -> String {
    let mut buf = vec![0u8; 8192];
    let mut got = String::new();
    while !needles.iter().any(|n| got.contains(n)) {
        let n = match tokio::time::timeout(Duration::from_secs(15), io.read(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => 0,
        };
        if n == 0 {
            break;
        }
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    got
}

fn client_config(
    ca: &Path,
    cert: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = tls::provider();
    let ca = tls::load_chain(ca).map_err(|e| e.to_string())?;
    let roots = vec![
        webpki::anchor_from_trusted_cert(&ca[0])
            .map_err(|e| format!("{e:?}"))?
            .to_owned(),
    ];
    let verifier = Arc::new(PeerVerifier::new(roots, &provider));
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let c = match cert {
        Some((cert, key)) => b
            .with_client_auth_cert(
                tls::load_chain(cert).map_err(|e| e.to_string())?,
                tls::load_key(key).map_err(|e| e.to_string())?,
            )
            .map_err(|e| e.to_string())?,
        None => b.with_no_client_auth(),
    };
    Ok(Arc::new(c))
}

/// Open an s2s stream to `addr` claiming `from`, with `cert` (chain, key) as TLS
/// client certificate, verifying the server against `ca` for `to`.
pub async fn attempt(
    addr: SocketAddr,
    from: &str,
    to: &str,
    cert: Option<(&Path, &Path)>,
    ca: &Path,
) -> Result<Outcome, String> {
    let cfg = client_config(ca, cert)?;
    let mut tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let header = format!("<stream:stream {NS} from='{from}' to='{to}' version='1.0'>");
    tcp.write_all(header.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let got = read_until(&mut tcp, &["</stream:features>", "</stream:stream>"]).await;
    if !got.contains("starttls") {
        return Ok(Outcome::Refused(got));
    }
    tcp.write_all(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        .await
        .map_err(|e| e.to_string())?;
    let got = read_until(&mut tcp, &["<proceed", "failure"]).await;
    if !got.contains("<proceed") {
        return Ok(Outcome::Refused(got));
    }
    let name =
        rustls::pki_types::ServerName::try_from(to.to_string()).map_err(|e| e.to_string())?;
    let mut tls = match tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
    {
        Ok(t) => t,
        Err(e) => return Ok(Outcome::Refused(format!("TLS: {e}"))),
    };
    if tls.write_all(header.as_bytes()).await.is_err() {
        return Ok(Outcome::Refused("connection closed after TLS".into()));
    }
    let got = read_until(
        &mut tls,
        &[
            "</stream:features>",
            "</stream:stream>",
            "<stream:features/>",
        ],
    )
    .await;
    if !got.contains("EXTERNAL") {
        return Ok(Outcome::Refused(got));
    }
    let auth = "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>";
    if tls.write_all(auth.as_bytes()).await.is_err() {
        return Ok(Outcome::Refused("connection closed".into()));
    }
    let got = read_until(&mut tls, &["<success", "</failure>", "</stream:stream>"]).await;
    Ok(if got.contains("<success") {
        Outcome::Authenticated
    } else {
        Outcome::Refused(got)
    })
}
