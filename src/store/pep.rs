//! Local users' PEP nodes (XEP-0163) in the store: a node's configuration and
//! its items, each under its own key, written through [`Writes`] so a device
//! change commits with the nodes it republishes.
//!
//! Keys (user id and node NUL-separated):
//! - `T_NODE user\0node` -> [`Node`] (JSON);
//! - `T_ITEM user\0node\0item-id` -> [`Item`] (JSON).

use serde::{Deserialize, Serialize};

use super::{Op, Store, StoreError, Writes, json, key, parse};

const T_NODE: u8 = b'N';
const T_ITEM: u8 = b'I';

/// Who may read a node (XEP-0060 §4.5; PEP's default is `presence`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Anyone.
    Open,
    /// Contacts subscribed to the user's presence.
    Presence,
}

impl Access {
    /// The `pubsub#access_model` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Open => "open",
            Access::Presence => "presence",
        }
    }
}

/// A node's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Its name.
    pub node: String,
    /// Who may read it.
    pub access: Access,
    /// The most items it keeps (the oldest go).
    pub max_items: usize,
}

/// One published item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// Its id.
    pub id: String,
    /// When it was published (unix ms).
    pub at_ms: u64,
    /// The payload: one serialized element.
    pub xml: String,
}

fn node_key(user_id: &str, node: &str) -> Vec<u8> {
    let mut k = key(T_NODE, user_id.as_bytes());
    k.push(0);
    k.extend_from_slice(node.as_bytes());
    k
}

fn items_prefix(user_id: &str, node: &str) -> Vec<u8> {
    let mut k = key(T_ITEM, user_id.as_bytes());
    k.push(0);
    k.extend_from_slice(node.as_bytes());
    k.push(0);
    k
}

fn item_key(user_id: &str, node: &str, id: &str) -> Vec<u8> {
    let mut k = items_prefix(user_id, node);
    k.extend_from_slice(id.as_bytes());
    k
}

/// The end of the key range that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    // Prefixes end in NUL: NUL + 1 bounds everything after it.
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

impl Writes {
    /// Create or configure a node.
    pub fn put_node(&mut self, user_id: &str, n: &Node) {
        self.ops.push(Op::Put(node_key(user_id, &n.node), json(n)));
    }

    /// Publish (or replace) an item.
    pub fn put_item(&mut self, user_id: &str, node: &str, item: &Item) {
        self.ops
            .push(Op::Put(item_key(user_id, node, &item.id), json(item)));
    }

    /// Retract an item.
    pub fn delete_item(&mut self, user_id: &str, node: &str, id: &str) {
        self.ops.push(Op::Delete(item_key(user_id, node, id)));
    }

    /// Delete a node (its items are deleted one by one by the caller).
    pub fn delete_node(&mut self, user_id: &str, node: &str) {
        self.ops.push(Op::Delete(node_key(user_id, node)));
    }
}

impl Store {
    /// A user's node.
    pub fn node(&self, user_id: &str, node: &str) -> Result<Option<Node>, StoreError> {
        self.kv
            .get(&node_key(user_id, node))?
            .map(|v| parse(&v))
            .transpose()
    }

    /// Every node of a user, by name.
    pub fn nodes(&self, user_id: &str) -> Result<Vec<Node>, StoreError> {
        let mut start = key(T_NODE, user_id.as_bytes());
        start.push(0);
        let end = prefix_end(&start);
        self.kv
            .range(&start, &end, usize::MAX)?
            .iter()
            .map(|(_, v)| parse(v))
            .collect()
    }

    /// A node's items, by id.
    pub fn items(&self, user_id: &str, node: &str) -> Result<Vec<Item>, StoreError> {
        let start = items_prefix(user_id, node);
        let end = prefix_end(&start);
        self.kv
            .range(&start, &end, usize::MAX)?
            .iter()
            .map(|(_, v)| parse(v))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn nodes_and_items_are_kept_per_user_and_node() {
        let store = Store::open(crate::store::memory_kv().unwrap(), "example.org").unwrap();
        let n = |node: &str| Node {
            node: node.into(),
            access: Access::Open,
            max_items: 10,
        };
        let item = |id: &str| Item {
            id: id.into(),
            at_ms: 1,
            xml: format!("<x id='{id}'/>"),
        };
        let mut w = Writes::default();
        w.put_node("u1", &n("a"));
        w.put_node("u1", &n("a:b"));
        w.put_node("u2", &n("a"));
        w.put_item("u1", "a", &item("1"));
        w.put_item("u1", "a", &item("2"));
        w.put_item("u1", "a:b", &item("3"));
        w.put_item("u2", "a", &item("4"));
        store.commit(w).await.unwrap();
        let names: Vec<String> = store
            .nodes("u1")
            .unwrap()
            .into_iter()
            .map(|n| n.node)
            .collect();
        assert_eq!(names, ["a", "a:b"]);
        let ids: Vec<String> = store
            .items("u1", "a")
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(ids, ["1", "2"]);
        let mut w = Writes::default();
        w.delete_item("u1", "a", "1");
        w.delete_node("u1", "a:b");
        w.delete_item("u1", "a:b", "3");
        store.commit(w).await.unwrap();
        let ids: Vec<String> = store
            .items("u1", "a")
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(ids, ["2"]);
        assert!(store.node("u1", "a:b").unwrap().is_none());
        assert_eq!(store.items("u2", "a").unwrap().len(), 1);
    }
}
