//! `tap`: a Linux tap interface, created by name or passed in as open fds.

use serde::{Deserialize, Serialize};

use crate::qapi::Size;

/// QEMU's compiled-in defaults on Debian.
pub const DEFAULT_SCRIPT: &str = "/etc/qemu-ifup";
pub const DEFAULT_DOWNSCRIPT: &str = "/etc/qemu-ifdown";
pub const DEFAULT_BRIDGE: &str = "br0";
pub const DEFAULT_HELPER: &str = "/usr/lib/qemu/qemu-bridge-helper";
/// `IFNAMSIZ - 1`.
pub const MAX_IFNAME_LEN: usize = 15;
/// QEMU's `MAX_TAP_QUEUES`.
pub const MAX_QUEUES: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TapOptions {
    pub ifname: Option<String>,
    pub fd: Option<String>,
    /// Colon-separated fds, one per queue.
    pub fds: Option<String>,
    pub script: Option<String>,
    pub downscript: Option<String>,
    pub br: Option<String>,
    pub helper: Option<String>,
    pub sndbuf: Option<Size>,
    #[serde(rename = "vnet_hdr")]
    pub vnet_hdr: Option<bool>,
    pub vhost: Option<bool>,
    pub vhostfd: Option<String>,
    pub vhostfds: Option<String>,
    pub vhostforce: Option<bool>,
    pub queues: Option<u32>,
    pub poll_us: Option<u32>,
}

impl TapOptions {
    /// The option conflicts of `net/tap.c: net_init_tap`, with its messages.
    pub fn validate(&self) -> Result<(), String> {
        // Each way of getting the tap (fd=, fds=, helper=) excludes the options of the others.
        let setup_options = [
            self.ifname.is_some(),
            self.script.is_some(),
            self.downscript.is_some(),
            self.vnet_hdr.is_some(),
            self.queues.is_some(),
        ];
        let any_setup = setup_options.contains(&true);
        if self.fd.is_some() {
            if any_setup || self.helper.is_some() || self.fds.is_some() || self.vhostfds.is_some() {
                return Err("ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, fds=, and vhostfds= are invalid with fd=".to_owned());
            }
        } else if let Some(fds) = &self.fds {
            if any_setup || self.helper.is_some() || self.vhostfd.is_some() {
                return Err("ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, and vhostfd= are invalid with fds=".to_owned());
            }
            let count = split_fds(fds).len();
            if count > MAX_QUEUES {
                return Err(format!("The number of fds passed is greater than {MAX_QUEUES}"));
            }
            if let Some(vhostfds) = &self.vhostfds
                && split_fds(vhostfds).len() != count
            {
                return Err("The number of fds passed does not match the number of vhostfds passed".to_owned());
            }
        } else if self.helper.is_some() {
            if any_setup || self.vhostfds.is_some() {
                return Err("ifname=, script=, downscript=, vnet_hdr=, queues=, and vhostfds= are invalid with helper=".to_owned());
            }
        } else {
            if self.vhostfds.is_some() {
                return Err("vhostfds= is invalid if fds= wasn't specified".to_owned());
            }
            if let Some(ifname) = &self.ifname {
                check_ifname(ifname)?;
            }
            if let Some(queues) = self.queues
                && (queues == 0 || queues as usize > MAX_QUEUES)
            {
                return Err(format!("Invalid number of queues {queues}: must be from 1 to {MAX_QUEUES}"));
            }
        }
        if self.vhost == Some(false) && (self.vhostfd.is_some() || self.vhostfds.is_some()) {
            return Err("vhostfd(s)= is not valid without vhost".to_owned());
        }
        Ok(())
    }

    /// `script`, where `""` and `"no"` mean none.
    #[must_use]
    pub fn script(&self) -> Option<&str> {
        script_or_default(self.script.as_deref(), DEFAULT_SCRIPT)
    }

    #[must_use]
    pub fn downscript(&self) -> Option<&str> {
        script_or_default(self.downscript.as_deref(), DEFAULT_DOWNSCRIPT)
    }
}

fn script_or_default<'a>(value: Option<&'a str>, default: &'a str) -> Option<&'a str> {
    match value {
        None => Some(default),
        Some("" | "no") => None,
        Some(script) => Some(script),
    }
}

/// `fds=a:b:c` → `["a", "b", "c"]`.
#[must_use]
pub fn split_fds(fds: &str) -> Vec<&str> {
    fds.split(':').collect()
}

/// A Linux interface name: 1 to 15 bytes, no `/`, no whitespace, not `.` or `..`.
pub fn check_ifname(name: &str) -> Result<(), String> {
    if name.len() > MAX_IFNAME_LEN {
        return Err(format!("interface name '{name}' is longer than {MAX_IFNAME_LEN} bytes"));
    }
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', ':']) || name.chars().any(char::is_whitespace) {
        return Err(format!("interface name '{name}' is not a valid Linux interface name"));
    }
    Ok(())
}
