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
    /// The local/remote table of `qapi/net.json` and `net/dgram.c: net_init_dgram`.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.remote, &self.local) {
            (Some(remote), local) if remote.is_ipv4_multicast() => {
                if let Some(SocketAddress::Inet(inet)) = local
                    && inet.host.parse::<std::net::Ipv4Addr>().is_err()
                {
                    return Err(format!("localaddr '{}' is not a valid IPv4 address", inet.host));
                }
                match local {
                    None | Some(SocketAddress::Inet(_) | SocketAddress::Fd(_)) => Ok(()),
                    Some(_) => Err("multicast only support inet type".to_owned()),
                }
            }
            (_, None) => Err("dgram requires local= parameter".to_owned()),
            (None, Some(SocketAddress::Fd(_))) => Ok(()),
            (None, Some(SocketAddress::Inet(_) | SocketAddress::Unix(_))) => {
                Err("type=inet or type=unix requires remote parameter".to_owned())
            }
            (_, Some(SocketAddress::Vsock(_))) => Err("only support inet or fd type for local".to_owned()),
            (Some(_), Some(SocketAddress::Fd(_))) => Err("don't set remote with local.fd".to_owned()),
            (Some(remote), Some(local)) if remote.kind() != local.kind() => {
                Err("remote and local types must be the same".to_owned())
            }
            (Some(SocketAddress::Unix(remote)), Some(SocketAddress::Unix(local))) => {
                for path in [&local.path, &remote.path] {
                    if path.len() > UNIX_PATH_MAX {
                        return Err(format!("UNIX socket path '{path}' is too long"));
                    }
                }
                Ok(())
            }
            (Some(_), Some(_)) => Ok(()),
        }
    }
}
