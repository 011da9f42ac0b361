//! Interface operations over rtnetlink: look up, bring up, enslave to a bridge, delete.

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkLayerType, LinkMessage};
use netlink_packet_route::{
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteType},
};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// The kernel's route to a destination (`ip route get`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSummary {
    /// The destination is an address of this host.
    pub local: bool,
    pub oif: Option<u32>,
    /// The router on the way, if the destination is not on a directly connected network.
    pub gateway: Option<IpAddr>,
    /// The source address the kernel would pick.
    pub source: Option<IpAddr>,
}

/// What the daemon needs to know of an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfoSummary {
    pub ifindex: u32,
    pub kind: Option<String>,
    pub controller: Option<u32>,
    /// Set when the link's other end (a veth peer) is in another network namespace.
    pub link_netns: Option<i32>,
    /// An Ethernet device (`ARPHRD_ETHER`): not loopback, not an L3 device.
    pub ethernet: bool,
}

impl LinkInfoSummary {
    /// A veth whose peer lives in another network namespace (a container's): what reaches the
    /// peer can be handed to its ingress directly (`bpf_redirect_peer`).
    #[must_use]
    pub fn is_veth_with_peer_elsewhere(&self) -> bool {
        self.kind.as_deref() == Some("veth") && self.link_netns.is_some()
    }
}

#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
    /// The alias given to every interface created through this handle (`instance::Instance::mark`).
    mark: Option<std::sync::Arc<str>>,
}

impl Netlink {
    /// Opens a netlink socket in the daemon's network namespace; its task runs on the runtime.
    pub fn connect() -> std::io::Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Self { handle, mark: None })
    }

    /// The same socket, marking what it creates with `mark` (see [`Netlink::mark_created`]).
    #[must_use]
    pub fn with_mark(mut self, mark: String) -> Self {
        self.mark = Some(mark.into());
        self
    }

    /// Gives an interface the daemon created its mark, so that it is known as the daemon's even
    /// after a crash. Without a mark, nothing is done.
    pub async fn mark_created(&self, ifindex: u32) -> Result<(), rtnetlink::Error> {
        let Some(mark) = &self.mark else { return Ok(()) };
        self.handle.link().set(LinkUnspec::new_with_index(ifindex).alias(mark.to_string()).build()).execute().await
    }

    /// The interfaces (ifindex, name) whose alias is `mark`.
    pub async fn marked(&self, mark: &str) -> Result<Vec<(u32, String)>, rtnetlink::Error> {
        let mut links = self.handle.link().get().execute();
        let mut found = Vec::new();
        while let Some(message) = links.try_next().await? {
            let mut name = None;
            let mut alias = None;
            for attribute in &message.attributes {
                match attribute {
                    LinkAttribute::IfName(text) => name = Some(text.clone()),
                    LinkAttribute::IfAlias(text) => alias = Some(text.as_str()),
                    _ => {}
                }
            }
            if alias == Some(mark) {
                found.push((message.header.index, name.unwrap_or_default()));
            }
        }
        Ok(found)
    }

    /// The interface called `name`, if any.
    pub async fn find(&self, name: &str) -> Result<Option<LinkInfoSummary>, rtnetlink::Error> {
        let mut links = self.handle.link().get().match_name(name.to_owned()).execute();
        match links.try_next().await {
            Ok(Some(message)) => Ok(Some(summarize(&message))),
            Ok(None) => Ok(None),
            // The kernel answers ENODEV for an unknown name.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn set_up(&self, ifindex: u32) -> Result<(), rtnetlink::Error> {
        self.handle.link().set(LinkUnspec::new_with_index(ifindex).up().build()).execute().await
    }

    pub async fn set_mtu(&self, ifindex: u32, mtu: u32) -> Result<(), rtnetlink::Error> {
        self.handle.link().set(LinkUnspec::new_with_index(ifindex).mtu(mtu).build()).execute().await
    }

    pub async fn set_controller(&self, ifindex: u32, bridge: u32) -> Result<(), rtnetlink::Error> {
        self.handle.link().set(LinkUnspec::new_with_index(ifindex).controller(bridge).build()).execute().await
    }

    /// The route the kernel takes to `destination`.
    pub async fn route_to(&self, destination: IpAddr) -> Result<Option<RouteSummary>, rtnetlink::Error> {
        let prefix = if destination.is_ipv4() { 32 } else { 128 };
        let Ok(builder) = RouteMessageBuilder::<IpAddr>::new().destination_prefix(destination, prefix) else {
            return Ok(None);
        };
        let mut routes = self.handle.route().get(builder.build()).execute();
        let Some(route) = routes.try_next().await? else { return Ok(None) };
        let mut summary =
            RouteSummary { local: route.header.kind == RouteType::Local, oif: None, gateway: None, source: None };
        for attribute in &route.attributes {
            match attribute {
                RouteAttribute::Oif(index) => summary.oif = Some(*index),
                RouteAttribute::PrefSource(RouteAddress::Inet(v4)) => summary.source = Some(IpAddr::V4(*v4)),
                RouteAttribute::PrefSource(RouteAddress::Inet6(v6)) => summary.source = Some(IpAddr::V6(*v6)),
                RouteAttribute::Gateway(RouteAddress::Inet(v4)) => summary.gateway = Some(IpAddr::V4(*v4)),
                RouteAttribute::Gateway(RouteAddress::Inet6(v6)) => summary.gateway = Some(IpAddr::V6(*v6)),
                _ => {}
            }
        }
        Ok(Some(summary))
    }

    /// The link-layer address of neighbour `ip` on `ifindex`, if the kernel has a usable one.
    pub async fn neighbour(&self, ifindex: u32, ip: IpAddr) -> Result<Option<[u8; 6]>, rtnetlink::Error> {
        let mut neighbours = self.handle.neighbours().get().execute();
        while let Some(entry) = neighbours.try_next().await? {
            if entry.header.ifindex != ifindex
                || matches!(entry.header.state, NeighbourState::Incomplete | NeighbourState::Failed | NeighbourState::None)
            {
                continue;
            }
            let mut destination = None;
            let mut lladdr = None;
            for attribute in &entry.attributes {
                match attribute {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => destination = Some(IpAddr::V4(*v4)),
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => destination = Some(IpAddr::V6(*v6)),
                    NeighbourAttribute::LinkLayerAddress(bytes) => lladdr = <[u8; 6]>::try_from(bytes.as_slice()).ok(),
                    _ => {}
                }
            }
            if destination == Some(ip) && lladdr.is_some() {
                return Ok(lladdr);
            }
        }
        Ok(None)
    }

    /// Creates a veth pair `name` / `peer` in the daemon's namespace, both down, with `mtu`, both
    /// ends marked. On failure after the creation the pair is deleted again.
    pub async fn add_veth(&self, name: &str, peer: &str, mtu: u32) -> Result<(), rtnetlink::Error> {
        self.handle.link().add(LinkVeth::new(name, peer).mtu(mtu).build()).execute().await?;
        let configured = async {
            for end in [name, peer] {
                if let Some(link) = self.find(end).await? {
                    self.mark_created(link.ifindex).await?;
                    if end == peer {
                        self.handle.link().set(LinkUnspec::new_with_index(link.ifindex).mtu(mtu).build()).execute().await?;
                    }
                }
            }
            Ok(())
        }
        .await;
        if configured.is_err()
            && let Ok(Some(link)) = self.find(name).await
        {
            let _ = self.delete(link.ifindex).await;
        }
        configured
    }

    pub async fn delete(&self, ifindex: u32) -> Result<(), rtnetlink::Error> {
        self.handle.link().del(ifindex).execute().await
    }
}

fn summarize(message: &LinkMessage) -> LinkInfoSummary {
    let mut summary = LinkInfoSummary {
        ifindex: message.header.index,
        kind: None,
        controller: None,
        link_netns: None,
        ethernet: message.header.link_layer_type == LinkLayerType::Ether,
    };
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::Controller(index) => summary.controller = Some(*index),
            LinkAttribute::LinkNetNsId(id) => summary.link_netns = Some(*id),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(kind) = info {
                        summary.kind = Some(kind_name(kind));
                    }
                }
            }
            _ => {}
        }
    }
    summary
}

fn kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::Bridge => "bridge".to_owned(),
        InfoKind::Veth => "veth".to_owned(),
        InfoKind::Tun => "tun".to_owned(),
        other => format!("{other:?}").to_lowercase(),
    }
}
