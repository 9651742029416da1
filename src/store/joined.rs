//! Backend users in rooms hosted elsewhere ([`crate::services::joined`]): one
//! record per (room, local user), so an occupancy survives our restarts and is
//! rejoined.
//!
//! Keys: `T_JOINED room\0user-id` -> [`Occupancy`] (JSON). The room is a bare JID,
//! lower case.

use serde::{Deserialize, Serialize};

use super::{Op, Store, StoreError, Writes, json, key, parse};

const T_JOINED: u8 = b'J';

/// A local user's place in a remote room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Occupancy {
    /// The room's bare JID.
    pub room: String,
    /// The local user's id.
    pub user_id: String,
    /// The local user's bare JID.
    pub user_jid: String,
    /// The nick asked for (the room may have given another: `nick` follows it).
    pub nick: String,
    /// When the backend asked to join (unix ms).
    pub since_ms: u64,
    /// The newest message from the room we have seen (unix ms, the room's clock
    /// where it said): a rejoin asks for history since then.
    pub seen_ms: u64,
    /// The room's subject as we last saw it.
    #[serde(default)]
    pub subject: String,
    /// A MIX channel (XEP-0369) rather than a MUC room: we joined it as the
    /// user's server (XEP-0405), from the bare JID.
    #[serde(default)]
    pub mix: bool,
    /// A MIX channel's stable id for the user.
    #[serde(default)]
    pub participant_id: String,
}

fn joined_key(room: &str, user_id: &str) -> Vec<u8> {
    let mut k = key(T_JOINED, room.as_bytes());
    k.push(0);
    k.extend_from_slice(user_id.as_bytes());
    k
}

impl Writes {
    /// Create or replace an occupancy.
    pub fn put_occupancy(&mut self, o: &Occupancy) {
        self.ops
            .push(Op::Put(joined_key(&o.room, &o.user_id), json(o)));
    }

    /// A local user left a remote room (or was refused, kicked, banned).
    pub fn delete_occupancy(&mut self, room: &str, user_id: &str) {
        self.ops.push(Op::Delete(joined_key(room, user_id)));
    }
}

impl Store {
    /// Every local user's occupancy of a remote room.
    pub fn occupancies(&self) -> Result<Vec<Occupancy>, StoreError> {
        self.kv
            .range(&[T_JOINED], &[T_JOINED + 1], usize::MAX)?
            .iter()
            .map(|(_, v)| parse(v))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn occupancies_are_kept_and_removed() {
        let store = Store::open(crate::store::memory_kv().unwrap(), "example.org").unwrap();
        let o = |room: &str, user: &str| Occupancy {
            room: room.into(),
            user_id: user.into(),
            user_jid: format!("{user}@example.org"),
            nick: user.into(),
            since_ms: 1,
            seen_ms: 2,
            subject: String::new(),
            mix: false,
            participant_id: String::new(),
        };
        let mut w = Writes::default();
        w.put_occupancy(&o("a@muc.example.net", "u1"));
        w.put_occupancy(&o("a@muc.example.net", "u2"));
        w.put_occupancy(&o("b@muc.example.net", "u1"));
        store.commit(w).await.unwrap();
        assert_eq!(store.occupancies().unwrap().len(), 3);
        let mut w = Writes::default();
        w.delete_occupancy("a@muc.example.net", "u1");
        store.commit(w).await.unwrap();
        let left: Vec<(String, String)> = store
            .occupancies()
            .unwrap()
            .into_iter()
            .map(|o| (o.room, o.user_id))
            .collect();
        assert_eq!(
            left,
            vec![
                ("a@muc.example.net".into(), "u2".into()),
                ("b@muc.example.net".into(), "u1".into())
            ]
        );
    }
}
