//! Reloading the configuration (SIGHUP, `systemctl reload`): the netdevs the configuration
//! created are brought in line with the file as it is now. Netdevs added over QMP are left alone.

use super::Daemon;
use crate::{fd::NoFds, netdev::Netdev};

/// What a reload changes, in order: removals (newest first), then additions (in file order).
#[derive(Debug, Default, PartialEq)]
pub struct ReloadSteps {
    pub remove: Vec<String>,
    pub add: Vec<Netdev>,
}

/// Compares the configured netdevs before and after a reload with what exists (`current`, in
/// creation order): one gone from the file is removed, one changed is removed and created again,
/// one new is created, one unchanged is kept (with its link state and its traffic).
#[must_use]
pub fn reload_steps(previous: &[Netdev], current: &[Netdev], next: &[Netdev]) -> ReloadSteps {
    let configured = |id: &str| previous.iter().any(|n| n.id == id);
    let wanted = |netdev: &Netdev| next.iter().find(|n| n.id == netdev.id);
    let mut steps = ReloadSteps::default();
    for netdev in current.iter().rev().filter(|n| configured(&n.id)) {
        if wanted(netdev).is_none_or(|n| n != netdev) {
            steps.remove.push(netdev.id.clone());
        }
    }
    for netdev in next {
        let existing = current.iter().find(|n| n.id == netdev.id);
        let replaced = steps.remove.contains(&netdev.id);
        if existing.is_none() || replaced {
            steps.add.push(netdev.clone());
        }
    }
    steps
}

/// What a reload did, for the log and the service manager's status line.
#[derive(Debug, Default)]
pub struct ReloadOutcome {
    pub removed: usize,
    pub added: usize,
    pub failed: Vec<String>,
}

impl Daemon {
    /// Applies [`reload_steps`]; a netdev that cannot be removed or created is reported and the
    /// others go on.
    pub async fn reload_netdevs(&self, previous: &[Netdev], next: &[Netdev]) -> ReloadOutcome {
        let current: Vec<Netdev> = {
            let state = self.state.lock().await;
            state.registry.entries().map(|e| e.netdev.clone()).collect()
        };
        let steps = reload_steps(previous, &current, next);
        let mut outcome = ReloadOutcome::default();
        for id in &steps.remove {
            match self.remove_netdev(id).await {
                Ok(()) => outcome.removed += 1,
                Err(error) => outcome.failed.push(format!("netdev_del {id}: {error}")),
            }
        }
        for netdev in steps.add {
            let id = netdev.id.clone();
            match self.add_netdev(netdev, &mut NoFds).await {
                Ok(()) => outcome.added += 1,
                Err(error) => outcome.failed.push(format!("netdev_add {id}: {error}")),
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hubport(id: &str, hubid: i32) -> Netdev {
        Netdev::from_keyval(&format!("hubport,id={id},hubid={hubid}")).expect("valid keyval")
    }

    #[test]
    fn kept_changed_gone_and_new() {
        let previous = [hubport("keep", 0), hubport("change", 0), hubport("gone", 0)];
        let from_qmp = hubport("qmp", 5);
        let current = [previous[0].clone(), previous[1].clone(), previous[2].clone(), from_qmp];
        let next = [hubport("keep", 0), hubport("change", 1), hubport("new", 2)];
        let steps = reload_steps(&previous, &current, &next);
        assert_eq!(steps.remove, ["gone", "change"]);
        assert_eq!(steps.add, [hubport("change", 1), hubport("new", 2)]);
    }

    #[test]
    fn unchanged_file_changes_nothing() {
        let previous = [hubport("a", 0), hubport("b", 0)];
        assert_eq!(reload_steps(&previous, &previous, &previous), ReloadSteps::default());
    }

    #[test]
    fn configured_netdev_deleted_over_qmp_comes_back() {
        let previous = [hubport("a", 0)];
        let steps = reload_steps(&previous, &[], &previous);
        assert!(steps.remove.is_empty());
        assert_eq!(steps.add, previous);
    }

    #[test]
    fn netdev_from_qmp_is_not_replaced() {
        // The file now names an id a QMP client took: the client's netdev stays as it is.
        let current = [hubport("x", 9)];
        let steps = reload_steps(&[], &current, &[hubport("x", 0)]);
        assert_eq!(steps, ReloadSteps::default());
    }
}
