//! The registry of live calls: each call's command channel under its id (the Twilio call SID,
//! the Vocode conversation id, or a generated one), so the server can answer questions about a
//! call (its history) from outside the call's own connection. Entries remove themselves when the
//! call's actor ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::call::CallCommand;

#[derive(Clone, Default)]
pub struct CallRegistry {
    /// Only ever locked for a map operation; never held across an await.
    calls: Arc<Mutex<HashMap<String, mpsc::Sender<CallCommand>>>>,
    next: Arc<AtomicU64>,
}

/// Removes its call from the registry when dropped.
pub struct Registration {
    registry: CallRegistry,
    id: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry
            .calls
            .lock()
            .expect("registry lock")
            .remove(&self.id);
    }
}

impl CallRegistry {
    /// Registers a call under `id`, or a generated id when none is given or it is taken.
    pub fn register(
        &self,
        id: Option<String>,
        commands: mpsc::Sender<CallCommand>,
    ) -> (String, Registration) {
        let mut calls = self.calls.lock().expect("registry lock");
        let id = match id.filter(|i| !i.is_empty() && !calls.contains_key(i)) {
            Some(id) => id,
            None => format!("call-{}", self.next.fetch_add(1, Ordering::Relaxed) + 1),
        };
        calls.insert(id.clone(), commands);
        (
            id.clone(),
            Registration {
                registry: self.clone(),
                id,
            },
        )
    }

    pub fn get(&self, id: &str) -> Option<mpsc::Sender<CallCommand>> {
        self.calls.lock().expect("registry lock").get(id).cloned()
    }

    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .calls
            .lock()
            .expect("registry lock")
            .keys()
            .cloned()
            .collect();
        ids.sort();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_entries_leave_with_their_registration() {
        let r = CallRegistry::default();
        let (tx, _rx) = mpsc::channel(1);
        let (a, ga) = r.register(Some("CA1".into()), tx.clone());
        let (b, gb) = r.register(Some("CA1".into()), tx.clone());
        let (c, _gc) = r.register(None, tx);
        assert_eq!(a, "CA1");
        assert_ne!(b, a);
        assert!(c.starts_with("call-"));
        assert_eq!(r.ids().len(), 3);
        drop(ga);
        assert!(r.get("CA1").is_none());
        drop(gb);
        assert_eq!(r.ids(), vec![c]);
    }
}
