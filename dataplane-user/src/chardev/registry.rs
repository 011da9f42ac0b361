//! The chardevs that exist, by id, with the netdev that uses each (QEMU's "frontend").

use std::{collections::BTreeMap, sync::Arc};

use serde::Serialize;

use super::{ChardevAddress, ChardevError, ChardevSpec, SocketChardev};

/// A row of `query-chardev` (`ChardevInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ChardevInfo {
    pub label: String,
    pub filename: String,
    /// Whether a netdev uses the chardev.
    pub frontend_open: bool,
}

struct Entry {
    spec: ChardevSpec,
    chardev: Arc<SocketChardev>,
    /// The netdev that uses it.
    user: Option<String>,
}

/// Chardevs in creation order.
#[derive(Default)]
pub struct Chardevs {
    entries: BTreeMap<u64, Entry>,
    next: u64,
}

impl Chardevs {
    fn entry(&self, id: &str) -> Option<&Entry> {
        self.entries.values().find(|e| e.chardev.id == id)
    }

    fn seq(&self, id: &str) -> Option<u64> {
        self.entries.iter().find(|(_, e)| e.chardev.id == id).map(|(seq, _)| *seq)
    }

    #[must_use]
    pub fn get(&self, id: &str) -> Option<&Arc<SocketChardev>> {
        self.entry(id).map(|e| &e.chardev)
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `chardev-add`'s first check, before anything is opened.
    pub fn check_add(&self, id: &str) -> Result<(), ChardevError> {
        match self.entry(id) {
            Some(_) => Err(ChardevError::Duplicate { id: id.to_owned() }),
            None => Ok(()),
        }
    }

    /// Keeps an opened chardev.
    pub fn insert(&mut self, spec: ChardevSpec, chardev: SocketChardev) -> Result<(), ChardevError> {
        self.check_add(&chardev.id)?;
        self.entries.insert(self.next, Entry { spec, chardev: Arc::new(chardev), user: None });
        self.next += 1;
        Ok(())
    }

    /// `chardev-remove`: refused while a netdev uses it. Its socket closes (and a server's file
    /// goes) when the last holder of the returned chardev drops it.
    pub fn remove(&mut self, id: &str) -> Result<Arc<SocketChardev>, ChardevError> {
        let seq = self.seq(id).ok_or_else(|| ChardevError::NotFound { id: id.to_owned() })?;
        if self.entries.get(&seq).is_some_and(|e| e.user.is_some()) {
            return Err(ChardevError::Busy { id: id.to_owned() });
        }
        self.entries.remove(&seq).map(|e| e.chardev).ok_or_else(|| ChardevError::NotFound { id: id.to_owned() })
    }

    /// `query-chardev`.
    #[must_use]
    pub fn query(&self) -> Vec<ChardevInfo> {
        self.entries
            .values()
            .map(|e| ChardevInfo {
                label: e.chardev.id.clone(),
                filename: e.chardev.filename(),
                frontend_open: e.user.is_some(),
            })
            .collect()
    }

    /// The chardev a `vhost-user` netdev names, checked as QEMU's `net_vhost_claim_chardev`
    /// (every socket chardev reconnects; only a `unix` address passes descriptors) and free.
    pub fn for_vhost_user(&self, chardev: &str) -> Result<Arc<SocketChardev>, ChardevError> {
        let entry = self.entry(chardev).ok_or_else(|| ChardevError::VhostUserNotFound { chardev: chardev.to_owned() })?;
        if !matches!(entry.chardev.address, ChardevAddress::Unix { .. }) {
            return Err(ChardevError::NoFdPassing { chardev: chardev.to_owned() });
        }
        if entry.user.is_some() {
            return Err(ChardevError::InUse { chardev: chardev.to_owned() });
        }
        Ok(Arc::clone(&entry.chardev))
    }

    /// Marks `chardev` as used by `netdev` (after [`Self::for_vhost_user`], checked again: the
    /// chardev may have gone meanwhile).
    pub fn claim(&mut self, chardev: &str, netdev: &str) -> Result<Arc<SocketChardev>, ChardevError> {
        let found = self.for_vhost_user(chardev)?;
        if let Some(seq) = self.seq(chardev)
            && let Some(entry) = self.entries.get_mut(&seq)
        {
            entry.user = Some(netdev.to_owned());
        }
        Ok(found)
    }

    /// The chardev `netdev` used is free again.
    pub fn release(&mut self, netdev: &str) {
        for entry in self.entries.values_mut() {
            if entry.user.as_deref() == Some(netdev) {
                entry.user = None;
            }
        }
    }

    /// The netdev that uses `chardev`, if any.
    #[must_use]
    pub fn user(&self, chardev: &str) -> Option<&str> {
        self.entry(chardev).and_then(|e| e.user.as_deref())
    }

    /// Forgets every chardev (their sockets close as the last holder drops them).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// What each chardev was made from, in creation order (a reload compares these).
    pub fn specs(&self) -> impl Iterator<Item = &ChardevSpec> {
        self.entries.values().map(|e| &e.spec)
    }
}
