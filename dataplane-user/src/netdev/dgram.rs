//! `dgram`: one raw frame per datagram over inet (unicast or multicast), unix, or an fd.

use serde::{Deserialize, Serialize};

use super::sockaddr::{SocketAddress, UNIX_PATH_MAX};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DgramOptions {
    pub local: Option<SocketAddress>,
    pub remote: Option<SocketAddress>,
}

impl DgramOptions {
    /// The local/remote table of `qapi/net.json`, checked in the order of `net/dgram.c:
    /// net_init_dgram` (multicast first, then local presence, then the local/remote pairing, then
    /// the local type) so that each combination gets QEMU's message.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(remote) = &self.remote
            && remote.is_ipv4_multicast()
        {
            // `net_dgram_mcast_init`: `local` only gives the interface (inet) or a socket to clone (fd).
            return match &self.local {
                None | Some(SocketAddress::Fd(_)) => Ok(()),
                Some(SocketAddress::Inet(inet)) => match inet.host.parse::<std::net::Ipv4Addr>() {
                    Ok(_) => Ok(()),
                    Err(_) => Err(format!("localaddr '{}' is not a valid IPv4 address", inet.host)),
                },
                Some(_) => Err("only support inet or fd type for local".to_owned()),
            };
        }
        let Some(local) = &self.local else {
            return Err("dgram requires local= parameter".to_owned());
        };
        match &self.remote {
            Some(_) if matches!(local, SocketAddress::Fd(_)) => {
                return Err("don't set remote with local.fd".to_owned());
            }
            Some(remote) if remote.kind() != local.kind() => {
                return Err("remote and local types must be the same".to_owned());
            }
            None if !matches!(local, SocketAddress::Fd(_)) => {
                return Err("type=inet or type=unix requires remote parameter".to_owned());
            }
            _ => {}
        }
        match (local, &self.remote) {
            (SocketAddress::Inet(_) | SocketAddress::Fd(_), _) => Ok(()),
            (SocketAddress::Unix(local), Some(SocketAddress::Unix(remote))) => {
                for path in [&local.path, &remote.path] {
                    if path.len() > UNIX_PATH_MAX {
                        return Err(format!("UNIX socket path '{path}' is too long"));
                    }
                }
                Ok(())
            }
            _ => Err("only support inet or fd type for local".to_owned()),
        }
    }
}
