//! The registry of live calls: a value per call (its command channel) under its id (the Twilio
//! call SID, the Vocode conversation id, or a generated one), so the server can answer questions
//! about a call (its history) from outside the call's own connection. Entries remove themselves
//! when their registration drops. Generated ids are random (128 bits), so one call's id says
//! nothing about another's, and a client-chosen id that is already live is refused, never shared
//! or replaced. It knows nothing of calls beyond that: the value type is the caller's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RegistryError {
    #[error("a call with id {0:?} is already live; choose another id")]
    InUse(String),
}

pub(crate) struct CallRegistry<T> {
    /// Only ever locked for a map operation; never held across an await.
    calls: Arc<Mutex<HashMap<String, T>>>,
}

impl<T> Clone for CallRegistry<T> {
    fn clone(&self) -> Self {
        CallRegistry {
            calls: self.calls.clone(),
        }
    }
}

impl<T> Default for CallRegistry<T> {
    fn default() -> Self {
        CallRegistry {
            calls: Default::default(),
        }
    }
}

/// Removes its call from the registry when dropped.
pub(crate) struct Registration<T> {
    registry: CallRegistry<T>,
    id: String,
}

impl<T> Drop for Registration<T> {
    fn drop(&mut self) {
        self.registry
            .calls
            .lock()
            .expect("registry lock")
            .remove(&self.id);
    }
}

impl<T: Clone> CallRegistry<T> {
    /// Registers a call under `id`, or under a random id when none is given. A live id is
    /// refused.
    pub(crate) fn register(
        &self,
        id: Option<String>,
        value: T,
    ) -> Result<(String, Registration<T>), RegistryError> {
        let mut calls = self.calls.lock().expect("registry lock");
        let id = match id.filter(|i| !i.is_empty()) {
            Some(id) if calls.contains_key(&id) => return Err(RegistryError::InUse(id)),
            Some(id) => id,
            None => loop {
                let id = format!("call-{:032x}", rand::random::<u128>());
                if !calls.contains_key(&id) {
                    break id;
                }
            },
        };
        calls.insert(id.clone(), value);
        let registration = Registration {
            registry: self.clone(),
            id: id.clone(),
        };
        Ok((id, registration))
    }

    /// Calls live now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.calls.lock().expect("registry lock").len()
    }

    pub(crate) fn get(&self, id: &str) -> Option<T> {
        self.calls.lock().expect("registry lock").get(id).cloned()
    }

    pub(crate) fn ids(&self) -> Vec<String> {
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
    fn a_live_id_is_refused_and_entries_leave_with_their_registration() {
        let r = CallRegistry::<u8>::default();
        let tx = 7u8;
        let (a, ga) = r.register(Some("CA1".into()), tx).unwrap();
        assert_eq!(a, "CA1");
        assert_eq!(
            r.register(Some("CA1".into()), tx).err(),
            Some(RegistryError::InUse("CA1".into()))
        );
        let (c, _gc) = r.register(None, tx).unwrap();
        let (d, _gd) = r.register(Some(String::new()), tx).unwrap();
        // Generated ids are random: nothing to guess from one to the next.
        assert!(c.starts_with("call-") && c.len() == 37, "{c}");
        assert_ne!(c, d);
        assert_eq!(r.len(), 3);
        drop(ga);
        assert!(r.get("CA1").is_none());
        assert_eq!(r.len(), 2);
    }
}
