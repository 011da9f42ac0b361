//! `user`: user-mode networking (QEMU's slirp): DHCP, DNS, NAT, forwards.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::qapi::QapiString;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct UserOptions {
    pub hostname: Option<String>,
    pub restrict: Option<bool>,
    pub ipv4: Option<bool>,
    pub ipv6: Option<bool>,
    pub ip: Option<String>,
    pub net: Option<String>,
    pub host: Option<String>,
    pub tftp: Option<String>,
    pub bootfile: Option<String>,
    pub dhcpstart: Option<String>,
    pub dns: Option<String>,
    pub dnssearch: Option<Vec<QapiString>>,
    pub domainname: Option<String>,
    pub ipv6_prefix: Option<String>,
    pub ipv6_prefixlen: Option<i64>,
    pub ipv6_host: Option<String>,
    pub ipv6_dns: Option<String>,
    pub smb: Option<String>,
    pub smbserver: Option<String>,
    pub hostfwd: Option<Vec<QapiString>>,
    pub guestfwd: Option<Vec<QapiString>>,
    pub tftp_server_name: Option<String>,
    /// Extension (not in QEMU): the MTU and MRU of the stack's guest-facing interface, as
    /// slirp4netns' `--mtu` (libslirp's default, and QEMU's, is 1500).
    #[serde(rename = "x-mtu")]
    pub x_mtu: Option<u32>,
}

/// The range of `x-mtu`: IPv4's minimum datagram to libslirp's largest interface MTU.
pub const MTU_RANGE: std::ops::RangeInclusive<u32> = 576..=65520;

/// The guest-visible addresses, derived as `net/slirp.c: net_slirp_init` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressPlan {
    pub ipv4: bool,
    pub ipv6: bool,
    pub net: Ipv4Addr,
    pub mask: Ipv4Addr,
    pub host: Ipv4Addr,
    pub dhcp_start: Ipv4Addr,
    pub dns: Ipv4Addr,
    pub smb: Ipv4Addr,
    pub ipv6_prefix: Ipv6Addr,
    pub ipv6_prefixlen: u8,
    pub ipv6_host: Ipv6Addr,
    pub ipv6_dns: Ipv6Addr,
}

const MAX_NAME_LEN: usize = 255;

impl UserOptions {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(mtu) = self.x_mtu
            && !MTU_RANGE.contains(&mtu)
        {
            return Err(format!("'x-mtu' must be between {} and {}", MTU_RANGE.start(), MTU_RANGE.end()));
        }
        if let Some(dir) = &self.smb {
            check_smb_dir_text(dir)?;
        }
        self.address_plan().map(|_| ())
    }

    /// QEMU's `ipv4`/`ipv6` selection: naming one of them `on` alone turns the other off.
    #[must_use]
    pub fn families(&self) -> (bool, bool) {
        let ipv4 = !(self.ipv6 == Some(true) && self.ipv4.is_none()) && self.ipv4 != Some(false);
        let ipv6 = !(self.ipv4 == Some(true) && self.ipv6.is_none()) && self.ipv6 != Some(false);
        (ipv4, ipv6)
    }

    /// Derives and checks every address, with QEMU's messages in QEMU's order.
    pub fn address_plan(&self) -> Result<AddressPlan, String> {
        let (ipv4, ipv6) = self.families();
        let network = match (&self.net, &self.ip) {
            (Some(net), _) => Some(net.clone()),
            (None, Some(ip)) => Some(format!("{ip}/24")),
            (None, None) => None,
        };
        if !ipv4 && (network.is_some() || self.host.is_some() || self.dns.is_some()) {
            return Err("IPv4 disabled but netmask/host/dns provided".to_owned());
        }
        if !ipv6 && (self.ipv6_prefix.is_some() || self.ipv6_host.is_some() || self.ipv6_dns.is_some()) {
            return Err("IPv6 disabled but prefix/host6/dns6 provided".to_owned());
        }
        if !ipv4 && !ipv6 {
            return Err("IPv4 and IPv6 disabled".to_owned());
        }

        let (mut net, mut mask) = (u32::from(Ipv4Addr::new(10, 0, 2, 0)), u32::from(Ipv4Addr::new(255, 255, 255, 0)));
        if let Some(network) = &network {
            (net, mask) = parse_network(network)?;
        }
        let derive = |low: u32| net | (low & !mask);
        let mut host = derive(0x0202);
        let mut dhcp = derive(0x020f);
        let mut dns = derive(0x0203);
        let mut smb = derive(0x0204);

        if let Some(text) = &self.host {
            host = parse_v4(text).ok_or("Failed to parse host")?;
        }
        if host & mask != net {
            return Err("Host doesn't belong to network".to_owned());
        }
        if let Some(text) = &self.dns {
            dns = parse_v4(text).ok_or("Failed to parse DNS")?;
        }
        if self.restrict == Some(true) && dns & mask != net {
            return Err("DNS doesn't belong to network".to_owned());
        }
        if dns == host {
            return Err("DNS must be different from host".to_owned());
        }
        if let Some(text) = &self.dhcpstart {
            dhcp = parse_v4(text).ok_or("Failed to parse DHCP start address")?;
        }
        if dhcp & mask != net {
            return Err("DHCP doesn't belong to network".to_owned());
        }
        if dhcp == host || dhcp == dns {
            return Err("DHCP must be different from host and DNS".to_owned());
        }
        if let Some(text) = &self.smbserver {
            smb = parse_v4(text).ok_or("Failed to parse SMB address")?;
        }

        let prefix = match &self.ipv6_prefix {
            Some(text) => text.parse::<Ipv6Addr>().map_err(|_| "Failed to parse IPv6 prefix")?,
            None => Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0),
        };
        let prefixlen = self.ipv6_prefixlen.unwrap_or(64);
        let prefixlen = u8::try_from(prefixlen)
            .ok()
            .filter(|len| *len <= 126)
            .ok_or("Invalid IPv6 prefix provided (IPv6 prefix length must be between 0 and 126)")?;
        let in_prefix = |addr: Ipv6Addr| v6_network(addr, prefixlen) == v6_network(prefix, prefixlen);
        let with_suffix = |suffix: u128| Ipv6Addr::from(u128::from(v6_network(prefix, prefixlen)) | suffix);
        let ipv6_host = match &self.ipv6_host {
            Some(text) => text.parse().map_err(|_| "Failed to parse IPv6 host")?,
            None => with_suffix(2),
        };
        if !in_prefix(ipv6_host) {
            return Err("IPv6 Host doesn't belong to network".to_owned());
        }
        let ipv6_dns = match &self.ipv6_dns {
            Some(text) => text.parse().map_err(|_| "Failed to parse IPv6 DNS")?,
            None => with_suffix(3),
        };
        if !in_prefix(ipv6_dns) {
            return Err("IPv6 DNS doesn't belong to network".to_owned());
        }

        if let Some(domain) = &self.domainname {
            if domain.is_empty() {
                return Err("'domainname' parameter cannot be empty".to_owned());
            }
            if domain.len() > MAX_NAME_LEN {
                return Err("'domainname' parameter cannot exceed 255 bytes".to_owned());
            }
        }
        if self.hostname.as_ref().is_some_and(|h| h.len() > MAX_NAME_LEN) {
            return Err("'vhostname' parameter cannot exceed 255 bytes".to_owned());
        }
        if self.tftp_server_name.as_ref().is_some_and(|h| h.len() > MAX_NAME_LEN) {
            return Err("'tftp-server-name' parameter cannot exceed 255 bytes".to_owned());
        }

        Ok(AddressPlan {
            ipv4,
            ipv6,
            net: net.into(),
            mask: mask.into(),
            host: host.into(),
            dhcp_start: dhcp.into(),
            dns: dns.into(),
            smb: smb.into(),
            ipv6_prefix: prefix,
            ipv6_prefixlen: prefixlen,
            ipv6_host,
            ipv6_dns,
        })
    }
}

impl UserOptions {
    /// The unicast MACs libslirp answers from: `52:55` and the IPv4 address of the gateway, the
    /// DNS server, the SMB server and each `guestfwd` address (ARP replies and IPv4 frames), and
    /// `52:56` and the last four bytes of the IPv6 gateway and DNS server (neighbour
    /// advertisements and IPv6 frames). libslirp takes any TCP segment as addressed to itself and
    /// resets what it has no socket for, so its port must only see these (and group frames).
    /// `None` when an address cannot be told (a `guestfwd` server in a form only `inet_aton`
    /// reads): the port then takes all unicast, as a QEMU hub gives it.
    #[must_use]
    pub fn stack_macs(&self) -> Option<Vec<[u8; 6]>> {
        let plan = self.address_plan().ok()?;
        let default_fwd = u32::from(plan.net) | (0x0204 & !u32::from(plan.mask));
        let mut ipv4 = vec![plan.host, plan.dns];
        if self.smb.is_some() {
            ipv4.push(plan.smb);
        }
        for rule in self.guestfwd.iter().flatten() {
            // `[tcp]:[server]:port-device`: the server is the second field.
            let server = rule.str.split('-').next()?.split(':').nth(1)?;
            ipv4.push(if server.is_empty() { default_fwd.into() } else { server.parse().ok()? });
        }
        let mut macs: Vec<[u8; 6]> = Vec::new();
        let mut add = |mac: [u8; 6]| {
            if !macs.contains(&mac) {
                macs.push(mac);
            }
        };
        if plan.ipv4 {
            for addr in ipv4 {
                let [a, b, c, d] = addr.octets();
                add([0x52, 0x55, a, b, c, d]);
            }
        }
        if plan.ipv6 {
            for addr in [plan.ipv6_host, plan.ipv6_dns] {
                let [.., a, b, c, d] = addr.octets();
                add([0x52, 0x56, a, b, c, d]);
            }
        }
        Some(macs)
    }
}

/// `smb=DIR` is written into smb.conf as `path=DIR`: a line end would start a line of its own
/// (`[root]`, `path=/`: a share of the whole file system), brackets a section, `%` one of
/// Samba's substitutions. None of them may appear.
fn check_smb_dir_text(dir: &str) -> Result<(), String> {
    match dir.chars().find(|c| c.is_control() || matches!(c, '[' | ']' | '%')) {
        Some(bad) => Err(format!(
            "Invalid shared directory '{}': it must not contain control characters, '[', ']' or '%' (found {bad:?})",
            dir.escape_default()
        )),
        None => Ok(()),
    }
}

fn parse_v4(text: &str) -> Option<u32> {
    text.parse::<Ipv4Addr>().ok().map(u32::from)
}

fn v6_network(addr: Ipv6Addr, prefixlen: u8) -> Ipv6Addr {
    let mask = if prefixlen == 0 { 0 } else { u128::MAX << (128 - u32::from(prefixlen)) };
    Ipv6Addr::from(u128::from(addr) & mask)
}

/// `addr[/prefixlen|/netmask]`; without a mask QEMU derives a classful one.
fn parse_network(text: &str) -> Result<(u32, u32), String> {
    let (addr, mask) = match text.split_once('/') {
        None => {
            let addr = parse_v4(text).ok_or("Failed to parse netmask")?;
            (addr, classful_mask(addr))
        }
        Some((addr, mask)) => {
            let addr = parse_v4(addr).ok_or("Failed to parse netmask")?;
            // QEMU reads a prefix length when `strtol` takes the whole text (a sign, then digits;
            // an empty text reads as 0), and a dotted mask otherwise.
            let digits = mask.strip_prefix(['+', '-']).unwrap_or(mask);
            let mask = if digits.bytes().all(|b| b.is_ascii_digit()) && (digits.len() == mask.len() || !digits.is_empty()) {
                let bits = mask
                    .parse::<i64>()
                    .ok()
                    .filter(|bits| (4..=32).contains(bits))
                    .ok_or("Invalid netmask provided (must be in range 4-32)")?;
                u32::MAX << (32 - bits)
            } else {
                parse_v4(mask).ok_or("Failed to parse netmask (trailing chars)")?
            };
            (addr, mask)
        }
    };
    Ok((addr & mask, mask))
}

/// QEMU's classful guess for `net=A` without a mask (its "class C" and "multicast" labels are
/// swapped in the source; this reproduces what the code does).
fn classful_mask(addr: u32) -> u32 {
    let prefix = if addr & 0x8000_0000 == 0 {
        8
    } else if addr & 0xfff0_0000 == 0xac10_0000 {
        12
    } else if addr & 0xc000_0000 == 0x8000_0000 || addr & 0xffff_0000 == 0xc0a8_0000 {
        16
    } else if addr & 0xffff_0000 == 0xc612_0000 {
        // Only 198.18.x.x is tested for, though the mask is /15.
        15
    } else if addr & 0xe000_0000 == 0xe000_0000 {
        24
    } else {
        28
    };
    u32::MAX << (32 - prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(json: serde_json::Value) -> UserOptions {
        serde_json::from_value(json).expect("valid options")
    }

    #[test]
    fn stack_macs_are_libslirps_hosts() {
        let macs = options(serde_json::json!({})).stack_macs().expect("default addresses");
        assert_eq!(
            macs,
            [
                [0x52, 0x55, 10, 0, 2, 2],
                [0x52, 0x55, 10, 0, 2, 3],
                [0x52, 0x56, 0, 0, 0, 2],
                [0x52, 0x56, 0, 0, 0, 3],
            ]
        );
        let macs = options(serde_json::json!({
            "net": "192.168.7.0/24", "ipv6": false, "smb": "/srv",
            "guestfwd": [{"str": "tcp:192.168.7.100:80-cmd:cat"}, {"str": "::81-tcp:127.0.0.1:81"}]
        }))
        .stack_macs()
        .expect("addresses");
        assert_eq!(
            macs,
            [
                [0x52, 0x55, 192, 168, 7, 2],
                [0x52, 0x55, 192, 168, 7, 3],
                [0x52, 0x55, 192, 168, 7, 4],
                [0x52, 0x55, 192, 168, 7, 100],
            ],
            "the default guestfwd server is the SMB address, listed once"
        );
    }

    #[test]
    fn smb_directories_that_would_rewrite_smb_conf_are_refused() {
        for dir in ["/srv\n[root]\npath=/", "/srv\r", "/srv/[x]", "/srv/]", "/srv/%H", "/srv\0x", "/srv\u{7f}"] {
            let err = options(serde_json::json!({"smb": dir})).validate().expect_err(dir);
            assert!(err.starts_with("Invalid shared directory '"), "{err}");
            assert!(!err.contains('\n'), "the message itself stays on one line: {err}");
        }
        for dir in ["/srv/share", "/srv/with space", "/srv/ünïcode", "relative/dir"] {
            options(serde_json::json!({"smb": dir})).validate().expect(dir);
        }
    }

    #[test]
    fn an_address_only_inet_aton_reads_leaves_unicast_open() {
        let user = options(serde_json::json!({"guestfwd": [{"str": "tcp:10.2:80-cmd:cat"}]}));
        assert_eq!(user.stack_macs(), None);
    }
}
