//! Our own iq requests waiting for their answers, by id.
//!
//! One mechanism for everything that asks (remote lookups for the API, the `check`
//! tool, tests): register the id before the request leaves, get the answer (a
//! result or an error) once, and forget the id when the waiter goes away, whether
//! it was answered or timed out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::stanza::Stanza;

/// Pending iq requests.
#[derive(Debug, Default)]
pub struct IqTracker {
    waiting: Arc<Mutex<HashMap<String, oneshot::Sender<Stanza>>>>,
}

/// A registered request: await [`Waiting::answer`]; dropping it forgets the id.
#[derive(Debug)]
pub struct Waiting {
    id: String,
    rx: Option<oneshot::Receiver<Stanza>>,
    waiting: Arc<Mutex<HashMap<String, oneshot::Sender<Stanza>>>>,
}

impl Waiting {
    /// The answer; `None` if the tracker went away.
    pub async fn answer(&mut self) -> Option<Stanza> {
        match self.rx.take() {
            Some(rx) => rx.await.ok(),
            None => None,
        }
    }

    /// The id registered.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

impl IqTracker {
    /// Wait for the answer to the request with `id` (send it after this).
    pub fn expect(&self, id: &str) -> Waiting {
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), tx);
        Waiting {
            id: id.to_string(),
            rx: Some(rx),
            waiting: self.waiting.clone(),
        }
    }

    /// Hand an iq result or error to whoever waits for its id; gives it back if
    /// nobody does.
    pub fn answer(&self, stanza: Stanza) -> Option<Stanza> {
        let Some(id) = stanza.id.as_deref() else {
            return Some(stanza);
        };
        let waiter = self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        match waiter {
            Some(tx) => tx.send(stanza).err(),
            None => Some(stanza),
        }
    }

    /// Give up every request waiting (at shutdown): each waiter's answer is
    /// `None` at once.
    pub fn cancel_all(&self) {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// How many requests wait.
    pub fn len(&self) -> usize {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cancelling_ends_every_wait_at_once_and_later_answers_find_nobody() {
        let t = IqTracker::default();
        let mut a = t.expect("a");
        let b = t.expect("b");
        assert_eq!(t.len(), 2);
        t.cancel_all();
        assert!(t.is_empty());
        assert!(a.answer().await.is_none());
        let late = Stanza::parse("<iq type='result' id='b' from='x.test' to='y.test'/>").unwrap();
        assert!(t.answer(late).is_some(), "nobody waits any more");
        drop(b);
    }
}
