//! `hostfwd` and `guestfwd` rules, read the way QEMU's `net/slirp.c` reads them: C string
//! splitting with 256/128-byte buffers, `inet_aton` addresses and `strtol`-style ports, so that
//! the same rules are accepted and refused with the same texts.

use std::net::{Ipv4Addr, SocketAddrV4};

/// QEMU copies each rule into a 1024-byte buffer before parsing it.
const RULE_MAX: usize = 1023;

/// A host forwarding rule: a socket on the host whose connections or datagrams go to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFwd {
    pub udp: bool,
    /// `0.0.0.0` = every host address; port 0 = an ephemeral port.
    pub host: SocketAddrV4,
    /// `0.0.0.0` = the first DHCP address.
    pub guest: SocketAddrV4,
}

/// Where a guest forwarding rule's connections go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestTarget {
    /// `cmd:COMMAND`: libslirp runs `/bin/sh -c COMMAND` per connection, on its stdin/stdout.
    Exec(String),
    /// `tcp:HOST:PORT` or `HOST:PORT`: a TCP connection the engine opens when the rule is set up
    /// (QEMU's socket chardev in client mode).
    Tcp(String),
    /// Any other chardev spec (QEMU would open it; this daemon has no chardevs here).
    Other(String),
}

/// A guest forwarding rule: connections from the guest to `server:port` go to `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFwd {
    /// `0.0.0.0` = libslirp's default, the network's `.4`.
    pub server: Ipv4Addr,
    pub port: u16,
    pub target: GuestTarget,
}

impl GuestFwd {
    /// QEMU names the chardev of a rule after its port.
    #[must_use]
    pub fn device_name(&self) -> String {
        format!("guestfwd.tcp.{}", self.port)
    }
}

/// The rule as C sees it: cut at a NUL and at QEMU's buffer size.
#[must_use]
pub fn c_rule(rule: &str) -> &str {
    truncate(rule.split('\0').next().unwrap_or_default(), RULE_MAX)
}

/// `[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport`; the error is QEMU's whole message.
pub fn parse_hostfwd(rule: &str) -> Result<HostFwd, String> {
    let rule = c_rule(rule);
    parse_hostfwd_inner(rule).map_err(|reason| format!("Invalid host forwarding rule '{rule}' ({reason})"))
}

fn parse_hostfwd_inner(rule: &str) -> Result<HostFwd, &'static str> {
    let mut p = rule;
    let proto = get_str_sep(&mut p, ':', 255).ok_or("No : separators")?;
    let udp = match proto {
        "tcp" | "" => false,
        "udp" => true,
        _ => return Err("Bad protocol name"),
    };
    let host_addr = get_str_sep(&mut p, ':', 255).ok_or("Missing : separator")?;
    let host_addr = if host_addr.is_empty() { Ipv4Addr::UNSPECIFIED } else { inet_aton(host_addr).ok_or("Bad host address")? };
    let host_port = get_str_sep(&mut p, '-', 255).ok_or("Bad host port separator")?;
    let host_port = qemu_strtoi(host_port, 0)
        .and_then(|port| u16::try_from(port).ok())
        .ok_or("Bad host port")?;
    let guest_addr = get_str_sep(&mut p, ':', 255).ok_or("Missing guest address")?;
    let guest_addr = if guest_addr.is_empty() { Ipv4Addr::UNSPECIFIED } else { inet_aton(guest_addr).ok_or("Bad guest address")? };
    let guest_port = qemu_strtoi(p, 0)
        .and_then(|port| u16::try_from(port).ok())
        .filter(|port| *port >= 1)
        .ok_or("Bad guest port")?;
    Ok(HostFwd { udp, host: SocketAddrV4::new(host_addr, host_port), guest: SocketAddrV4::new(guest_addr, guest_port) })
}

/// `[tcp]:[server]:port-dev`; the error is QEMU's whole message.
pub fn parse_guestfwd(rule: &str) -> Result<GuestFwd, String> {
    let rule = c_rule(rule);
    parse_guestfwd_inner(rule).ok_or_else(|| format!("Invalid guest forwarding rule '{rule}'"))
}

fn parse_guestfwd_inner(rule: &str) -> Option<GuestFwd> {
    let mut p = rule;
    let proto = get_str_sep(&mut p, ':', 127)?;
    if !proto.is_empty() && proto != "tcp" {
        return None;
    }
    let server = get_str_sep(&mut p, ':', 127)?;
    let server = if server.is_empty() { Ipv4Addr::UNSPECIFIED } else { inet_aton(server)? };
    let port = get_str_sep(&mut p, '-', 127)?;
    // `int port = strtol(buf, &end, 10)`: the whole text, the long truncated to an int.
    let (value, rest) = c_strtol(port, 10)?;
    if !rest.is_empty() {
        return None;
    }
    #[expect(clippy::cast_possible_truncation, reason = "C assigns the long to an int")]
    let port = u16::try_from(value as i32).ok().filter(|port| *port >= 1)?;
    let target = if let Some(command) = p.strip_prefix("cmd:") {
        GuestTarget::Exec(command.to_owned())
    } else if let Some(addr) = p.strip_prefix("tcp:") {
        GuestTarget::Tcp(addr.to_owned())
    } else if is_host_port(p) {
        GuestTarget::Tcp(p.to_owned())
    } else {
        GuestTarget::Other(p.to_owned())
    };
    Some(GuestFwd { server, port, target })
}

/// `HOST:PORT` (a bracketed IPv6 host allowed), as opposed to another chardev spec.
fn is_host_port(text: &str) -> bool {
    text.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && (!host.contains(':') || host.starts_with('['))
            && !host.contains(['/', ','])
            && !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
    })
}

/// HMP `hostfwd_remove [tcp|udp]:[hostaddr]:hostport`: `(udp, host)`, or `None` for QEMU's
/// `invalid format`.
#[must_use]
pub fn parse_hostfwd_remove(spec: &str) -> Option<(bool, SocketAddrV4)> {
    let mut p = c_rule(spec);
    let udp = match get_str_sep(&mut p, ':', 255)? {
        "tcp" | "" => false,
        "udp" => true,
        _ => return None,
    };
    let addr = get_str_sep(&mut p, ':', 255)?;
    let addr = if addr.is_empty() { Ipv4Addr::UNSPECIFIED } else { inet_aton(addr)? };
    // `qemu_strtoi(p, NULL, 10, …)`: the whole rest, no range check (htons keeps 16 bits).
    let (value, rest) = c_strtol(p, 10)?;
    if !rest.is_empty() {
        return None;
    }
    let port = i32::try_from(value).ok()?;
    #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "htons keeps the low 16 bits")]
    let port = port as u16;
    Some((udp, SocketAddrV4::new(addr, port)))
}

/// `get_str_sep`: the text before `sep` (cut to the buffer), and `p` moves past it.
fn get_str_sep<'a>(p: &mut &'a str, sep: char, max: usize) -> Option<&'a str> {
    let (head, tail) = p.split_once(sep)?;
    *p = tail;
    Some(truncate(head, max))
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

/// `strtoll(text, &end, base)` for base 0 or 10: `None` when nothing converts, else the value
/// (clamped to the `long long` range, as `ERANGE` does) and the rest of the text.
fn c_strtol(text: &str, base: u32) -> Option<(i64, &str)> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while bytes.get(i).copied().is_some_and(is_c_space) {
        i += 1;
    }
    let negative = match bytes.get(i) {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    let mut radix = if base == 0 { 10 } else { base };
    if base == 0 && bytes.get(i) == Some(&b'0') {
        if matches!(bytes.get(i + 1), Some(b'x' | b'X')) && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit) {
            radix = 16;
            i += 2;
        } else {
            radix = 8;
        }
    }
    let start = i;
    let mut value: i128 = 0;
    while let Some(digit) = bytes.get(i).and_then(|b| char::from(*b).to_digit(radix)) {
        value = (value * i128::from(radix) + i128::from(digit)).min(i128::from(u64::MAX) + 1);
        i += 1;
    }
    if i == start {
        return None;
    }
    let value = if negative { -value } else { value };
    let value = i64::try_from(value).unwrap_or(if negative { i64::MIN } else { i64::MAX });
    Some((value, &text[i..]))
}

/// `qemu_strtoi(text, &end, base, &v)` with an end pointer: trailing text is allowed; no digits
/// or a value outside `int` is an error.
fn qemu_strtoi(text: &str, base: u32) -> Option<i32> {
    let (value, _rest) = c_strtol(text, base)?;
    i32::try_from(value).ok()
}

/// glibc's `inet_aton`: one to four parts in decimal, octal (`0…`) or hex (`0x…`), the last one
/// filling the remaining bytes; trailing whitespace ends the address.
#[must_use]
pub fn inet_aton(text: &str) -> Option<Ipv4Addr> {
    let mut parts: Vec<u32> = Vec::with_capacity(4);
    let mut rest = text;
    let last = loop {
        if !rest.as_bytes().first().is_some_and(u8::is_ascii_digit) {
            return None;
        }
        let (value, after) = c_strtol(rest, 0)?;
        let value = u32::try_from(value).ok()?;
        match after.as_bytes().first() {
            Some(b'.') => {
                if parts.len() > 2 || value > 0xff {
                    return None;
                }
                parts.push(value);
                rest = &after[1..];
            }
            None => break value,
            Some(b) if is_c_space(*b) => break value,
            Some(_) => return None,
        }
    };
    let limit = match parts.len() {
        0 => u32::MAX,
        1 => 0x00ff_ffff,
        2 => 0xffff,
        _ => 0xff,
    };
    if last > limit {
        return None;
    }
    let high = parts.iter().enumerate().fold(0u32, |acc, (i, part)| acc | (part << (24 - 8 * i)));
    Some(Ipv4Addr::from(high | last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: &str) -> Ipv4Addr {
        a.parse().unwrap()
    }

    #[test]
    fn hostfwd_accepts_qemu_forms() {
        let rule = parse_hostfwd("tcp:127.0.0.1:2222-10.0.2.15:22").unwrap();
        assert_eq!(rule, HostFwd { udp: false, host: "127.0.0.1:2222".parse().unwrap(), guest: "10.0.2.15:22".parse().unwrap() });
        let rule = parse_hostfwd("::2222-:22").unwrap();
        assert_eq!((rule.udp, rule.host, rule.guest), (false, "0.0.0.0:2222".parse().unwrap(), "0.0.0.0:22".parse().unwrap()));
        let rule = parse_hostfwd("udp::0-:53").unwrap();
        assert!(rule.udp);
        assert_eq!(rule.host.port(), 0);
        // strtol with base 0 and trailing text allowed; inet_aton's short forms.
        assert_eq!(parse_hostfwd("tcp:127.1:0x10-10.2.15:010").unwrap().host, "127.0.0.1:16".parse().unwrap());
        assert_eq!(parse_hostfwd("tcp:127.1:0x10-10.2.15:010").unwrap().guest, "10.2.0.15:8".parse().unwrap());
        assert_eq!(parse_hostfwd("tcp::22abc-:22 ").unwrap().host.port(), 22);
    }

    #[test]
    fn hostfwd_errors_are_qemus() {
        let cases = [
            ("tcp", "No : separators"),
            ("sctp::1-:2", "Bad protocol name"),
            ("unix:/tmp/s-:22", "Bad protocol name"),
            ("tcp:127.0.0.1", "Missing : separator"),
            ("tcp:300.0.0.1:1-:2", "Bad host address"),
            ("tcp:127.0.0.1:2222", "Bad host port separator"),
            ("tcp::x-:22", "Bad host port"),
            ("tcp::65536-:22", "Bad host port"),
            ("tcp::-1-:22", "Bad host port"),
            ("tcp::1-22", "Missing guest address"),
            ("tcp::1-10.0.2.x:22", "Bad guest address"),
            ("tcp::1-:0", "Bad guest port"),
            ("tcp::1-:", "Bad guest port"),
            ("tcp::1-:65536", "Bad guest port"),
        ];
        for (rule, reason) in cases {
            assert_eq!(parse_hostfwd(rule).unwrap_err(), format!("Invalid host forwarding rule '{rule}' ({reason})"), "{rule}");
        }
    }

    #[test]
    fn guestfwd_forms_and_errors() {
        let rule = parse_guestfwd("tcp:10.0.2.100:1234-tcp:127.0.0.1:4321").unwrap();
        assert_eq!(rule, GuestFwd { server: v4("10.0.2.100"), port: 1234, target: GuestTarget::Tcp("127.0.0.1:4321".into()) });
        assert_eq!(rule.device_name(), "guestfwd.tcp.1234");
        let rule = parse_guestfwd(":10.0.2.100:1234-127.0.0.1:4321").unwrap();
        assert_eq!(rule.target, GuestTarget::Tcp("127.0.0.1:4321".into()));
        let rule = parse_guestfwd("tcp::80-cmd:netcat 10.10.1.1 80").unwrap();
        assert_eq!((rule.server, rule.port), (Ipv4Addr::UNSPECIFIED, 80));
        assert_eq!(rule.target, GuestTarget::Exec("netcat 10.10.1.1 80".into()));
        assert_eq!(parse_guestfwd("tcp::80-unix:/run/x").unwrap().target, GuestTarget::Other("unix:/run/x".into()));
        for rule in [
            "tcp:10.0.2.100:1234",
            "udp:10.0.2.100:1234-cmd:true",
            "tcp:10.0.2.x:1234-cmd:true",
            "tcp:10.0.2.100:0-cmd:true",
            "tcp:10.0.2.100:12x-cmd:true",
            "tcp:10.0.2.100:65536-cmd:true",
            "nothing",
        ] {
            assert_eq!(parse_guestfwd(rule).unwrap_err(), format!("Invalid guest forwarding rule '{rule}'"), "{rule}");
        }
    }

    #[test]
    fn hostfwd_remove_forms() {
        assert_eq!(parse_hostfwd_remove("tcp:127.0.0.1:2222"), Some((false, "127.0.0.1:2222".parse().unwrap())));
        assert_eq!(parse_hostfwd_remove("udp::53"), Some((true, "0.0.0.0:53".parse().unwrap())));
        assert_eq!(parse_hostfwd_remove("::22"), Some((false, "0.0.0.0:22".parse().unwrap())));
        assert_eq!(parse_hostfwd_remove("tcp::22x"), None);
        assert_eq!(parse_hostfwd_remove("tcp:22"), None);
        assert_eq!(parse_hostfwd_remove("sctp::22"), None);
    }

    #[test]
    fn inet_aton_is_glibcs() {
        assert_eq!(inet_aton("10.0.2.15"), Some(v4("10.0.2.15")));
        assert_eq!(inet_aton("127.1"), Some(v4("127.0.0.1")));
        assert_eq!(inet_aton("0x7f.0.0.01"), Some(v4("127.0.0.1")));
        assert_eq!(inet_aton("167772687"), Some(v4("10.0.2.15")));
        assert_eq!(inet_aton("10.0.2.15 junk"), Some(v4("10.0.2.15")));
        for bad in ["", "10.0.2.256", "10..2.15", "1.2.3.4.5", "08.1.1.1", "a.b.c.d", " 1.2.3.4", "10.0.2.15x", "1.16777216"] {
            assert_eq!(inet_aton(bad), None, "{bad}");
        }
    }
}
