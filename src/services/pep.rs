//! PEP (XEP-0163) for local users' bare JIDs: the nodes the backend publishes
//! for them (the OMEMO device lists and bundles, XEP-0384, in both the
//! `urn:xmpp:omemo:2` and the legacy `eu.siacs.conversations.axolotl`
//! namespaces), read by XMPP contacts over s2s.
//!
//! - items retrieval (XEP-0060 §6.5): all items, the newest `max_items`, or by
//!   id; `item-not-found` for a node that does not exist;
//! - access models `open` and `presence` (contacts whose subscription lets them
//!   see the user's presence; others get `not-authorized` with
//!   `presence-subscription-required`, §6.5.9.2);
//! - disco#items of the account lists the nodes its requester may read;
//! - only the backend publishes (through [`Pep::put_device`] and
//!   [`Pep::delete_device`]); a publish, subscribe or other request from XMPP is
//!   refused (`forbidden`, or `feature-not-implemented` with the pubsub
//!   `unsupported` condition);
//! - a change of a device list is sent to the user's contacts that see its
//!   presence (a `headline` message with the event, §7.1.2: PEP's implicit
//!   subscription);
//! - a remote fetch of a bundle is a `bundle_fetched` event, so the backend can
//!   rotate the prekeys it handed out.
//!
//! The federator never sees private keys: a device is its public parts
//! (identity key, signed prekey and signature, one-time prekeys), checked for
//! structure and size.

use std::sync::Arc;

use minidom::Element;
use serde::{Deserialize, Serialize};

use crate::routing::Outbox;
use crate::services::caps::{Caps, Interests, NS_CAPS, Query, Seen};
use crate::stanza::{Stanza, StanzaCondition};
use crate::store::pep::{Access, Item, Node};
use crate::store::{EventKind, Store, StoreError, User, Writes, now_ms};
use crate::xml::writer::escape;

/// XEP-0060.
pub const NS_PUBSUB: &str = "http://jabber.org/protocol/pubsub";
/// XEP-0060.
pub const NS_PUBSUB_EVENT: &str = "http://jabber.org/protocol/pubsub#event";
/// XEP-0060.
pub const NS_PUBSUB_ERRORS: &str = "http://jabber.org/protocol/pubsub#errors";
/// XEP-0384 (OMEMO 0.8+).
pub const NS_OMEMO: &str = "urn:xmpp:omemo:2";
/// XEP-0384's device list node.
pub const NODE_DEVICES: &str = "urn:xmpp:omemo:2:devices";
/// XEP-0384's bundles node (one item per device).
pub const NODE_BUNDLES: &str = "urn:xmpp:omemo:2:bundles";
/// OMEMO 0.3 (what most deployed clients read).
pub const NS_AXOLOTL: &str = "eu.siacs.conversations.axolotl";
/// OMEMO 0.3's device list node.
pub const NODE_AXOLOTL_DEVICES: &str = "eu.siacs.conversations.axolotl.devicelist";
/// OMEMO 0.3's bundle nodes: this, `:` and the device id.
pub const NODE_AXOLOTL_BUNDLES: &str = "eu.siacs.conversations.axolotl.bundles";

/// XEP-0172: the user's nickname, served from its profile's display name.
pub const NODE_NICK: &str = "http://jabber.org/protocol/nick";

/// Most one-time prekeys a bundle carries (XEP-0384 asks for at least 25;
/// clients publish 100).
pub const MAX_PREKEYS: usize = 200;

/// A device's public key material, as the backend gives it (base64, standard
/// alphabet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// A name people see (OMEMO 2 `label`), optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The identity key (public, 32 or 33 bytes).
    pub identity_key: String,
    /// The signed prekey.
    pub signed_prekey: SignedPrekey,
    /// The one-time prekeys (public, 32 or 33 bytes each).
    pub prekeys: Vec<Prekey>,
}

/// A signed prekey.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignedPrekey {
    /// Its id.
    pub id: u32,
    /// The public key (32 or 33 bytes).
    pub public: String,
    /// Its signature by the identity key (64 bytes).
    pub signature: String,
}

/// A one-time prekey.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Prekey {
    /// Its id.
    pub id: u32,
    /// The public key (32 or 33 bytes).
    pub public: String,
}

/// Why a device is refused: the field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The field (`signed_prekey.public`, `prekeys[3].public`...).
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

fn decoded_len(field: &str, b64: &str, allowed: &[usize]) -> Result<(), Invalid> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| Invalid {
            field: field.into(),
            reason: format!("not base64: {e}"),
        })?;
    if !allowed.contains(&bytes.len()) {
        return Err(Invalid {
            field: field.into(),
            reason: format!("{} bytes; a key here has {allowed:?}", bytes.len()),
        });
    }
    Ok(())
}

impl Device {
    /// Check structure and sizes (public keys: 32 bytes, or 33 with the type
    /// byte libsignal adds; signatures 64 bytes; 1..=200 prekeys with distinct
    /// ids).
    pub fn check(&self) -> Result<(), Invalid> {
        let key = [32, 33];
        decoded_len("identity_key", &self.identity_key, &key)?;
        decoded_len("signed_prekey.public", &self.signed_prekey.public, &key)?;
        decoded_len(
            "signed_prekey.signature",
            &self.signed_prekey.signature,
            &[64],
        )?;
        if self.prekeys.is_empty() || self.prekeys.len() > MAX_PREKEYS {
            return Err(Invalid {
                field: "prekeys".into(),
                reason: format!("{} prekeys; 1 to {MAX_PREKEYS}", self.prekeys.len()),
            });
        }
        let mut ids = std::collections::HashSet::new();
        for (i, p) in self.prekeys.iter().enumerate() {
            decoded_len(&format!("prekeys[{i}].public"), &p.public, &key)?;
            if !ids.insert(p.id) {
                return Err(Invalid {
                    field: format!("prekeys[{i}].id"),
                    reason: format!("id {} twice", p.id),
                });
            }
        }
        if let Some(l) = &self.label
            && (l.len() > 256 || l.chars().any(char::is_control))
        {
            return Err(Invalid {
                field: "label".into(),
                reason: "at most 256 bytes without control characters".into(),
            });
        }
        Ok(())
    }

    /// The OMEMO 2 bundle (XEP-0384 §5.3.2).
    pub fn omemo2_bundle(&self) -> String {
        self.bundle(&OMEMO2)
    }

    /// The OMEMO 0.3 bundle.
    pub fn axolotl_bundle(&self) -> String {
        self.bundle(&AXOLOTL)
    }

    fn bundle(&self, b: &Shape) -> String {
        let Shape {
            ns,
            spk,
            spk_id,
            spks,
            ik,
            pk,
            pk_id,
        } = b;
        let mut x = format!(
            "<bundle xmlns='{ns}'><{spk} {spk_id}='{}'>{}</{spk}><{spks}>{}</{spks}><{ik}>{}</{ik}><prekeys>",
            self.signed_prekey.id,
            escape(&self.signed_prekey.public),
            escape(&self.signed_prekey.signature),
            escape(&self.identity_key)
        );
        for p in &self.prekeys {
            x.push_str(&format!(
                "<{pk} {pk_id}='{}'>{}</{pk}>",
                p.id,
                escape(&p.public)
            ));
        }
        x.push_str("</prekeys></bundle>");
        x
    }

    /// A bundle element of either namespace read back (a remote user's), or
    /// `None` if a part is missing.
    pub fn from_bundle(el: &Element) -> Option<Device> {
        let b = if el.ns() == NS_OMEMO {
            &OMEMO2
        } else {
            &AXOLOTL
        };
        let child = |name: &str| el.children().find(|c| c.name() == name);
        // Base64 may be wrapped over lines.
        let text = |e: &Element| e.text().split_whitespace().collect::<String>();
        let spk = child(b.spk)?;
        Some(Device {
            label: None,
            identity_key: text(child(b.ik)?),
            signed_prekey: SignedPrekey {
                id: spk.attr(b.spk_id)?.parse().ok()?,
                public: text(spk),
                signature: text(child(b.spks)?),
            },
            prekeys: child("prekeys")?
                .children()
                .filter(|c| c.name() == b.pk)
                .filter_map(|p| {
                    Some(Prekey {
                        id: p.attr(b.pk_id)?.parse().ok()?,
                        public: text(p),
                    })
                })
                .collect(),
        })
    }
}

/// The names of a bundle's parts in one OMEMO namespace: both have the same
/// shape (the signed prekey with its id, its signature, the identity key, the
/// prekeys with theirs).
struct Shape {
    ns: &'static str,
    spk: &'static str,
    spk_id: &'static str,
    spks: &'static str,
    ik: &'static str,
    pk: &'static str,
    pk_id: &'static str,
}

const OMEMO2: Shape = Shape {
    ns: NS_OMEMO,
    spk: "spk",
    spk_id: "id",
    spks: "spks",
    ik: "ik",
    pk: "pk",
    pk_id: "id",
};

const AXOLOTL: Shape = Shape {
    ns: NS_AXOLOTL,
    spk: "signedPreKeyPublic",
    spk_id: "signedPreKeyId",
    spks: "signedPreKeySignature",
    ik: "identityKey",
    pk: "preKeyPublic",
    pk_id: "preKeyId",
};

/// A device as listed: its id and label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The device id.
    pub id: u32,
    /// Its label.
    pub label: Option<String>,
}

/// XEP-0084's data node: the image, base64, one item named by its SHA-1.
pub const NODE_AVATAR_DATA: &str = "urn:xmpp:avatar:data";
/// XEP-0084's metadata node: what clients subscribe to, and read first.
pub const NODE_AVATAR_METADATA: &str = "urn:xmpp:avatar:metadata";
/// The largest avatar image accepted. XEP-0084 asks for small images (§7,
/// "less than eight kilobytes" is its advice to publishers); 64 KiB keeps
/// the data item well under the stanza limits Prosody and ejabberd apply to
/// s2s (256 KiB and more) while holding a decent 192x192 JPEG or PNG.
pub const MAX_AVATAR_BYTES: usize = 64 * 1024;

/// An avatar as the backend hands it over.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AvatarIn {
    /// Its media type: `image/png` (the one XEP-0084 requires every client
    /// to read), `image/jpeg`, `image/gif` or `image/webp`. It must be what
    /// the bytes are.
    #[serde(rename = "type")]
    pub mime: String,
    /// The image, base64 (standard alphabet, RFC 4648 §4), at most 64 KiB
    /// decoded.
    pub data: String,
}

/// A published avatar's metadata (XEP-0084's `<info/>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AvatarInfo {
    /// The SHA-1 of the image, hex: the id clients cache it by.
    pub id: String,
    /// Its media type.
    #[serde(rename = "type")]
    pub mime: String,
    /// Its size in bytes.
    pub bytes: usize,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// A checked avatar: its metadata and the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Avatar {
    /// What clients are told of it.
    pub info: AvatarInfo,
    /// The image.
    pub image: Vec<u8>,
}

impl AvatarIn {
    /// Decode and check it: base64, the size, the type named is the type the
    /// bytes are (read from their header, with the dimensions).
    pub fn check(&self) -> Result<Avatar, Invalid> {
        use base64::Engine;
        let image = base64::engine::general_purpose::STANDARD
            .decode(self.data.trim())
            .map_err(|e| Invalid {
                field: "data".into(),
                reason: format!("not base64: {e}"),
            })?;
        Avatar::from_image(&self.mime, image)
    }
}

impl Avatar {
    /// Check decoded image bytes said to be of type `mime`: the size, the
    /// type named is the type the bytes are (read from their header, with the
    /// dimensions).
    pub fn from_image(mime: &str, image: Vec<u8>) -> Result<Avatar, Invalid> {
        let invalid = |field: &str, reason: String| Invalid {
            field: field.into(),
            reason,
        };
        if image.is_empty() || image.len() > MAX_AVATAR_BYTES {
            return Err(invalid(
                "data",
                format!(
                    "{} bytes; an avatar has 1 to {MAX_AVATAR_BYTES}",
                    image.len()
                ),
            ));
        }
        let named = match mime {
            "image/png" | "image/jpeg" | "image/gif" | "image/webp" => mime,
            other => {
                return Err(invalid(
                    "type",
                    format!("`{other}`: not image/png, image/jpeg, image/gif or image/webp"),
                ));
            }
        };
        let actual = match imagesize::image_type(&image) {
            Ok(imagesize::ImageType::Png) => "image/png",
            Ok(imagesize::ImageType::Jpeg) => "image/jpeg",
            Ok(imagesize::ImageType::Gif) => "image/gif",
            Ok(imagesize::ImageType::Webp) => "image/webp",
            _ => {
                return Err(invalid("data", "not a PNG, JPEG, GIF or WebP image".into()));
            }
        };
        if actual != named {
            return Err(invalid(
                "type",
                format!("`{named}`, but the data is {actual}"),
            ));
        }
        let size = imagesize::blob_size(&image)
            .map_err(|e| invalid("data", format!("unreadable {actual} header: {e}")))?;
        let (Ok(width), Ok(height)) = (u32::try_from(size.width), u32::try_from(size.height))
        else {
            return Err(invalid("data", "dimensions out of range".into()));
        };
        if width == 0 || height == 0 {
            return Err(invalid("data", format!("{width}x{height} pixels")));
        }
        Ok(Avatar {
            info: AvatarInfo {
                id: sha1_hex(&image),
                mime: named.to_string(),
                bytes: image.len(),
                width,
                height,
            },
            image,
        })
    }
}

impl AvatarInfo {
    /// The metadata item's payload (XEP-0084 §4.2, Example 3).
    pub fn metadata(&self) -> String {
        format!(
            "<metadata xmlns='{NODE_AVATAR_METADATA}'><info bytes='{}' height='{}' id='{}' \
             type='{}' width='{}'/></metadata>",
            self.bytes,
            self.height,
            self.id,
            escape(&self.mime),
            self.width
        )
    }

    /// The `<info/>` of a metadata payload, `None` for `<stop/>` or none.
    /// Of several (alternative formats), the first held at the data node
    /// (no `url`).
    pub fn from_metadata(el: &Element) -> Option<AvatarInfo> {
        let info = el
            .children()
            .filter(|c| c.is("info", NODE_AVATAR_METADATA))
            .find(|c| c.attr("url").is_none())?;
        let number = |n: &str| info.attr(n).and_then(|v| v.parse::<u32>().ok());
        Some(AvatarInfo {
            id: info.attr("id")?.to_ascii_lowercase(),
            mime: info.attr("type")?.to_string(),
            bytes: info.attr("bytes")?.parse().ok()?,
            width: number("width").unwrap_or(0),
            height: number("height").unwrap_or(0),
        })
    }
}

/// An avatar's id: the SHA-1 of the image, hex (XEP-0084 §4.2).
pub fn sha1_hex(image: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, image);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The metadata item that says there is no avatar (XEP-0084 §4.5).
fn avatar_stop() -> String {
    format!("<metadata xmlns='{NODE_AVATAR_METADATA}'><stop/></metadata>")
}

/// The PEP service of every local user.
#[derive(Debug)]
pub struct Pep {
    store: Arc<Store>,
    /// Nodes as read from the store, with their items newest first: fetches
    /// (every contact's client asks for every device list and bundle) are
    /// answered without a store read. Cleared by every write; a reader caches
    /// only if no write happened since it began (`generation`).
    cache: std::sync::Mutex<std::collections::HashMap<(String, String), Arc<Cached>>>,
    generation: std::sync::atomic::AtomicU64,
    /// Contacts' online clients and the nodes they want events of.
    caps: Caps,
    /// `bundle_fetched` events waiting for their batch's commit.
    fetches: Arc<std::sync::Mutex<Vec<EventKind>>>,
}

/// A node and its items, newest first.
#[derive(Debug)]
struct Cached {
    node: Option<Node>,
    items: Vec<Item>,
    /// The answer to a request for all its items (`<pubsub>` and all), made
    /// once: most fetches ask for all of a node (device lists, legacy
    /// bundles, the avatar's metadata).
    all: std::sync::OnceLock<String>,
}

/// A pubsub request, read without a DOM: fetches are PEP's hot path (every
/// contact's client asks for every device list and bundle).
#[derive(Debug, Default, PartialEq, Eq)]
struct Request {
    /// The first child of `<pubsub/>` (`items`, `publish`...).
    op: Option<String>,
    /// Its `node`.
    node: Option<String>,
    /// Its `max_items`.
    max_items: Option<String>,
    /// The ids of its `<item/>` children.
    ids: Vec<String>,
}

/// The `<pubsub/>` request of an iq; `None` if there is none (or the bytes do
/// not read, which the framer's validation rules out).
///
/// Read with quick-xml's plain reader first: resolving namespaces was about a
/// fifth of a device-list fetch's server CPU in `perf`, and only a prefixed
/// element name or a `<pubsub/>` that does not declare its namespace itself
/// needs it (the only namespace this reading checks is the pubsub
/// element's). Those go to [`read_request_resolved`].
fn read_request(xml: &str) -> Option<Request> {
    read_request_plain(xml).unwrap_or_else(|| read_request_resolved(xml))
}

/// One reading of a request, by either reader: how deep it is, whether inside
/// the pubsub element, and what it read.
#[derive(Default)]
struct Reading {
    depth: usize,
    in_pubsub: bool,
    found: bool,
    r: Request,
}

impl Reading {
    fn close(&mut self) {
        self.depth = self.depth.saturating_sub(1);
        if self.depth == 1 {
            self.in_pubsub = false;
        }
    }

    /// Element `e` (local name `name`) opens; `is_pubsub`: whether, if it is a
    /// first `pubsub` child of the iq, it is in the pubsub namespace.
    fn open(
        &mut self,
        e: &quick_xml::events::BytesStart<'_>,
        name: &str,
        empty: bool,
        is_pubsub: bool,
    ) {
        let value = |a: &quick_xml::events::attributes::Attribute<'_>| {
            a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .ok()
                .map(|v| v.into_owned())
        };
        self.depth += 1;
        let r = &mut self.r;
        match self.depth {
            2 if name == "pubsub" && !self.found && is_pubsub => {
                self.in_pubsub = true;
                self.found = true;
            }
            3 if self.in_pubsub && r.op.is_none() => {
                r.op = Some(name.to_string());
                for a in e.attributes().flatten() {
                    match a.key.0 {
                        "node" => r.node = value(&a),
                        "max_items" => r.max_items = value(&a),
                        _ => {}
                    }
                }
            }
            4 if self.in_pubsub && r.op.as_deref() == Some("items") && name == "item" => {
                if let Some(id) = e
                    .attributes()
                    .flatten()
                    .find(|a| a.key.0 == "id")
                    .and_then(|a| value(&a))
                {
                    r.ids.push(id);
                }
            }
            _ => {}
        }
        if empty {
            self.depth -= 1;
        }
    }

    fn done(self) -> Option<Request> {
        self.found.then_some(self.r)
    }
}

/// [`read_request`] without namespace resolution; `None` when it is needed
/// (or the bytes do not read: the resolving reader then says so).
fn read_request_plain(xml: &str) -> Option<Option<Request>> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::reader::Reader::from_str(xml);
    let mut reading = Reading::default();
    loop {
        let (e, empty) = match reader.read_event().ok()? {
            Event::Start(e) => (e, false),
            Event::Empty(e) => (e, true),
            Event::End(_) => {
                reading.close();
                continue;
            }
            Event::Eof => return Some(reading.done()),
            _ => continue,
        };
        let name = e.name().0;
        let depth = reading.depth + 1;
        if depth >= 2 && name.contains(':') {
            return None;
        }
        let mut is_pubsub = false;
        if depth == 2 && name == "pubsub" && !reading.found {
            // Its own declaration, plainly written, or the resolving reader.
            let declared = e.attributes().flatten().find(|a| a.key.0 == "xmlns")?;
            if declared.value.contains('&') {
                return None;
            }
            is_pubsub = *declared.value == *NS_PUBSUB;
        }
        reading.open(&e, name, empty, is_pubsub);
    }
}

/// [`read_request`] with every namespace resolved.
fn read_request_resolved(xml: &str) -> Option<Request> {
    use quick_xml::events::Event;
    use quick_xml::name::ResolveResult;
    let mut reader = quick_xml::reader::NsReader::from_str(xml);
    let mut reading = Reading::default();
    loop {
        let (ns, ev) = reader.read_resolved_event().ok()?;
        let (e, empty) = match ev {
            Event::Start(e) => (e, false),
            Event::Empty(e) => (e, true),
            Event::End(_) => {
                reading.close();
                continue;
            }
            Event::Eof => return reading.done(),
            _ => continue,
        };
        let pubsub_ns = matches!(ns, ResolveResult::Bound(n) if n.0 == NS_PUBSUB);
        reading.open(&e, e.local_name().into_inner(), empty, pubsub_ns);
    }
}

/// Most nodes kept in memory (then the cache starts again empty).
const CACHED_NODES: usize = 100_000;

/// An item to send to the contacts (PEP's notification).
#[derive(Debug)]
struct Notice {
    node: &'static str,
    item: String,
    xml: String,
}

/// A node with access model `open`.
fn open_node(node: &str, max_items: usize) -> Node {
    Node {
        node: node.to_string(),
        access: Access::Open,
        max_items,
    }
}

/// Where a bundle fetch is reported: the device whose bundle a node item is.
fn bundle_device(node: &str, item: &str) -> Option<u32> {
    if node == NODE_BUNDLES {
        return item.parse().ok();
    }
    node.strip_prefix(NODE_AXOLOTL_BUNDLES)?
        .strip_prefix(':')?
        .parse()
        .ok()
}

impl Pep {
    /// PEP over `store`.
    pub fn new(store: Arc<Store>) -> Pep {
        Pep {
            store,
            cache: Default::default(),
            generation: Default::default(),
            caps: Caps::new(),
            fetches: Default::default(),
        }
    }

    /// `user_id`'s node `name` and its items, from the cache or the store.
    fn load(&self, user_id: &str, name: &str) -> Result<Arc<Cached>, StoreError> {
        use std::sync::atomic::Ordering;
        let key = (user_id.to_string(), name.to_string());
        if let Some(c) = self.lock_cache().get(&key) {
            return Ok(c.clone());
        }
        let generation = self.generation.load(Ordering::SeqCst);
        let node = self.store.node(user_id, name)?;
        let mut items = match &node {
            Some(_) => self.store.items(user_id, name)?,
            None => Vec::new(),
        };
        items.sort_by(|a, b| b.at_ms.cmp(&a.at_ms).then_with(|| a.id.cmp(&b.id)));
        let c = Arc::new(Cached {
            node,
            items,
            all: Default::default(),
        });
        let mut cache = self.lock_cache();
        if self.generation.load(Ordering::SeqCst) == generation {
            if cache.len() >= CACHED_NODES {
                cache.clear();
            }
            cache.insert(key, c.clone());
        }
        Ok(c)
    }

    fn lock_cache(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<(String, String), Arc<Cached>>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After a write: nothing cached is trusted any more.
    fn invalidate(&self) {
        let mut cache = self.lock_cache();
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        cache.clear();
    }

    /// Whether `requester` (a bare JID) may read `node` of `user`.
    fn may_read(&self, user: &User, node: &Node, requester: &str) -> Result<bool, StoreError> {
        Ok(match node.access {
            Access::Open => true,
            Access::Presence => self
                .store
                .roster_item(&user.id, requester)?
                .is_some_and(|r| r.subscription.contact_sees_user()),
        })
    }

    /// An iq to `user`'s bare JID with a `<pubsub/>` payload.
    pub fn iq(&self, user: &User, stanza: &Stanza, outbox: &Outbox) {
        let Some(request) = read_request(stanza.as_str()) else {
            return outbox.bounce(stanza, StanzaCondition::BadRequest, "no pubsub element");
        };
        let requester = stanza
            .from
            .as_ref()
            .map(|f| f.bare().to_ascii_lowercase())
            .unwrap_or_default();
        match (stanza.type_.as_deref(), request.op.as_deref()) {
            (Some("get"), Some("items")) => self.items(user, stanza, &request, &requester, outbox),
            (Some("set"), Some(op)) if op == "publish" || op == "retract" => {
                // XEP-0163 §4.3: only the account owner publishes; here that is
                // the backend, through its API.
                outbox.bounce(
                    stanza,
                    StanzaCondition::Forbidden,
                    "only the account publishes to its PEP nodes",
                )
            }
            (_, Some(op)) => {
                let feature = match op {
                    "subscribe" | "unsubscribe" => "subscribe",
                    "subscriptions" => "retrieve-subscriptions",
                    "affiliations" => "retrieve-affiliations",
                    "create" => "create-nodes",
                    _ => "",
                };
                outbox.send(unsupported(stanza, feature));
            }
            _ => outbox.bounce(stanza, StanzaCondition::BadRequest, "empty pubsub request"),
        }
    }

    fn items(
        &self,
        user: &User,
        stanza: &Stanza,
        request: &Request,
        requester: &str,
        outbox: &Outbox,
    ) {
        let Some(name) = request.node.as_deref() else {
            // §6.5.9.3: nodeid-required.
            return outbox.send(pubsub_error(
                stanza,
                "modify",
                "bad-request",
                "nodeid-required",
            ));
        };
        if name == NODE_NICK {
            // XEP-0172 §4.5: open to all, from the profile.
            return outbox.send(Stanza::iq_result(stanza, &nick_items(user)));
        }
        let cached = match self.load(&user.id, name) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "reading a PEP node");
                return outbox.bounce(stanza, StanzaCondition::InternalServerError, "store");
            }
        };
        let Some(node) = &cached.node else {
            return outbox.bounce(stanza, StanzaCondition::ItemNotFound, "no such node");
        };
        match self.may_read(user, node, requester) {
            Ok(true) => {}
            Ok(false) => {
                return outbox.send(pubsub_error(
                    stanza,
                    "auth",
                    "not-authorized",
                    "presence-subscription-required",
                ));
            }
            Err(e) => {
                tracing::error!(error = %e, "reading a roster");
                return outbox.bounce(stanza, StanzaCondition::InternalServerError, "store");
            }
        }
        // Newest first, as `max_items` takes the newest (§6.5.7).
        let all = &cached.items;
        let max = request
            .max_items
            .as_deref()
            .and_then(|m| m.parse::<usize>().ok())
            .unwrap_or(usize::MAX);
        let chosen: Vec<&Item> = if !request.ids.is_empty() {
            all.iter().filter(|i| request.ids.contains(&i.id)).collect()
        } else if max >= all.len() {
            // All of them: the answer made once per node version.
            let body = cached.all.get_or_init(|| render(name, all.iter()));
            outbox.send(Stanza::iq_result(stanza, body));
            return self.fetched(user, name, all.iter(), requester);
        } else {
            all.iter().take(max).collect()
        };
        outbox.send(Stanza::iq_result(
            stanza,
            &render(name, chosen.iter().copied()),
        ));
        self.fetched(user, name, chosen.into_iter(), requester);
    }

    /// Bundles handed out: `bundle_fetched` events, so the backend rotates the
    /// prekeys (XEP-0384 §5.3.2). Queued and committed in batches: one
    /// transaction per burst of fetches, not per fetch.
    fn fetched<'a>(
        &self,
        user: &User,
        node: &str,
        items: impl Iterator<Item = &'a Item>,
        requester: &str,
    ) {
        let events: Vec<EventKind> = items
            .filter_map(|i| bundle_device(node, &i.id))
            .map(|device_id| EventKind::BundleFetched {
                user_id: user.id.clone(),
                device_id,
                by: requester.to_string(),
            })
            .collect();
        if events.is_empty() {
            return;
        }
        let first = {
            let mut q = self.fetches.lock().unwrap_or_else(|e| e.into_inner());
            let first = q.is_empty();
            q.extend(events);
            first
        };
        if first {
            let (store, fetches) = (self.store.clone(), self.fetches.clone());
            tokio::spawn(async move {
                // Let the burst gather (the answers have gone already).
                tokio::task::yield_now().await;
                let batch = std::mem::take(&mut *fetches.lock().unwrap_or_else(|e| e.into_inner()));
                let mut w = Writes::default();
                for e in &batch {
                    w.event(e);
                }
                if let Err(e) = store.commit(w).await {
                    tracing::error!(error = %e, events = batch.len(), "storing bundle_fetched events");
                }
            });
        }
    }

    /// The nodes `requester` may read, for the account's disco#items.
    pub fn readable_nodes(&self, user: &User, requester: &str) -> Vec<String> {
        let nodes = self.store.nodes(&user.id).unwrap_or_else(|e| {
            tracing::error!(error = %e, "reading PEP nodes");
            Vec::new()
        });
        let mut names: Vec<String> = nodes
            .into_iter()
            .filter(|n| self.may_read(user, n, requester).unwrap_or(false))
            .map(|n| n.node)
            .collect();
        if !user.display_name.is_empty() {
            names.insert(0, NODE_NICK.to_string());
        }
        names
    }

    /// A user's devices, from its OMEMO 2 device list.
    pub fn devices(&self, user: &User) -> Result<Vec<Listed>, StoreError> {
        let items = self.store.items(&user.id, NODE_DEVICES)?;
        Ok(items
            .iter()
            .find(|i| i.id == "current")
            .map(|i| parse_devices(&i.xml))
            .unwrap_or_default())
    }

    /// Publish a device (new or replaced): its bundle in both namespaces, and
    /// the device lists; the lists go to the contacts who see the user's
    /// presence. Whether it is new.
    pub async fn put_device(
        &self,
        user: &User,
        id: u32,
        device: &Device,
        outbox: &Outbox,
    ) -> Result<bool, StoreError> {
        let mut list = self.devices(user)?;
        let new = !list.iter().any(|d| d.id == id);
        list.retain(|d| d.id != id);
        list.push(Listed {
            id,
            label: device.label.clone(),
        });
        list.sort_by_key(|d| d.id);
        let mut w = Writes::default();
        let at_ms = now_ms();
        w.put_node(&user.id, &open_node(NODE_BUNDLES, usize::MAX));
        w.put_item(
            &user.id,
            NODE_BUNDLES,
            &Item {
                id: id.to_string(),
                at_ms,
                xml: device.omemo2_bundle(),
            },
        );
        let legacy = format!("{NODE_AXOLOTL_BUNDLES}:{id}");
        w.put_node(&user.id, &open_node(&legacy, 1));
        w.put_item(
            &user.id,
            &legacy,
            &Item {
                id: "current".into(),
                at_ms,
                xml: device.axolotl_bundle(),
            },
        );
        let notices = self.put_lists(user, &list, at_ms, &mut w);
        let r = self.store.commit(w).await;
        self.invalidate();
        r?;
        self.notify(user, notices, outbox);
        Ok(new)
    }

    /// Remove a device: its bundles, and from the device lists. Whether it was
    /// there.
    pub async fn delete_device(
        &self,
        user: &User,
        id: u32,
        outbox: &Outbox,
    ) -> Result<bool, StoreError> {
        let mut list = self.devices(user)?;
        if !list.iter().any(|d| d.id == id) {
            return Ok(false);
        }
        list.retain(|d| d.id != id);
        let mut w = Writes::default();
        w.delete_item(&user.id, NODE_BUNDLES, &id.to_string());
        let legacy = format!("{NODE_AXOLOTL_BUNDLES}:{id}");
        w.delete_item(&user.id, &legacy, "current");
        w.delete_node(&user.id, &legacy);
        let notices = self.put_lists(user, &list, now_ms(), &mut w);
        let r = self.store.commit(w).await;
        self.invalidate();
        r?;
        self.notify(user, notices, outbox);
        Ok(true)
    }

    /// The user's avatar, if it has one.
    pub fn avatar(&self, user: &User) -> Result<Option<AvatarInfo>, StoreError> {
        let cached = self.load(&user.id, NODE_AVATAR_METADATA)?;
        Ok(cached
            .items
            .first()
            .and_then(|i| i.xml.parse::<Element>().ok())
            .and_then(|el| AvatarInfo::from_metadata(&el)))
    }

    /// The user's avatar image and its type (for the vCard's `PHOTO`).
    pub fn avatar_image(&self, user: &User) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        use base64::Engine;
        let Some(info) = self.avatar(user)? else {
            return Ok(None);
        };
        let cached = self.load(&user.id, NODE_AVATAR_DATA)?;
        let data = cached
            .items
            .iter()
            .find(|i| i.id == info.id)
            .and_then(|i| i.xml.parse::<Element>().ok())
            .and_then(|el| {
                let text: String = el.text().split_whitespace().collect();
                base64::engine::general_purpose::STANDARD.decode(text).ok()
            });
        Ok(data.map(|d| (info.mime, d)))
    }

    /// Publish the user's avatar (XEP-0084): the image at the data node and
    /// its metadata, both named by its SHA-1, replacing the one before; the
    /// metadata goes to the contacts who see the user's presence. Whether it
    /// changed.
    pub async fn put_avatar(
        &self,
        user: &User,
        avatar: &Avatar,
        outbox: &Outbox,
    ) -> Result<bool, StoreError> {
        use base64::Engine;
        let old = self.avatar(user)?;
        let id = &avatar.info.id;
        if old.as_ref().is_some_and(|o| &o.id == id) {
            return Ok(false);
        }
        let mut w = Writes::default();
        Self::retract_avatar(user, old.as_ref(), &mut w);
        let at_ms = now_ms();
        let metadata = avatar.info.metadata();
        let data = format!(
            "<data xmlns='{NODE_AVATAR_DATA}'>{}</data>",
            base64::engine::general_purpose::STANDARD.encode(&avatar.image)
        );
        for (node, xml) in [
            (NODE_AVATAR_DATA, data),
            (NODE_AVATAR_METADATA, metadata.clone()),
        ] {
            w.put_node(&user.id, &open_node(node, 1));
            w.put_item(
                &user.id,
                node,
                &Item {
                    id: id.clone(),
                    at_ms,
                    xml,
                },
            );
        }
        let r = self.store.commit(w).await;
        self.invalidate();
        r?;
        let notice = Notice {
            node: NODE_AVATAR_METADATA,
            item: id.clone(),
            xml: metadata,
        };
        self.notify(user, vec![notice], outbox);
        Ok(true)
    }

    /// Remove the user's avatar: the metadata says `<stop/>` (XEP-0084 §4.5)
    /// and the contacts are told. Whether it had one.
    pub async fn delete_avatar(&self, user: &User, outbox: &Outbox) -> Result<bool, StoreError> {
        let Some(old) = self.avatar(user)? else {
            return Ok(false);
        };
        let mut w = Writes::default();
        Self::retract_avatar(user, Some(&old), &mut w);
        w.delete_node(&user.id, NODE_AVATAR_DATA);
        w.put_node(&user.id, &open_node(NODE_AVATAR_METADATA, 1));
        w.put_item(
            &user.id,
            NODE_AVATAR_METADATA,
            &Item {
                id: "current".into(),
                at_ms: now_ms(),
                xml: avatar_stop(),
            },
        );
        let r = self.store.commit(w).await;
        self.invalidate();
        r?;
        let notice = Notice {
            node: NODE_AVATAR_METADATA,
            item: "current".into(),
            xml: avatar_stop(),
        };
        self.notify(user, vec![notice], outbox);
        Ok(true)
    }

    /// Retract the items of the avatar before (and a `<stop/>`), so each
    /// node holds one item.
    fn retract_avatar(user: &User, old: Option<&AvatarInfo>, w: &mut Writes) {
        if let Some(o) = old {
            w.delete_item(&user.id, NODE_AVATAR_DATA, &o.id);
            w.delete_item(&user.id, NODE_AVATAR_METADATA, &o.id);
        }
        w.delete_item(&user.id, NODE_AVATAR_METADATA, "current");
    }

    /// Write both device lists into `w`; the items to notify.
    fn put_lists(&self, user: &User, list: &[Listed], at_ms: u64, w: &mut Writes) -> Vec<Notice> {
        let user_id = &user.id;
        let mut omemo2 = format!("<devices xmlns='{NS_OMEMO}'>");
        let mut axolotl = format!("<list xmlns='{NS_AXOLOTL}'>");
        for d in list {
            match &d.label {
                Some(l) => {
                    omemo2.push_str(&format!("<device id='{}' label='{}'/>", d.id, escape(l)))
                }
                None => omemo2.push_str(&format!("<device id='{}'/>", d.id)),
            }
            axolotl.push_str(&format!("<device id='{}'/>", d.id));
        }
        omemo2.push_str("</devices>");
        axolotl.push_str("</list>");
        let mut out = Vec::new();
        for (node, xml) in [(NODE_DEVICES, omemo2), (NODE_AXOLOTL_DEVICES, axolotl)] {
            w.put_node(user_id, &open_node(node, 1));
            w.put_item(
                user_id,
                node,
                &Item {
                    id: "current".into(),
                    at_ms,
                    xml: xml.clone(),
                },
            );
            out.push(Notice {
                node,
                item: "current".into(),
                xml,
            });
        }
        out
    }

    /// Send `notices` (node, payload of item `current`) to the user's contacts
    /// who see its presence (PEP's implicit subscription, XEP-0163 §4.3.1).
    fn notify(&self, user: &User, notices: Vec<Notice>, outbox: &Outbox) {
        let roster = self.store.roster(&user.id).unwrap_or_else(|e| {
            tracing::error!(error = %e, "reading a roster");
            Vec::new()
        });
        let from = user.jid();
        for contact in roster.iter().filter(|r| r.subscription.contact_sees_user()) {
            for n in &notices {
                // To the contact's clients that want it (XEP-0115 `+notify`),
                // or to its bare JID when we know none of them online.
                let to = match self.caps.targets(&from, &contact.jid, n.node) {
                    None => vec![contact.jid.clone()],
                    Some(fulls) => fulls,
                };
                for t in &to {
                    event(&from, t, n.node, &n.item, &n.xml, outbox);
                }
            }
        }
    }

    /// The user's display name changed: its nickname (XEP-0172 §4.4) goes to
    /// the contacts who see its presence and want it.
    pub fn nick_changed(&self, user: &User, outbox: &Outbox) {
        let notice = Notice {
            node: NODE_NICK,
            item: "current".into(),
            xml: if user.display_name.is_empty() {
                format!("<nick xmlns='{NODE_NICK}'/>")
            } else {
                nick(user)
            },
        };
        self.notify(user, vec![notice], outbox);
    }

    /// A presence from a contact to `user` (before the inbox stores it):
    /// which of the contact's clients are online and what they want events
    /// of (XEP-0115, asked with a disco#info), and a newly available one
    /// gets the last item of each node it wants (XEP-0163 §4.3.2).
    pub fn presence(self: &Arc<Self>, user: &User, stanza: &Stanza, outbox: &Outbox) {
        let Some(from) = stanza.from.as_ref().filter(|f| f.resource().is_some()) else {
            return;
        };
        let local = user.jid();
        match stanza.type_.as_deref() {
            Some("unavailable") => return self.caps.unavailable(&local, from.as_str()),
            None => {}
            _ => return,
        }
        // Only a contact who may see the user's nodes is tracked (this also
        // bounds what a stranger can make us remember or ask).
        let sees = self
            .store
            .roster_item(&user.id, &from.bare().to_ascii_lowercase())
            .map(|r| r.is_some_and(|r| r.subscription.contact_sees_user()));
        if !sees.unwrap_or(false) {
            return;
        }
        let caps = memchr::memmem::find(&stanza.raw, NS_CAPS.as_bytes())
            .and_then(|_| super::dom(stanza))
            .and_then(|el| {
                el.children()
                    .find(|c| c.is("c", NS_CAPS))
                    .and_then(|c| xmpp_parsers::caps::Caps::try_from(c.clone()).ok())
            });
        match self.caps.available(&local, from.as_str(), caps.as_ref()) {
            Seen::Nothing => {}
            Seen::Known(wants) => self.send_last(user, from.as_str(), &wants, outbox),
            Seen::Ask(query) => {
                let pep = self.clone();
                let outbox = outbox.clone();
                let (user, to) = (user.clone(), from.as_str().to_string());
                tokio::spawn(async move { pep.ask_caps(user, to, query, outbox).await });
            }
        }
    }

    /// Ask `to` what its caps mean, then send it the last items it wants.
    async fn ask_caps(self: Arc<Self>, user: User, to: String, query: Query, outbox: Outbox) {
        use xmpp_parsers::disco::DiscoInfoResult;
        let id = format!("caps-{}", uuid::Uuid::new_v4().simple());
        let payload = format!(
            "<query xmlns='http://jabber.org/protocol/disco#info' node='{}'/>",
            escape(&query.node)
        );
        let iq = Stanza::iq("get", &user.jid(), &to, &id, &payload);
        let answer = outbox
            .ask(iq, std::time::Duration::from_secs(30))
            .await
            .ok()
            .filter(|a| !a.is_error())
            .and_then(|a| super::payload::<DiscoInfoResult>(&a));
        if let Some(wants) = self.caps.learned(&user.jid(), &to, &query, answer.as_ref()) {
            self.send_last(&user, &to, &wants, &outbox);
        }
    }

    /// The newest item of each of `user`'s nodes that `to` wants and may read.
    fn send_last(&self, user: &User, to: &str, wants: &Interests, outbox: &Outbox) {
        let from = user.jid();
        let requester = to.split('/').next().unwrap_or(to).to_ascii_lowercase();
        for node in wants.iter() {
            if node == NODE_NICK {
                if !user.display_name.is_empty() {
                    event(&from, to, NODE_NICK, "current", &nick(user), outbox);
                }
                continue;
            }
            let Ok(cached) = self.load(&user.id, node) else {
                continue;
            };
            let (Some(n), Some(newest)) = (&cached.node, cached.items.first()) else {
                continue;
            };
            if self.may_read(user, n, &requester).unwrap_or(false) {
                event(&from, to, node, &newest.id, &newest.xml, outbox);
            }
        }
    }
}

/// A PEP notification to `user` (a message with a pubsub event): an XMPP
/// contact's device list, as a `devices_changed` event (the inbox stores it
/// in the peer's order, instead of a `message` event). `None` for any other
/// message.
pub fn notification(user: &User, stanza: &Stanza) -> Option<EventKind> {
    // Cheap for every other message: a byte search first.
    memchr::memmem::find(&stanza.raw, NS_PUBSUB_EVENT.as_bytes())?;
    let el = super::dom(stanza)?;
    let items = el
        .get_child("event", NS_PUBSUB_EVENT)?
        .get_child("items", NS_PUBSUB_EVENT)?;
    let namespace = match items.attr("node")? {
        NODE_DEVICES => "omemo2",
        NODE_AXOLOTL_DEVICES => "legacy",
        _ => return None,
    };
    let list = items
        .children()
        .find(|c| c.name() == "item")
        .and_then(|i| i.children().next());
    let devices = list
        .map(|l| {
            l.children()
                .filter(|c| c.name() == "device")
                .filter_map(|c| c.attr("id")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    Some(EventKind::DevicesChanged {
        user_id: user.id.clone(),
        jid: stanza.from.as_ref()?.bare().to_ascii_lowercase(),
        namespace: namespace.into(),
        devices,
    })
}

/// The answer to an items request: `items` of `node`.
fn render<'a>(node: &str, items: impl Iterator<Item = &'a Item>) -> String {
    let mut body = format!(
        "<pubsub xmlns='{NS_PUBSUB}'><items node='{}'>",
        escape(node)
    );
    for i in items {
        body.push_str("<item id='");
        body.push_str(&escape(&i.id));
        body.push_str("'>");
        body.push_str(&i.xml);
        body.push_str("</item>");
    }
    body.push_str("</items></pubsub>");
    body
}

/// A PEP event of one item to `to` (a headline, XEP-0163 §4.3).
fn event(from: &str, to: &str, node: &str, item: &str, xml: &str, outbox: &Outbox) {
    let m = format!(
        "<message type='headline' id='{}' from='{}' to='{}'><event xmlns='{NS_PUBSUB_EVENT}'>\
         <items node='{}'><item id='{}'>{xml}</item></items></event></message>",
        uuid::Uuid::new_v4().simple(),
        escape(from),
        escape(to),
        escape(node),
        escape(item),
    );
    if let Some(s) = Stanza::parse(&m) {
        outbox.send(s);
    }
}

/// The user's nickname payload (XEP-0172).
fn nick(user: &User) -> String {
    format!(
        "<nick xmlns='{NODE_NICK}'>{}</nick>",
        escape(&user.display_name)
    )
}

/// The nickname node's items (XEP-0172 §4.5): the display name, if any.
fn nick_items(user: &User) -> String {
    let item = if user.display_name.is_empty() {
        String::new()
    } else {
        format!("<item id='current'>{}</item>", nick(user))
    };
    format!("<pubsub xmlns='{NS_PUBSUB}'><items node='{NODE_NICK}'>{item}</items></pubsub>")
}

/// The devices of an OMEMO 2 device list item.
fn parse_devices(xml: &str) -> Vec<Listed> {
    let Ok(el) = xml.parse::<Element>() else {
        return Vec::new();
    };
    el.children()
        .filter(|c| c.name() == "device")
        .filter_map(|c| {
            Some(Listed {
                id: c.attr("id")?.parse().ok()?,
                label: c.attr("label").map(str::to_string),
            })
        })
        .collect()
}

/// An iq error with a pubsub-specific condition (XEP-0060 §7.1.3 style).
fn pubsub_error(request: &Stanza, type_: &str, condition: &str, specific: &str) -> Stanza {
    error_with(
        request,
        type_,
        condition,
        &format!("<{specific} xmlns='{NS_PUBSUB_ERRORS}'/>"),
    )
}

/// `feature-not-implemented` with `<unsupported feature=.../>` (§5.x).
fn unsupported(request: &Stanza, feature: &str) -> Stanza {
    let specific = if feature.is_empty() {
        String::new()
    } else {
        format!("<unsupported xmlns='{NS_PUBSUB_ERRORS}' feature='{feature}'/>")
    };
    error_with(request, "cancel", "feature-not-implemented", &specific)
}

fn error_with(request: &Stanza, type_: &str, condition: &str, specific: &str) -> Stanza {
    let xml = format!(
        "<iq type='error' id='{}' from='{}' to='{}'><error type='{type_}'>\
         <{condition} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>{specific}</error></iq>",
        escape(request.id.as_deref().unwrap_or_default()),
        escape(request.to.as_deref().unwrap_or_default()),
        escape(request.from.as_deref().unwrap_or_default()),
    );
    Stanza::parse(&xml).unwrap_or_else(|| Stanza::iq_result(request, ""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::error_condition;
    use crate::services::fake::Services;
    use crate::store::{RosterItem, Subscription};

    const K32: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="; // 32 bytes
    const K33: &str = "BQABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f"; // 33 bytes

    fn device(label: Option<&str>) -> Device {
        use base64::Engine;
        Device {
            label: label.map(str::to_string),
            identity_key: K33.into(),
            signed_prekey: SignedPrekey {
                id: 7,
                public: K32.into(),
                signature: base64::engine::general_purpose::STANDARD.encode([9u8; 64]),
            },
            prekeys: (1..=3)
                .map(|id| Prekey {
                    id,
                    public: K32.into(),
                })
                .collect(),
        }
    }

    /// juliet@capulet.example in the user's roster with `subscription`.
    async fn juliet(s: &Services, user: &User, subscription: Subscription) {
        let contact = RosterItem {
            jid: "juliet@capulet.example".into(),
            subscription,
            pending_out: false,
            pending_in: false,
        };
        s.store()
            .put_roster_item(&user.id, &contact.jid, Some(&contact), Vec::new())
            .await
            .unwrap();
    }

    async fn setup() -> (Services, User, Arc<Pep>) {
        let s = Services::new(&["wire.test"], &[]);
        s.user("alice", "wire.test", "Alice").await;
        let user = s.store().user("id-alice").unwrap().unwrap();
        // The one the accounts answer with (its cache sees the writes).
        let pep = s.pep.clone();
        (s, user, pep)
    }

    /// A real 1x1 PNG.
    const PNG_1X1: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII=";

    fn png() -> AvatarIn {
        AvatarIn {
            mime: "image/png".into(),
            data: PNG_1X1.into(),
        }
    }

    #[test]
    fn avatars_are_checked_against_their_bytes() {
        use base64::Engine;
        let a = png().check().unwrap();
        assert_eq!((a.info.width, a.info.height, a.info.bytes), (1, 1, 68));
        assert_eq!(a.info.id, sha1_hex(&a.image));
        assert_eq!(a.info.id.len(), 40);
        // XEP-0084 §4.2 Example 3's shape, read back.
        let el: Element = a.info.metadata().parse().unwrap();
        assert_eq!(AvatarInfo::from_metadata(&el), Some(a.info.clone()));
        let stop: Element = avatar_stop().parse().unwrap();
        assert_eq!(AvatarInfo::from_metadata(&stop), None);
        let wrong = AvatarIn {
            mime: "image/jpeg".into(),
            ..png()
        };
        let e = wrong.check().unwrap_err();
        assert_eq!(e.field, "type");
        assert!(e.reason.contains("image/png"), "{e:?}");
        let svg = AvatarIn {
            mime: "image/svg+xml".into(),
            ..png()
        };
        assert_eq!(svg.check().unwrap_err().field, "type");
        let text = AvatarIn {
            data: base64::engine::general_purpose::STANDARD.encode("hello, not an image"),
            ..png()
        };
        assert_eq!(text.check().unwrap_err().field, "data");
        let big = AvatarIn {
            data: base64::engine::general_purpose::STANDARD.encode(vec![0u8; MAX_AVATAR_BYTES + 1]),
            ..png()
        };
        assert!(big.check().unwrap_err().reason.contains("bytes"));
        let junk = AvatarIn {
            data: "%%%".into(),
            ..png()
        };
        assert!(junk.check().unwrap_err().reason.starts_with("not base64"));
    }

    /// XEP-0084 §4.3 and §4.4: a contact gets the metadata, then fetches the
    /// data by the id it names; the vCard carries it too (XEP-0153); a new
    /// image replaces the old one's items; removal publishes `<stop/>`.
    #[tokio::test]
    async fn an_avatar_is_what_clients_fetch() {
        let (s, user, pep) = setup().await;
        juliet(&s, &user, Subscription::Both).await;
        let a = png().check().unwrap();
        assert!(pep.put_avatar(&user, &a, &s.outbox).await.unwrap());
        assert!(!pep.put_avatar(&user, &a, &s.outbox).await.unwrap());
        let notes = s.take_sent();
        assert_eq!(notes.len(), 1, "{notes:?}");
        let id = &a.info.id;
        assert!(
            notes[0].as_str().contains(&format!(
                "<items node='{NODE_AVATAR_METADATA}'><item id='{id}'><metadata \
                 xmlns='{NODE_AVATAR_METADATA}'><info bytes='68' height='1' id='{id}' \
                 type='image/png' width='1'/></metadata></item></items>"
            )),
            "{}",
            notes[0].as_str()
        );
        assert_eq!(pep.avatar(&user).unwrap(), Some(a.info.clone()));
        let data = s.answer(&format!(
            "<iq type='get' from='romeo@montague.example/orchard' to='alice@wire.test' id='d1'>\
             <pubsub xmlns='{NS_PUBSUB}'><items node='{NODE_AVATAR_DATA}'><item id='{id}'/>\
             </items></pubsub></iq>"
        ));
        assert!(
            data.as_str().contains(&format!(
                "<item id='{id}'><data xmlns='{NODE_AVATAR_DATA}'>{PNG_1X1}</data>"
            )),
            "{}",
            data.as_str()
        );
        let vcard = s.answer(
            "<iq type='get' from='romeo@montague.example/orchard' to='alice@wire.test' id='v1'>\
             <vCard xmlns='vcard-temp'/></iq>",
        );
        assert!(
            vcard.as_str().contains("<TYPE>image/png</TYPE>")
                && vcard
                    .as_str()
                    .contains(&format!("<BINVAL>{PNG_1X1}</BINVAL>")),
            "{}",
            vcard.as_str()
        );

        // Another image: one item per node, the new one's.
        let other = AvatarIn {
            mime: "image/gif".into(),
            data: "R0lGODlhAQABAIAAAP///wAAACwAAAAAAQABAAACAkQBADs=".into(),
        }
        .check()
        .unwrap();
        assert!(pep.put_avatar(&user, &other, &s.outbox).await.unwrap());
        for node in [NODE_AVATAR_DATA, NODE_AVATAR_METADATA] {
            let items = s.store().items(&user.id, node).unwrap();
            let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
            assert_eq!(ids, [other.info.id.as_str()], "{node}");
        }
        s.take_sent();

        assert!(pep.delete_avatar(&user, &s.outbox).await.unwrap());
        assert!(!pep.delete_avatar(&user, &s.outbox).await.unwrap());
        assert_eq!(pep.avatar(&user).unwrap(), None);
        let notes = s.take_sent();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].as_str().contains(
            "<item id='current'><metadata xmlns='urn:xmpp:avatar:metadata'><stop/></metadata>"
        ));
        assert!(
            s.store()
                .items(&user.id, NODE_AVATAR_DATA)
                .unwrap()
                .is_empty()
        );
        let vcard = s.answer(
            "<iq type='get' from='romeo@montague.example/orchard' to='alice@wire.test' id='v2'>\
             <vCard xmlns='vcard-temp'/></iq>",
        );
        assert!(!vcard.as_str().contains("PHOTO"), "{}", vcard.as_str());
    }

    /// XEP-0163 §4.3 with XEP-0115: a contact's client that advertises
    /// `urn:xmpp:omemo:2:devices+notify` is asked what its caps mean once,
    /// gets the last device list when it comes online, and then the changes
    /// of that node only, at its full JID; offline again, the contact's
    /// bare JID gets everything, as without caps.
    #[tokio::test]
    async fn events_go_to_the_clients_that_want_them() {
        use base64::Engine;
        use xmpp_parsers::caps::{compute_disco, hash_caps};
        let (s, user, pep) = setup().await;
        juliet(&s, &user, Subscription::Both).await;
        pep.put_device(&user, 1, &device(None), &s.outbox)
            .await
            .unwrap();
        s.take_sent();

        let features = "<identity category='client' name='Dino' type='pc'/>\
            <feature var='http://jabber.org/protocol/caps'/>\
            <feature var='urn:xmpp:omemo:2:devices+notify'/>";
        let disco = xmpp_parsers::disco::DiscoInfoResult::try_from(
            format!("<query xmlns='http://jabber.org/protocol/disco#info'>{features}</query>")
                .parse::<Element>()
                .unwrap(),
        )
        .unwrap();
        let ver = base64::engine::general_purpose::STANDARD.encode(
            hash_caps(&compute_disco(&disco), "sha-1".parse().unwrap())
                .unwrap()
                .hash,
        );
        let full = "juliet@capulet.example/balcony";
        let send = |xml: String| s.outbox.send(Stanza::parse(&xml).unwrap());
        send(format!(
            "<presence from='{full}' to='alice@wire.test'><c xmlns='http://jabber.org/protocol/caps' \
             hash='sha-1' node='https://dino.im' ver='{ver}'/></presence>"
        ));
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        let asked = s.take_sent();
        let q = asked
            .iter()
            .find(|q| q.as_str().contains("disco#info"))
            .unwrap_or_else(|| panic!("{asked:?}"));
        assert_eq!(q.to.as_ref().map(|t| t.as_str()), Some(full));
        assert!(
            q.as_str()
                .contains(&format!("node='https://dino.im#{ver}'")),
            "{}",
            q.as_str()
        );
        send(format!(
            "<iq type='result' id='{}' from='{full}' to='alice@wire.test'>\
             <query xmlns='http://jabber.org/protocol/disco#info' node='https://dino.im#{ver}'>\
             {features}</query></iq>",
            q.id.as_deref().unwrap()
        ));
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        let last = s.take_sent();
        assert_eq!(last.len(), 1, "{last:?}");
        assert_eq!(last[0].to.as_ref().map(|t| t.as_str()), Some(full));
        assert!(
            last[0]
                .as_str()
                .contains(&format!("<items node='{NODE_DEVICES}'><item id='current'>"))
        );

        // A change: the device list to that client only (not the legacy one).
        pep.put_device(&user, 2, &device(None), &s.outbox)
            .await
            .unwrap();
        let notes = s.take_sent();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert_eq!(notes[0].to.as_ref().map(|t| t.as_str()), Some(full));
        // A status change asks nothing and resends nothing.
        send(format!(
            "<presence from='{full}' to='alice@wire.test'><show>away</show><c \
             xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='https://dino.im' ver='{ver}'/></presence>"
        ));
        assert!(s.take_sent().is_empty());

        // Offline: the bare JID gets both lists.
        send(format!(
            "<presence type='unavailable' from='{full}' to='alice@wire.test'/>"
        ));
        pep.put_device(&user, 3, &device(None), &s.outbox)
            .await
            .unwrap();
        let notes = s.take_sent();
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(
            notes
                .iter()
                .all(|n| n.to.as_ref().map(|t| t.as_str()) == Some("juliet@capulet.example"))
        );

        // A stranger's caps are not looked up.
        send(format!(
            "<presence from='mallory@evil.example/x' to='alice@wire.test'><c \
             xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n' ver='{ver}'/></presence>"
        ));
        assert!(s.take_sent().is_empty());
    }

    /// XEP-0172 §4.4: a new display name is a new nickname for the contacts.
    #[tokio::test]
    async fn a_new_name_is_sent_as_the_nickname() {
        let (s, mut user, pep) = setup().await;
        juliet(&s, &user, Subscription::From).await;
        user.display_name = "Alice & Co".into();
        pep.nick_changed(&user, &s.outbox);
        let sent = s.take_sent();
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert!(
            sent[0].as_str().contains(&format!(
                "<items node='{NODE_NICK}'><item id='current'><nick xmlns='{NODE_NICK}'>Alice &amp; Co</nick>"
            )),
            "{}",
            sent[0].as_str()
        );
    }

    /// XEP-0060 §6.5 requests as the DOM would read them: the first child of
    /// `<pubsub/>`, its node and `max_items`, the ids asked for; a prefixed
    /// pubsub element too; nothing for an iq without one.
    #[test]
    fn requests_are_read_without_a_dom() {
        let r = read_request(&format!(
            "<iq type='get' id='a'><pubsub xmlns='{NS_PUBSUB}'><items node='urn:xmpp:omemo:2:bundles' \
             max_items='2'><item id='31415'/><item id='x&amp;y'></item></items></pubsub></iq>"
        ))
        .unwrap();
        assert_eq!(r.op.as_deref(), Some("items"));
        assert_eq!(r.node.as_deref(), Some("urn:xmpp:omemo:2:bundles"));
        assert_eq!(r.max_items.as_deref(), Some("2"));
        assert_eq!(r.ids, ["31415", "x&y"]);
        let r = read_request(&format!(
            "<iq type='set' id='b' xmlns:ps='{NS_PUBSUB}'><ps:pubsub><ps:publish node='n'>\
             <ps:item id='i'/></ps:publish></ps:pubsub></iq>"
        ))
        .unwrap();
        assert_eq!(
            (r.op.as_deref(), r.node.as_deref()),
            (Some("publish"), Some("n"))
        );
        assert!(r.ids.is_empty(), "publish items are not asked-for ids");
        // Another namespace's pubsub, or none: not a request.
        assert_eq!(
            read_request(
                "<iq type='get' id='c'><pubsub xmlns='urn:other'><items node='n'/></pubsub></iq>"
            ),
            None
        );
        assert_eq!(
            read_request("<iq type='get' id='d'><ping xmlns='urn:xmpp:ping'/></iq>"),
            None
        );
        let r = read_request(&format!(
            "<iq type='get' id='e'><pubsub xmlns='{NS_PUBSUB}'/></iq>"
        ))
        .unwrap();
        assert_eq!(r, Request::default());
    }

    /// The plain reading is the resolving one's, or it hands over: never a
    /// different answer. The common fetch is read plainly.
    #[test]
    fn the_plain_reading_agrees_with_the_resolving_one_or_hands_over() {
        let fetch = format!(
            "<iq type='get' id='a'><pubsub xmlns='{NS_PUBSUB}'><items node='urn:xmpp:omemo:2:devices'/></pubsub></iq>"
        );
        assert!(matches!(read_request_plain(&fetch), Some(Some(_))));
        let cases = [
            fetch.clone(),
            format!(
                "<iq type='get' id='b'><pubsub xmlns='{NS_PUBSUB}'><items node='n' max_items='1'>\
                 <item id='1'/><item id='&#x32;'/></items></pubsub></iq>"
            ),
            // Prefixed: handed over.
            format!(
                "<iq type='get' id='c' xmlns:ps='{NS_PUBSUB}'><ps:pubsub><ps:items node='n'/></ps:pubsub></iq>"
            ),
            format!("<iq type='get' id='d'><pubsub xmlns='{NS_PUBSUB}'><p:items xmlns:p='{NS_PUBSUB}' node='n'/></pubsub></iq>"),
            // Not declared on the element: jabber:server's, not a request.
            "<iq type='get' id='e'><pubsub><items node='n'/></pubsub></iq>".to_string(),
            "<iq type='get' id='f'><pubsub xmlns='urn:other'><items node='n'/></pubsub></iq>".to_string(),
            // A declaration written with a reference.
            "<iq type='get' id='g'><pubsub xmlns='http://jabber.org/protocol/pubsu&#x62;'><items node='n'/></pubsub></iq>".to_string(),
            // A second pubsub, another namespace below, an empty one.
            format!(
                "<iq type='get' id='h'><pubsub xmlns='urn:x'/><pubsub xmlns='{NS_PUBSUB}'>\
                 <items xmlns='urn:y' node='m'><item id='z'/></items></pubsub></iq>"
            ),
            format!("<iq type='get' id='i'><pubsub xmlns='{NS_PUBSUB}'/></iq>"),
            "<iq type='get' id='j'><ping xmlns='urn:xmpp:ping'/></iq>".to_string(),
        ];
        for xml in &cases {
            if let Some(plain) = read_request_plain(xml) {
                assert_eq!(plain, read_request_resolved(xml), "{xml}");
            }
        }
        assert_eq!(read_request_plain(&cases[2]), None);
        assert_eq!(read_request_plain(&cases[4]), None);
        assert_eq!(read_request_plain(&cases[6]), None);
    }

    #[test]
    fn devices_are_checked_for_structure_and_size() {
        assert_eq!(device(None).check(), Ok(()));
        let mut d = device(None);
        d.identity_key = "AAEC".into();
        assert_eq!(d.check().unwrap_err().field, "identity_key");
        let mut d = device(None);
        d.signed_prekey.signature = K32.into();
        assert_eq!(d.check().unwrap_err().field, "signed_prekey.signature");
        let mut d = device(None);
        d.prekeys[2].public = "not base64!".into();
        let e = d.check().unwrap_err();
        assert_eq!(e.field, "prekeys[2].public");
        assert!(e.reason.starts_with("not base64"), "{e:?}");
        let mut d = device(None);
        d.prekeys[1].id = 1;
        assert_eq!(d.check().unwrap_err().field, "prekeys[1].id");
        let mut d = device(None);
        d.prekeys.clear();
        assert_eq!(d.check().unwrap_err().field, "prekeys");
        let mut d = device(Some("phone\u{7}"));
        assert_eq!(d.check().unwrap_err().field, "label");
        d.label = Some("phone".into());
        assert_eq!(d.check(), Ok(()));
    }

    /// XEP-0384 §5.3.1/§5.3.2: the device list and bundle a client fetches, in
    /// both namespaces; a bundle fetch is an event; a contact who sees the
    /// user's presence gets the new lists.
    #[tokio::test]
    async fn published_devices_are_what_omemo_clients_fetch() {
        let (s, user, pep) = setup().await;
        let store = s.store();
        let contact = RosterItem {
            jid: "juliet@capulet.example".into(),
            subscription: Subscription::From,
            pending_out: false,
            pending_in: false,
        };
        store
            .put_roster_item(&user.id, &contact.jid, Some(&contact), Vec::new())
            .await
            .unwrap();
        assert!(
            pep.put_device(&user, 31415, &device(Some("Phone")), &s.outbox)
                .await
                .unwrap()
        );
        assert!(
            !pep.put_device(&user, 31415, &device(Some("Phone")), &s.outbox)
                .await
                .unwrap()
        );
        assert!(
            pep.put_device(&user, 12345, &device(None), &s.outbox)
                .await
                .unwrap()
        );
        // The contact got each new list, in both namespaces.
        let notes = s.take_sent();
        assert_eq!(notes.len(), 6, "{notes:?}");
        assert!(
            notes
                .iter()
                .all(|n| n.to.as_deref() == Some("juliet@capulet.example")
                    && n.type_.as_deref() == Some("headline"))
        );
        assert!(
            notes[4].as_str().contains(&format!(
                "<items node='{NODE_DEVICES}'><item id='current'><devices xmlns='{NS_OMEMO}'>\
             <device id='12345'/><device id='31415' label='Phone'/></devices>"
            )),
            "{}",
            notes[4].as_str()
        );

        let ask = |xml: &str| s.answer(xml);
        let a = ask(&format!(
            "<iq type='get' from='romeo@montague.example/orchard' to='alice@wire.test' id='f1'>\
             <pubsub xmlns='{NS_PUBSUB}'><items node='{NODE_DEVICES}'/></pubsub></iq>"
        ));
        assert_eq!(a.type_.as_deref(), Some("result"));
        assert!(
            a.as_str()
                .contains("<device id='12345'/><device id='31415' label='Phone'/>"),
            "{}",
            a.as_str()
        );
        let a = ask(&format!(
            "<iq type='get' from='romeo@montague.example/orchard' to='alice@wire.test' id='f2'>\
             <pubsub xmlns='{NS_PUBSUB}'><items node='{NODE_AXOLOTL_DEVICES}' max_items='1'/></pubsub></iq>"
        ));
        assert!(
            a.as_str().contains(&format!(
                "<list xmlns='{NS_AXOLOTL}'><device id='12345'/><device id='31415'/></list>"
            )),
            "{}",
            a.as_str()
        );
        let a = ask(&format!(
            "<iq type='get' from='romeo@montague.example/orchard' to='alice@wire.test' id='f3'>\
             <pubsub xmlns='{NS_PUBSUB}'><items node='{NODE_BUNDLES}'><item id='31415'/></items></pubsub></iq>"
        ));
        let x = a.as_str();
        assert!(
            x.contains(&format!(
                "<item id='31415'><bundle xmlns='{NS_OMEMO}'><spk id='7'>{K32}</spk>"
            )),
            "{x}"
        );
        assert!(
            x.contains(&format!("<ik>{K33}</ik><prekeys><pk id='1'>{K32}</pk>")),
            "{x}"
        );
        assert!(!x.contains("12345"), "{x}");
        let a = ask(&format!(
            "<iq type='get' from='romeo@montague.example/orchard' to='alice@wire.test' id='f4'>\
             <pubsub xmlns='{NS_PUBSUB}'><items node='{NODE_AXOLOTL_BUNDLES}:12345'/></pubsub></iq>"
        ));
        assert!(
            a.as_str()
                .contains("<signedPreKeyPublic signedPreKeyId='7'>"),
            "{}",
            a.as_str()
        );
        // Two bundle fetches: two events, for the backend to rotate prekeys.
        let mut fetched = Vec::new();
        for _ in 0..100 {
            fetched = store.events_after(0, 100).unwrap();
            if fetched.len() == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let devices: Vec<u32> = fetched
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::BundleFetched { device_id, by, .. } => {
                    assert_eq!(by, "romeo@montague.example");
                    Some(*device_id)
                }
                _ => None,
            })
            .collect();
        assert_eq!(devices, [31415, 12345]);

        // Removing a device.
        assert!(pep.delete_device(&user, 31415, &s.outbox).await.unwrap());
        assert!(!pep.delete_device(&user, 31415, &s.outbox).await.unwrap());
        let listed: Vec<u32> = pep.devices(&user).unwrap().iter().map(|d| d.id).collect();
        assert_eq!(listed, [12345]);
        s.take_sent();
        // What was read before the change (and cached) is read anew.
        let a = ask(&format!(
            "<iq type='get' from='romeo@montague.example/orchard' to='alice@wire.test' id='f6'>\
             <pubsub xmlns='{NS_PUBSUB}'><items node='{NODE_DEVICES}'/></pubsub></iq>"
        ));
        assert!(
            a.as_str().contains("<device id='12345'/></devices>") && !a.as_str().contains("31415"),
            "{}",
            a.as_str()
        );
        let a = ask(&format!(
            "<iq type='get' from='romeo@montague.example/orchard' to='alice@wire.test' id='f5'>\
             <pubsub xmlns='{NS_PUBSUB}'><items node='{NODE_AXOLOTL_BUNDLES}:31415'/></pubsub></iq>"
        ));
        assert_eq!(error_condition(&a), StanzaCondition::ItemNotFound);
    }

    /// XEP-0060 §6.5.9: a presence-access node refuses non-contacts with
    /// presence-subscription-required; publishing is the account's; other
    /// requests are not implemented; disco#items lists what one may read.
    #[tokio::test]
    async fn access_and_refusals() {
        let (s, user, _pep) = setup().await;
        let store = s.store();
        let mut w = Writes::default();
        w.put_node(
            &user.id,
            &Node {
                node: "private".into(),
                access: Access::Presence,
                max_items: 1,
            },
        );
        w.put_item(
            &user.id,
            "private",
            &Item {
                id: "1".into(),
                at_ms: 1,
                xml: "<x xmlns='urn:example'/>".into(),
            },
        );
        w.put_node(
            &user.id,
            &Node {
                node: "public".into(),
                access: Access::Open,
                max_items: 1,
            },
        );
        store.commit(w).await.unwrap();
        let get = |from: &str, id: &str| {
            s.answer(&format!(
                "<iq type='get' from='{from}' to='alice@wire.test' id='{id}'>\
                 <pubsub xmlns='{NS_PUBSUB}'><items node='private'/></pubsub></iq>"
            ))
        };
        let a = get("stranger@else.example/x", "a1");
        assert_eq!(a.type_.as_deref(), Some("error"));
        assert!(
            a.as_str().contains(
                "<not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>\
             <presence-subscription-required xmlns='http://jabber.org/protocol/pubsub#errors'/>"
            ),
            "{}",
            a.as_str()
        );
        assert_eq!(a.to.as_deref(), Some("stranger@else.example/x"));
        let friend = RosterItem {
            jid: "friend@else.example".into(),
            subscription: Subscription::Both,
            pending_out: false,
            pending_in: false,
        };
        store
            .put_roster_item(&user.id, &friend.jid, Some(&friend), Vec::new())
            .await
            .unwrap();
        let a = get("Friend@else.example/x", "a2");
        assert!(
            a.as_str()
                .contains("<item id='1'><x xmlns='urn:example'/></item>"),
            "{}",
            a.as_str()
        );
        let a = s.answer(&format!(
            "<iq type='set' from='friend@else.example/x' to='alice@wire.test' id='p1'>\
             <pubsub xmlns='{NS_PUBSUB}'><publish node='public'><item><x xmlns='urn:example'/></item></publish></pubsub></iq>"
        ));
        assert_eq!(error_condition(&a), StanzaCondition::Forbidden);
        let a = s.answer(&format!(
            "<iq type='set' from='friend@else.example/x' to='alice@wire.test' id='p2'>\
             <pubsub xmlns='{NS_PUBSUB}'><subscribe node='public' jid='friend@else.example'/></pubsub></iq>"
        ));
        assert_eq!(error_condition(&a), StanzaCondition::FeatureNotImplemented);
        assert!(a.as_str().contains("feature='subscribe'"), "{}", a.as_str());
        let a = s.answer(&format!(
            "<iq type='get' from='friend@else.example/x' to='alice@wire.test' id='p3'>\
             <pubsub xmlns='{NS_PUBSUB}'><items/></pubsub></iq>"
        ));
        assert!(a.as_str().contains("nodeid-required"), "{}", a.as_str());
        let items = |from: &str| {
            s.answer(&format!(
                "<iq type='get' from='{from}' to='alice@wire.test' id='d1'>\
                 <query xmlns='http://jabber.org/protocol/disco#items'/></iq>"
            ))
            .as_str()
            .to_string()
        };
        let x = items("stranger@else.example/x");
        assert!(
            x.contains("node='public'") && !x.contains("node='private'"),
            "{x}"
        );
        let x = items("friend@else.example/x");
        assert!(
            x.contains("node='public'") && x.contains("node='private'"),
            "{x}"
        );
        assert!(x.contains("node='http://jabber.org/protocol/nick'"), "{x}");
        // XEP-0172 §4.5: the nickname, from the profile.
        let a = s.answer(&format!(
            "<iq type='get' from='stranger@else.example/x' to='alice@wire.test' id='n1'>\
             <pubsub xmlns='{NS_PUBSUB}'><items node='{NODE_NICK}'/></pubsub></iq>"
        ));
        assert!(
            a.as_str().contains(
                "<item id='current'><nick xmlns='http://jabber.org/protocol/nick'>Alice</nick></item>"
            ),
            "{}",
            a.as_str()
        );
    }
}
