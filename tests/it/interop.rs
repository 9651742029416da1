//! Real Prosody 0.12 and ejabberd 23.01 (Debian packages) on loopback, federating
//! with us over s2s authenticated by certificates (`prosody`, `ejabberd`: no
//! dialback loaded) and by dialback where certificates cannot serve
//! (`ejabberd_dialback`: our certificate has only serverAuth, which 23.01
//! refuses; `prosody_dialback`: Prosody's certificate is self-signed, and the
//! federation status shows its dialback stream, ours by EXTERNAL with acks).
//!
//! The packages are installed when missing (as root). These tests never skip
//! silently: without the packages and without root they fail with instructions;
//! `XMPP_FEDERATOR_SKIP_INTEROP=1` skips them explicitly (not in CI).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;

use xmpp_federator::app::{Running, start};
use xmpp_federator_testkit::certs::{Eku, LeafFiles, TestCa};
use xmpp_federator_testkit::dns::DnsServer;
use xmpp_federator_testkit::instance_config;
use xmpp_federator_testkit::interop::{
    self, Ejabberd, Prosody, ServerSpec, Work, ensure_packages, ensure_venv,
};
use xmpp_federator_testkit::raw::{self, Outcome};

use serde_json::json;
use xmpp_federator_testkit::interop::BackgroundClient;

use crate::support::{PING, TOKEN, http, iq_round_trip, wait_event};

pub(crate) const WIRE: &str = "wire.test";

pub(crate) fn enabled() -> bool {
    if std::env::var("XMPP_FEDERATOR_SKIP_INTEROP").as_deref() == Ok("1") {
        eprintln!("SKIPPED: interop test (XMPP_FEDERATOR_SKIP_INTEROP=1)");
        return false;
    }
    if let Err(e) = ensure_packages() {
        panic!("interop test cannot run: {e}");
    }
    true
}

pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Certificates, DNS, our instance and the slixmpp venv for one real peer.
pub(crate) struct Lab {
    pub(crate) work: Work,
    ca: TestCa,
    pub(crate) ca_path: PathBuf,
    pub(crate) dns: DnsServer,
    wire_files: LeafFiles,
    pub(crate) wire_ip: Ipv4Addr,
    pub(crate) python: PathBuf,
    /// The CA bundle slixmpp clients trust, when a peer's certificate is not
    /// from our CA ([`Lab::spec_untrusted`]).
    client_ca: std::sync::Mutex<Option<PathBuf>>,
}

impl Lab {
    pub(crate) async fn new(name: &str, wire_ip: Ipv4Addr) -> Lab {
        Lab::with_eku(name, wire_ip, Eku::Both).await
    }

    /// With our certificate carrying `eku` (`ServerOnly`: as Let's Encrypt
    /// issues them since February 2026).
    pub(crate) async fn with_eku(name: &str, wire_ip: Ipv4Addr, eku: Eku) -> Lab {
        let work = Work::new(name).expect("work dir");
        let certs = work.path.join("certs");
        let ca = TestCa::new("Interop Test CA");
        let ca_path = ca.write_ca(&certs);
        let wire_files = ca.leaf(WIRE, eku, false).write(&certs, WIRE);
        let dns = DnsServer::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let python = blocking(ensure_venv).expect("python venv with slixmpp");
        Lab {
            work,
            ca,
            ca_path,
            dns,
            wire_files,
            wire_ip,
            python,
            client_ca: std::sync::Mutex::new(None),
        }
    }

    pub(crate) fn spec(&self, domain: &str, ip: Ipv4Addr) -> ServerSpec {
        // The peer's certificate carries only the serverAuth EKU, as Let's Encrypt
        // issues them since 2026; it is also its s2s client certificate.
        let f = self
            .ca
            .leaf(domain, Eku::ServerOnly, false)
            .write(&self.work.path.join("certs"), domain);
        self.dns.add(domain, ip, Some(5269), Some(5222));
        ServerSpec {
            domain: domain.into(),
            ip,
            s2s_port: 5269,
            c2s_port: 5222,
            cert: f.cert,
            key: f.key,
            combined: f.combined,
            ca: self.ca_path.clone(),
            dns: self.dns.addr,
            debug: true,
        }
    }

    /// Like [`Lab::spec`], with a certificate from a CA of its own, which we
    /// do not trust (a self-signed server); it still trusts ours.
    pub(crate) fn spec_untrusted(&self, domain: &str, ip: Ipv4Addr) -> ServerSpec {
        let own = TestCa::new("Self-signed peer");
        let dir = self.work.path.join("certs").join("untrusted");
        let f = own.leaf(domain, Eku::ServerOnly, false).write(&dir, domain);
        // Its users' clients trust it (only we do not).
        let own_ca = own.write_ca(&dir);
        let bundle = dir.join("clients-ca.pem");
        let mut pem = std::fs::read_to_string(&self.ca_path).unwrap();
        pem.push_str(&std::fs::read_to_string(own_ca).unwrap());
        std::fs::write(&bundle, pem).unwrap();
        *self.client_ca.lock().unwrap() = Some(bundle);
        self.dns.add(domain, ip, Some(5269), Some(5222));
        ServerSpec {
            domain: domain.into(),
            ip,
            s2s_port: 5269,
            c2s_port: 5222,
            cert: f.cert,
            key: f.key,
            combined: f.combined,
            ca: self.ca_path.clone(),
            dns: self.dns.addr,
            debug: true,
        }
    }

    /// The CA file slixmpp clients trust.
    fn clients_ca(&self) -> PathBuf {
        let ca = self.client_ca.lock().unwrap().clone();
        ca.unwrap_or_else(|| self.ca_path.clone())
    }

    pub(crate) fn wire_config(&self, port: u16) -> xmpp_federator::config::Config {
        let mut c = instance_config(
            WIRE,
            SocketAddr::new(self.wire_ip.into(), port),
            None,
            &self.wire_files.cert,
            &self.wire_files.key,
            &self.ca_path,
        );
        c.dns.nameserver = Some(self.dns.addr);
        c.timeouts.retry_window_secs = 10;
        c.api.token = Some(TOKEN.into());
        c
    }

    /// Our instance's TOML config (for the real binary): STARTTLS on `s2s`, the
    /// API on `api`, the store in `store`, then `extra`.
    pub(crate) fn wire_toml(
        &self,
        s2s: SocketAddr,
        api: SocketAddr,
        store: &std::path::Path,
        extra: &str,
    ) -> String {
        xmpp_federator_testkit::process::instance_toml(
            &xmpp_federator_testkit::process::InstanceFiles {
                domain: WIRE,
                s2s,
                api,
                token: TOKEN,
                cert: &self.wire_files.cert,
                key: &self.wire_files.key,
                ca: &self.ca_path,
                dns: self.dns.addr,
                store,
                backend: "redb",
            },
            extra,
        )
    }

    pub(crate) async fn start_wire(&self) -> Running {
        // The same fixed port as `check`, so peers' cached SRV answers stay right.
        let r = start(self.wire_config(5269))
            .await
            .expect("our server starts");
        self.dns
            .add(WIRE, self.wire_ip, Some(r.starttls[0].port()), None);
        r
    }

    /// `xmpp-federator check DOMAIN` with the real binary, listening on a fixed port
    /// that DNS points at while it runs.
    pub(crate) fn check(&self, domain: &str) -> String {
        let port = 5269;
        self.dns.add(WIRE, self.wire_ip, Some(port), None);
        let cfg = self.work.path.join("check.toml");
        let c = self.wire_config(port);
        std::fs::write(
            &cfg,
            format!(
                "domains = ['{WIRE}']\n[listen]\nstarttls = ['{}:{port}']\ndirect_tls = []\n\
                 [tls]\nsystem_roots = false\nca_files = ['{}']\ncertificates = [{{ cert = '{}', key = '{}' }}]\n\
                 [dns]\nnameserver = '{}'\n",
                self.wire_ip,
                self.ca_path.display(),
                c.tls.certificates[0].cert.display(),
                c.tls.certificates[0].key.display(),
                self.dns.addr
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_xmpp-federator"))
            .args(["check", domain, "--config"])
            .arg(&cfg)
            .output()
            .expect("run check");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!("{text}");
        assert!(
            out.status.success(),
            "check {domain} failed:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    pub(crate) fn client(
        &self,
        jid: &str,
        pw: &str,
        c2s: SocketAddr,
        cmd: &str,
        target: &str,
    ) -> String {
        self.client_args(jid, pw, c2s, &[cmd, target])
    }

    pub(crate) fn client_args(
        &self,
        jid: &str,
        pw: &str,
        c2s: SocketAddr,
        args: &[&str],
    ) -> String {
        interop::client(&self.python, jid, pw, c2s, &self.clients_ca(), args)
            .unwrap_or_else(|e| panic!("slixmpp {args:?}: {e}"))
    }

    /// Messages both ways between a backend user and an XMPP user on the peer,
    /// errors for non-existent users on both sides, vCards both ways.
    pub(crate) async fn messaging(&self, wire: &Running, peer: &ServerSpec, user: &str, pw: &str) {
        let api = wire.api;
        let (s, b, _) = http(
            api,
            "PUT",
            "/v1/users/w1",
            Some(TOKEN),
            Some(r#"{"handle":"wally","display_name":"Wally Wire"}"#),
        )
        .await;
        assert_eq!(s, 201, "{b}");
        let user_jid = format!("{user}@{}", peer.domain);
        blocking(|| self.client_args(&user_jid, pw, peer.c2s(), &["set-vcard", "Peer Person"]));

        // Backend -> XMPP user.
        let mut waiter = blocking(|| {
            BackgroundClient::start(
                &self.python,
                &user_jid,
                pw,
                peer.c2s(),
                &self.clients_ca(),
                &["wait-message", "wally@wire.test"],
            )
        })
        .expect("client online");
        let body = json!({"from":"w1","to": user_jid,"body":"hello from the backend"}).to_string();
        let (s, b, _) = http(api, "POST", "/v1/messages", Some(TOKEN), Some(&body)).await;
        assert_eq!(s, 202, "{b}");
        let id = b["id"].as_str().unwrap().to_string();
        let line =
            blocking(|| waiter.wait_line("RECEIVED", std::time::Duration::from_secs(30))).unwrap();
        assert!(line.contains("hello from the backend"), "{line}");
        let ev = wait_event(api, |e| e["type"] == "delivered" && e["id"] == id.as_str()).await;
        assert_eq!(ev["to"], user_jid.as_str());

        // XMPP user -> backend.
        let out = blocking(|| {
            self.client_args(
                &user_jid,
                pw,
                peer.c2s(),
                &["send", "wally@wire.test", "hello from xmpp"],
            )
        });
        assert!(out.contains("SENT"), "{out}");
        let ev = wait_event(api, |e| {
            e["type"] == "message" && e["body"] == "hello from xmpp"
        })
        .await;
        assert_eq!(ev["user_id"], "w1");
        assert!(ev["from"].as_str().unwrap().starts_with(&user_jid), "{ev}");

        // Errors for users that do not exist, on both sides.
        let out = blocking(|| {
            self.client_args(
                &user_jid,
                pw,
                peer.c2s(),
                &["send", "nobody@wire.test", "anyone?", "--expect-error"],
            )
        });
        assert!(out.contains("BOUNCED service-unavailable"), "{out}");
        let body = json!({"from":"w1","to": format!("nobody@{}", peer.domain),"body":"anyone?"})
            .to_string();
        let (s, b, _) = http(api, "POST", "/v1/messages", Some(TOKEN), Some(&body)).await;
        assert_eq!(s, 202, "{b}");
        let nid = b["id"].as_str().unwrap().to_string();
        let ev = wait_event(api, |e| e["type"] == "bounced" && e["id"] == nid.as_str()).await;
        assert!(ev["condition"].is_string(), "{ev}");

        // vCards: the XMPP user fetches ours; the backend looks theirs up.
        let out = blocking(|| self.client(&user_jid, pw, peer.c2s(), "vcard", "wally@wire.test"));
        assert!(out.contains("FN Wally Wire"), "{out}");
        let (s, b, _) = http(
            api,
            "GET",
            &format!("/v1/remote/{user_jid}"),
            Some(TOKEN),
            None,
        )
        .await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["exists"], true, "{b}");
        assert_eq!(b["evidence"], "vcard", "{b}");
        assert_eq!(b["display_name"], "Peer Person", "{b}");
        // A missing account: Prosody and ejabberd answer as for one without
        // a vCard, so the lookup does not claim either way.
        let (s, b, _) = http(
            api,
            "GET",
            &format!("/v1/remote/nobody@{}", peer.domain),
            Some(TOKEN),
            None,
        )
        .await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(
            (&b["exists"], &b["evidence"]),
            (&json!(null), &json!("hidden")),
            "{b}"
        );

        self.devices(api, peer, &user_jid, pw).await;
    }

    /// OMEMO devices both ways (XEP-0384 over PEP): the XMPP user fetches the
    /// backend user's device lists and a bundle in both namespaces; the
    /// backend reads the XMPP user's device lists its client published.
    async fn devices(&self, api: SocketAddr, peer: &ServerSpec, user_jid: &str, pw: &str) {
        let k32 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let sig = "CQkJ".repeat(21) + "CQ==";
        let device = json!({
            "label": "Wally's phone",
            "identity_key": k32,
            "signed_prekey": {"id": 1, "public": k32, "signature": sig},
            "prekeys": [{"id": 1, "public": k32}, {"id": 2, "public": k32}],
        })
        .to_string();
        let (s, b, _) = http(
            api,
            "PUT",
            "/v1/users/w1/devices/4242",
            Some(TOKEN),
            Some(&device),
        )
        .await;
        assert_eq!(s, 201, "{b}");
        let items = |args: &[&str]| {
            let mut a = vec!["pep-items", "wally@wire.test"];
            a.extend_from_slice(args);
            blocking(|| self.client_args(user_jid, pw, peer.c2s(), &a))
        };
        let out = items(&["urn:xmpp:omemo:2:devices"]);
        assert!(
            out.contains("ITEM current ")
                && out.contains("id=\"4242\"")
                && out.contains("label=\"Wally's phone\""),
            "{out}"
        );
        let out = items(&["eu.siacs.conversations.axolotl.devicelist"]);
        assert!(
            out.contains("ITEM current ") && out.contains("id=\"4242\""),
            "{out}"
        );
        let out = items(&["urn:xmpp:omemo:2:bundles 4242"]);
        assert!(out.contains("ITEM 4242 ") && out.contains(k32), "{out}");
        let out = items(&["eu.siacs.conversations.axolotl.bundles:4242"]);
        assert!(out.contains("signedPreKeyPublic"), "{out}");
        let out = items(&["urn:xmpp:omemo:2:bundles 999"]);
        assert!(
            out.contains("ITEMS-DONE") && !out.contains("ITEM 999"),
            "{out}"
        );
        wait_event(api, |e| {
            e["type"] == "bundle_fetched" && e["device_id"] == 4242
        })
        .await;

        // The XMPP user's client publishes its device list (legacy, what
        // deployed clients use); the backend reads it.
        let out = blocking(|| {
            self.client_args(
                user_jid,
                pw,
                peer.c2s(),
                &[
                    "pep-publish",
                    "eu.siacs.conversations.axolotl.devicelist",
                    "<list xmlns='eu.siacs.conversations.axolotl'><device id='777'/></list>",
                ],
            )
        });
        assert!(out.contains("PUBLISHED"), "{out}");
        let (s, b, _) = http(
            api,
            "GET",
            &format!("/v1/remote/{user_jid}/devices?as=w1"),
            Some(TOKEN),
            None,
        )
        .await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["legacy"], json!([{"id": 777}]), "{b}");

        self.avatars(api, peer, user_jid, pw).await;
    }

    /// Avatars both ways (XEP-0084, and the vCard's PHOTO of XEP-0153): the
    /// XMPP user's client reads the backend user's metadata, then the data it
    /// names, and its vCard; the backend reads the avatar the client
    /// published on its own server.
    async fn avatars(&self, api: SocketAddr, peer: &ServerSpec, user_jid: &str, pw: &str) {
        // A real 1x1 PNG.
        let png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII=";
        let body = json!({"type": "image/png", "data": png}).to_string();
        let (s, info, _) = http(api, "PUT", "/v1/users/w1/avatar", Some(TOKEN), Some(&body)).await;
        assert_eq!(s, 200, "{info}");
        let id = info["id"].as_str().unwrap().to_string();
        let items = |args: &[&str]| {
            let mut a = vec!["pep-items", "wally@wire.test"];
            a.extend_from_slice(args);
            blocking(|| self.client_args(user_jid, pw, peer.c2s(), &a))
        };
        let out = items(&["urn:xmpp:avatar:metadata"]);
        assert!(
            out.contains(&format!("ITEM {id} "))
                && out.contains(&format!("id=\"{id}\""))
                && out.contains("type=\"image/png\""),
            "{out}"
        );
        let out = items(&[&format!("urn:xmpp:avatar:data {id}")]);
        assert!(
            out.contains(&format!("ITEM {id} ")) && out.contains(png),
            "{out}"
        );
        let out = blocking(|| self.client(user_jid, pw, peer.c2s(), "vcard", "wally@wire.test"));
        assert!(out.contains(&format!("PHOTO image/png {png}")), "{out}");

        // The client publishes its own (a 1x1 GIF), data then metadata, as
        // clients do; the backend reads it through its server's PEP.
        let gif = "R0lGODlhAQABAIAAAP///wAAACwAAAAAAQABAAACAkQBADs=";
        let gif_id = {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(gif)
                .unwrap();
            xmpp_federator::services::pep::sha1_hex(&bytes)
        };
        let publish = |node: &str, xml: &str| {
            let out = blocking(|| {
                self.client_args(
                    user_jid,
                    pw,
                    peer.c2s(),
                    &["pep-publish", node, xml, "--item", &gif_id],
                )
            });
            assert!(out.contains("PUBLISHED"), "{out}");
        };
        publish(
            "urn:xmpp:avatar:data",
            &format!("<data xmlns='urn:xmpp:avatar:data'>{gif}</data>"),
        );
        publish(
            "urn:xmpp:avatar:metadata",
            &format!(
                "<metadata xmlns='urn:xmpp:avatar:metadata'><info bytes='43' id='{gif_id}' \
                 height='1' width='1' type='image/gif'/></metadata>"
            ),
        );
        let (s, b, _) = http(
            api,
            "GET",
            &format!("/v1/remote/{user_jid}/avatar?as=w1"),
            Some(TOKEN),
            None,
        )
        .await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(
            (b["id"].as_str(), b["data"].as_str()),
            (Some(gif_id.as_str()), Some(gif)),
            "{b}"
        );
        assert_eq!(b["type"], "image/gif", "{b}");
    }

    /// A subscription handshake both ways between the backend user and the XMPP
    /// user ends with `both` on each side, and each sees the other's presence.
    async fn subscriptions(&self, wire: &Running, peer: &ServerSpec, user: &str, pw: &str) {
        let api = wire.api;
        let user_jid = format!("{user}@{}", peer.domain);
        let mut client = blocking(|| {
            BackgroundClient::start(
                &self.python,
                &user_jid,
                pw,
                peer.c2s(),
                &self.clients_ca(),
                &["subscribe-both", "wally@wire.test", "--timeout", "40"],
            )
        })
        .expect("client online");
        let path = format!("/v1/users/w1/roster/{user_jid}");
        let (s, b, _) = http(
            api,
            "POST",
            &format!("{path}/subscribe"),
            Some(TOKEN),
            Some(""),
        )
        .await;
        assert_eq!(s, 200, "{b}");
        wait_event(api, |e| {
            e["type"] == "subscription" && e["action"] == "subscribed"
        })
        .await;
        wait_event(api, |e| {
            e["type"] == "subscription" && e["action"] == "subscribe"
        })
        .await;
        let (s, b, _) = http(
            api,
            "POST",
            &format!("{path}/approve"),
            Some(TOKEN),
            Some(""),
        )
        .await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["subscription"], "both", "{b}");
        let (s, _, _) = http(
            api,
            "PUT",
            "/v1/users/w1/presence",
            Some(TOKEN),
            Some(r#"{"status":"here"}"#),
        )
        .await;
        assert_eq!(s, 204);
        let both = blocking(|| client.wait_line("BOTH", std::time::Duration::from_secs(40)));
        assert!(both.is_ok(), "{both:?}");
        let p =
            blocking(|| client.wait_line("PRESENCE", std::time::Duration::from_secs(5))).unwrap();
        assert!(p.contains("wally@wire.test/backend"), "{p}");
        let ev = wait_event(api, |e| {
            e["type"] == "presence"
                && e["available"] == true
                && e["from"].as_str().is_some_and(|f| f.starts_with(&user_jid))
        })
        .await;
        assert_eq!(ev["user_id"], "w1");
        let (_, b, _) = http(api, "GET", "/v1/users/w1/roster", Some(TOKEN), None).await;
        let item = b["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["jid"] == user_jid.as_str())
            .cloned()
            .unwrap();
        assert_eq!(item["subscription"], "both", "{b}");

        self.pep_events(api, peer, &user_jid, pw).await;
    }

    /// PEP events to the client that wants them (XEP-0163 with XEP-0115):
    /// the contact's client advertises `urn:xmpp:omemo:2:devices+notify` in
    /// its caps; we ask what its caps mean, send it the last device list at
    /// its full JID, then a change, and never the legacy list it did not ask
    /// for.
    async fn pep_events(&self, api: SocketAddr, peer: &ServerSpec, user_jid: &str, pw: &str) {
        let wait = std::time::Duration::from_secs(30);
        let mut client = blocking(|| {
            BackgroundClient::start(
                &self.python,
                user_jid,
                pw,
                peer.c2s(),
                &self.clients_ca(),
                &[
                    "pep-listen",
                    "wally@wire.test",
                    "urn:xmpp:omemo:2:devices",
                    "--lifetime",
                    "60",
                ],
            )
        })
        .expect("client online");
        let devices = "EVENT urn:xmpp:omemo:2:devices current";
        let line = blocking(|| client.wait_line(devices, wait)).unwrap();
        assert!(
            line.contains("id=\"4242\"") && line.contains(&format!("to={user_jid}/")),
            "{line}"
        );
        let k32 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let sig = "CQkJ".repeat(21) + "CQ==";
        let device = json!({
            "identity_key": k32,
            "signed_prekey": {"id": 1, "public": k32, "signature": sig},
            "prekeys": [{"id": 1, "public": k32}],
        })
        .to_string();
        let (s, b, _) = http(
            api,
            "PUT",
            "/v1/users/w1/devices/4343",
            Some(TOKEN),
            Some(&device),
        )
        .await;
        assert_eq!(s, 201, "{b}");
        // The last item may come twice (the client's presences race our
        // caps lookups); the change comes after it.
        let mut changed = false;
        for _ in 0..5 {
            let line = blocking(|| client.wait_line(devices, wait)).unwrap();
            if line.contains("id=\"4343\"") {
                changed = true;
                break;
            }
        }
        assert!(changed, "{:?}", client.seen());
        let _ = client.send_line("quit");
        assert!(
            !client
                .seen()
                .iter()
                .any(|l| l.contains("eu.siacs.conversations.axolotl.devicelist")),
            "{:?}",
            client.seen()
        );
    }

    /// A peer presenting a certificate from another CA, or one for another name,
    /// is refused; the right certificate is accepted.
    async fn refusals(&self, s2s: SocketAddr, domain: &str) {
        let certs = self.work.path.join("certs");
        let rogue = TestCa::new("Rogue CA")
            .leaf(WIRE, Eku::Both, false)
            .write(&certs.join("rogue"), WIRE);
        let other = self
            .ca
            .leaf("other.test", Eku::Both, false)
            .write(&certs, "other.test");
        let ok = raw::attempt(
            s2s,
            WIRE,
            domain,
            Some((&self.wire_files.cert, &self.wire_files.key)),
            &self.ca_path,
        )
        .await
        .unwrap();
        assert_eq!(ok, Outcome::Authenticated, "control: our real certificate");
        for (what, files) in [("another CA", &rogue), ("another name", &other)] {
            let o = raw::attempt(
                s2s,
                WIRE,
                domain,
                Some((&files.cert, &files.key)),
                &self.ca_path,
            )
            .await
            .unwrap();
            assert!(
                matches!(o, Outcome::Refused(_)),
                "{domain} accepted a certificate from {what}: {o:?}"
            );
        }
        let o = raw::attempt(s2s, WIRE, domain, None, &self.ca_path)
            .await
            .unwrap();
        assert!(
            matches!(o, Outcome::Refused(_)),
            "{domain} accepted no certificate"
        );
    }
}

fn has_identity(out: &str) -> bool {
    out.lines().any(|l| l.starts_with("identity server/im"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prosody() {
    if !enabled() {
        return;
    }
    crate::support::init_log();
    let lab = Lab::new("prosody", Ipv4Addr::new(127, 0, 0, 113)).await;
    let spec = lab.spec("prosody.test", Ipv4Addr::new(127, 0, 0, 111));
    let prosody =
        blocking(|| Prosody::start(&lab.work.path, spec.clone())).expect("prosody starts");
    blocking(|| prosody.register("alice", "alicepw")).expect("register alice");

    // `check` with the real binary prints every step and gets a pong.
    let out = blocking(|| lab.check("prosody.test"));
    for step in [
        "SRV _xmpp-server._tcp.prosody.test.",
        "TCP connected",
        "TLS",
        "subject:",
        "SASL EXTERNAL succeeded",
        "pong from prosody.test",
        "OK",
    ] {
        assert!(out.contains(step), "check output lacks {step:?}:\n{out}");
    }

    let wire = lab.start_wire().await;
    let pong = iq_round_trip(&wire, "prosody.test", PING).await;
    assert_eq!(pong.type_.as_deref(), Some("result"), "{}", pong.as_str());
    let info = iq_round_trip(
        &wire,
        "prosody.test",
        "<query xmlns='http://jabber.org/protocol/disco#info'/>",
    )
    .await;
    assert!(
        info.as_str().contains("category='server'")
            || info.as_str().contains("category=\"server\""),
        "{}",
        info.as_str()
    );

    // Prosody's user pings and disco-queries our domain across s2s.
    let out = blocking(|| lab.client("alice@prosody.test", "alicepw", spec.c2s(), "ping", WIRE));
    assert!(out.contains("PONG from wire.test"), "{out}");
    let out = blocking(|| {
        lab.client(
            "alice@prosody.test",
            "alicepw",
            spec.c2s(),
            "disco-info",
            WIRE,
        )
    });
    assert!(
        has_identity(&out) && out.contains("feature urn:xmpp:ping"),
        "{out}"
    );

    let log = prosody.log_text();
    assert!(
        log.contains("SASL EXTERNAL with wire.test succeeded"),
        "prosody did not authenticate to us with EXTERNAL"
    );
    assert!(
        log.contains("Accepting SASL EXTERNAL identity from wire.test"),
        "prosody did not accept us with EXTERNAL"
    );

    lab.messaging(&wire, &spec, "alice", "alicepw").await;
    lab.subscriptions(&wire, &spec, "alice", "alicepw").await;
    // Delivery to Prosody was confirmed with XEP-0198 acks (it offers them on s2s).
    let log = prosody.log_text();
    // (Prosody logs attributes in no fixed order.)
    let logged = |start: &str| {
        log.lines()
            .any(|l| l.contains(start) && l.contains("urn:xmpp:sm:3"))
    };
    assert!(
        logged("Received[s2sin]: <enable") && logged("Sending[s2sin]: <a "),
        "stream management was not used with Prosody"
    );
    lab.refusals(spec.s2s(), "prosody.test").await;
    wire.shutdown().await;
    drop(prosody);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejabberd() {
    if !enabled() {
        return;
    }
    crate::support::init_log();
    let lab = Lab::new("ejabberd", Ipv4Addr::new(127, 0, 0, 114)).await;
    let spec = lab.spec("ejabberd.test", Ipv4Addr::new(127, 0, 0, 112));
    let ejabberd =
        blocking(|| Ejabberd::start(&lab.work.path, spec.clone(), 14370, "xf-ejabberd@localhost"))
            .expect("ejabberd starts");
    blocking(|| ejabberd.register("bob", "bobpw")).expect("register bob");

    let out = blocking(|| lab.check("ejabberd.test"));
    for step in [
        "SRV _xmpp-server._tcp.ejabberd.test.",
        "TCP connected",
        "TLS",
        "SASL EXTERNAL succeeded",
        "pong from ejabberd.test",
        "OK",
    ] {
        assert!(out.contains(step), "check output lacks {step:?}:\n{out}");
    }

    let wire = lab.start_wire().await;
    let pong = iq_round_trip(&wire, "ejabberd.test", PING).await;
    assert_eq!(pong.type_.as_deref(), Some("result"), "{}", pong.as_str());
    let info = iq_round_trip(
        &wire,
        "ejabberd.test",
        "<query xmlns='http://jabber.org/protocol/disco#info'/>",
    )
    .await;
    assert!(info.as_str().contains("server"), "{}", info.as_str());

    let out = blocking(|| lab.client("bob@ejabberd.test", "bobpw", spec.c2s(), "ping", WIRE));
    assert!(out.contains("PONG from wire.test"), "{out}");
    let out = blocking(|| lab.client("bob@ejabberd.test", "bobpw", spec.c2s(), "disco-info", WIRE));
    assert!(
        has_identity(&out) && out.contains("feature urn:xmpp:ping"),
        "{out}"
    );

    let log = blocking(|| {
        ejabberd.log_when(|l| {
            l.contains("Accepted inbound s2s EXTERNAL authentication wire.test -> ejabberd.test")
                && l.contains(
                    "Accepted outbound s2s EXTERNAL authentication ejabberd.test -> wire.test",
                )
        })
    });
    assert!(
        log.contains("Accepted inbound s2s EXTERNAL authentication wire.test -> ejabberd.test"),
        "ejabberd did not accept us with EXTERNAL"
    );
    assert!(
        log.contains("Accepted outbound s2s EXTERNAL authentication ejabberd.test -> wire.test"),
        "ejabberd did not authenticate to us with EXTERNAL"
    );

    lab.messaging(&wire, &spec, "bob", "bobpw").await;
    lab.subscriptions(&wire, &spec, "bob", "bobpw").await;
    lab.refusals(spec.s2s(), "ejabberd.test").await;
    wire.shutdown().await;
    drop(ejabberd);
}

/// Our streams' authentication methods as counted in `/metrics`.
fn auth_count(wire: &Running, direction: &str, method: &str) -> u64 {
    let text = wire.server.metrics.encode(&Default::default());
    let needle = format!(
        "xmpp_s2s_streams_authenticated_total{{direction=\"{direction}\",method=\"{method}\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejabberd_dialback() {
    if !enabled() {
        return;
    }
    crate::support::init_log();
    // Our certificate has only serverAuth: ejabberd 23.01 refuses it for SASL
    // EXTERNAL, and mod_s2s_dialback (in its default config) takes over.
    let lab = Lab::with_eku(
        "ejabberd-dialback",
        Ipv4Addr::new(127, 0, 0, 116),
        Eku::ServerOnly,
    )
    .await;
    let spec = lab.spec("ejabberd.test", Ipv4Addr::new(127, 0, 0, 115));
    let ejabberd = blocking(|| {
        Ejabberd::start_dialback(
            &lab.work.path,
            spec.clone(),
            14391,
            "xf-ejabberd-db@localhost",
        )
    })
    .expect("ejabberd starts");
    blocking(|| ejabberd.register("bob", "bobpw")).expect("register bob");

    let out = blocking(|| lab.check("ejabberd.test"));
    for step in [
        "warning: our certificate for wire.test has no clientAuth EKU",
        "features after TLS: mechanisms [EXTERNAL], {urn:xmpp:features:dialback}dialback",
        "SASL EXTERNAL refused: not-authorized",
        "unsupported certificate purpose",
        "dialback succeeded",
        "outbound stream to ejabberd.test authenticated by dialback",
        "pong from ejabberd.test",
        "OK",
    ] {
        assert!(out.contains(step), "check output lacks {step:?}:\n{out}");
    }

    let wire = lab.start_wire().await;
    let t0 = std::time::Instant::now();
    let pong = iq_round_trip(&wire, "ejabberd.test", PING).await;
    eprintln!(
        "dialback session to ejabberd: first ping answered in {:.1} ms",
        t0.elapsed().as_secs_f64() * 1000.0
    );
    assert_eq!(pong.type_.as_deref(), Some("result"), "{}", pong.as_str());
    let out = blocking(|| lab.client("bob@ejabberd.test", "bobpw", spec.c2s(), "ping", WIRE));
    assert!(out.contains("PONG from wire.test"), "{out}");

    let log = blocking(|| {
        ejabberd.log_when(|l| {
            (l.contains("Retrying with s2s dialback authentication: wire.test -> ejabberd.test")
                || l.contains("dialback authentication wire.test -> ejabberd.test"))
                && l.contains(
                    "Accepted outbound s2s EXTERNAL authentication ejabberd.test -> wire.test",
                )
        })
    });
    assert!(
        log.contains("Retrying with s2s dialback authentication: wire.test -> ejabberd.test")
            || log.contains("dialback authentication wire.test -> ejabberd.test"),
        "ejabberd did not take us by dialback"
    );
    assert!(
        log.contains("Accepted outbound s2s EXTERNAL authentication ejabberd.test -> wire.test"),
        "ejabberd did not authenticate to us with EXTERNAL"
    );
    assert!(
        auth_count(&wire, "out", "dialback") >= 1,
        "our outbound stream: dialback"
    );
    assert!(
        auth_count(&wire, "in", "external") >= 1,
        "ejabberd's stream: EXTERNAL"
    );

    lab.messaging(&wire, &spec, "bob", "bobpw").await;
    wire.shutdown().await;
    drop(ejabberd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prosody_dialback() {
    if !enabled() {
        return;
    }
    crate::support::init_log();
    let lab = Lab::new("prosody-dialback", Ipv4Addr::new(127, 0, 0, 118)).await;
    // Prosody's certificate is self-signed: we cannot verify it, so it
    // authenticates to us by dialback and we check its key with its own
    // authoritative side; it verifies ours (SASL EXTERNAL).
    let spec = lab.spec_untrusted("prosody.test", Ipv4Addr::new(127, 0, 0, 117));
    let prosody =
        blocking(|| Prosody::start_dialback(&lab.work.path, spec.clone())).expect("prosody starts");
    blocking(|| prosody.register("alice", "alicepw")).expect("register alice");

    let wire = lab.start_wire().await;
    // Prosody's user pings us: Prosody's stream to us (dialback), our answer on
    // ours to it (EXTERNAL, its certificate unverified: DNS trusted).
    let out = blocking(|| lab.client("alice@prosody.test", "alicepw", spec.c2s(), "ping", WIRE));
    assert!(out.contains("PONG from wire.test"), "{out}");
    let pong = iq_round_trip(&wire, "prosody.test", PING).await;
    assert_eq!(pong.type_.as_deref(), Some("result"), "{}", pong.as_str());
    assert!(
        auth_count(&wire, "in", "dialback") >= 1,
        "Prosody's stream: dialback"
    );
    assert!(auth_count(&wire, "out", "external") >= 1, "ours: EXTERNAL");
    lab.messaging(&wire, &spec, "alice", "alicepw").await;
    // The status shows both streams and how each was authenticated.
    let (s, st, _) = http(wire.api, "GET", "/v1/federation/status", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{st}");
    let p = st["remote"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["domain"] == "prosody.test")
        .unwrap_or_else(|| panic!("no prosody.test: {st:#}"));
    assert_eq!(p["state"], "up", "{p:#}");
    assert_eq!(p["inbound"][0]["method"], "dialback", "{p:#}");
    assert_eq!(p["outbound"][0]["method"], "external", "{p:#}");
    assert_eq!(p["outbound"][0]["sm"], true, "Prosody offers acks: {p:#}");
    assert!(p["stanzas_in"].as_u64().unwrap() >= 1 && p["stanzas_out"].as_u64().unwrap() >= 1);
    assert!(p["last_delivered_ms"].as_u64().is_some(), "{p:#}");
    wire.shutdown().await;
    drop(prosody);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejabberd_dialback_untrusted() {
    if !enabled() {
        return;
    }
    crate::support::init_log();
    // ejabberd's certificate is self-signed: it authenticates to us by dialback
    // (we offer no EXTERNAL) and we check its key with its own authoritative
    // side; ours has only serverAuth, so it takes us by dialback too.
    let lab = Lab::with_eku(
        "ejabberd-untrusted",
        Ipv4Addr::new(127, 0, 0, 120),
        Eku::ServerOnly,
    )
    .await;
    let spec = lab.spec_untrusted("ejabberd.test", Ipv4Addr::new(127, 0, 0, 119));
    let ejabberd = blocking(|| {
        Ejabberd::start_dialback(
            &lab.work.path,
            spec.clone(),
            14393,
            "xf-ejabberd-un@localhost",
        )
    })
    .expect("ejabberd starts");
    blocking(|| ejabberd.register("bob", "bobpw")).expect("register bob");
    let wire = lab.start_wire().await;
    let out = blocking(|| lab.client("bob@ejabberd.test", "bobpw", spec.c2s(), "ping", WIRE));
    assert!(out.contains("PONG from wire.test"), "{out}");
    let pong = iq_round_trip(&wire, "ejabberd.test", PING).await;
    assert_eq!(pong.type_.as_deref(), Some("result"), "{}", pong.as_str());
    assert!(
        auth_count(&wire, "in", "dialback") >= 1,
        "ejabberd's stream: dialback"
    );
    assert!(auth_count(&wire, "out", "dialback") >= 1, "ours: dialback");
    let log = blocking(|| {
        ejabberd.log_when(|l| l.contains("dialback authentication ejabberd.test -> wire.test"))
    });
    assert!(
        log.contains("dialback authentication ejabberd.test -> wire.test"),
        "ejabberd did not authenticate to us by dialback"
    );
    lab.messaging(&wire, &spec, "bob", "bobpw").await;
    wire.shutdown().await;
    drop(ejabberd);
}
