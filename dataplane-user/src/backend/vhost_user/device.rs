//! The virtio-net device a vhost-user frontend sees: the features and protocol features offered,
//! what the acked ones mean for the tap, and the config space.

use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::{
    virtio_config::{VIRTIO_F_ANY_LAYOUT, VIRTIO_F_VERSION_1},
    virtio_net::{
        VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
        VIRTIO_NET_S_LINK_UP,
    },
    virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC},
};

use crate::port::tun::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};

/// Ring size the backend accepts at most (QEMU's virtio-net allows up to 1024).
pub const MAX_QUEUE_SIZE: usize = 1024;

/// `struct virtio_net_hdr_v1`: what a VERSION_1 (or MRG_RXBUF) driver puts before every frame.
pub const HDR_LEN_V1: usize = 12;
/// `struct virtio_net_hdr` of a legacy driver without MRG_RXBUF.
pub const HDR_LEN_LEGACY: usize = 10;
/// Offset of `num_buffers` in the v1 header.
pub const NUM_BUFFERS_OFFSET: usize = 10;

const fn bit(n: u32) -> u64 {
    1 << n
}

/// Every feature the backend offers. The checksum and TSO bits pass through: the guest's header
/// goes to the tap unchanged (host side), and the tap is told which offloads the guest takes
/// (guest side). STATUS and MQ are QEMU's to handle; they are offered so that a frontend that
/// asks the backend sees them. LOG_ALL: the backend logs the guest pages it writes while QEMU
/// migrates the guest (QEMU refuses to migrate a guest whose backend lacks it). GUEST_ANNOUNCE:
/// QEMU passes it to the guest only when the backend offers it; after a migration the guest then
/// announces its MAC itself (gratuitous ARP through the new port, where the hub learns it), over
/// the control queue QEMU keeps. Without it QEMU would ask the backend for SEND_RARP, which the
/// crate lacks, and the hub would send the guest's frames to its old port until it spoke.
#[must_use]
pub fn offered_features(queue_pairs: usize) -> u64 {
    let mut features = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_F_ANY_LAYOUT)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_NET_F_CSUM)
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_HOST_TSO4)
        | bit(VIRTIO_NET_F_HOST_TSO6)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_GUEST_TSO6)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_NET_F_STATUS)
        | bit(VIRTIO_NET_F_GUEST_ANNOUNCE)
        | VhostUserVirtioFeatures::LOG_ALL.bits()
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if queue_pairs > 1 {
        features |= bit(VIRTIO_NET_F_MQ);
    }
    features
}

/// The protocol features QEMU 7.2 uses that the `vhost` crate implements (not SEND_RARP, not
/// NET_SET_MTU: the crate has neither). CONFIGURE_MEM_SLOTS: with `queues` > 1 QEMU runs one
/// vhost device per queue pair on the connection and each adds the same regions, which the relay
/// passes to the crate once (see `relay`). LOG_SHMFD: the dirty-page log of a migration is shared
/// memory QEMU passes (`SET_LOG_BASE`), which the guest memory's bitmap writes into.
#[must_use]
pub fn offered_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::LOG_SHMFD
}

/// What the acked features mean for the data path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Negotiated {
    pub features: u64,
}

impl Negotiated {
    #[must_use]
    pub const fn has(self, feature: u32) -> bool {
        self.features & bit(feature) != 0
    }

    /// The header before every frame in the rings (and on the tap).
    #[must_use]
    pub const fn hdr_len(self) -> usize {
        if self.has(VIRTIO_F_VERSION_1) || self.has(VIRTIO_NET_F_MRG_RXBUF) { HDR_LEN_V1 } else { HDR_LEN_LEGACY }
    }

    #[must_use]
    pub const fn mergeable(self) -> bool {
        self.has(VIRTIO_NET_F_MRG_RXBUF)
    }

    /// `TUNSETOFFLOAD`: the offloads the guest's driver takes on receive.
    #[must_use]
    pub const fn tap_offloads(self) -> u32 {
        let mut flags = 0;
        if self.has(VIRTIO_NET_F_GUEST_CSUM) {
            flags |= TUN_F_CSUM;
            // The kernel refuses TSO without checksum offload.
            if self.has(VIRTIO_NET_F_GUEST_TSO4) {
                flags |= TUN_F_TSO4;
            }
            if self.has(VIRTIO_NET_F_GUEST_TSO6) {
                flags |= TUN_F_TSO6;
            }
        }
        flags
    }
}

/// `struct virtio_net_config` up to `max_virtqueue_pairs` (QEMU keeps its own: only a frontend
/// that negotiates the CONFIG protocol feature, which is not offered, would ask).
#[must_use]
pub fn config_space(queue_pairs: usize) -> [u8; 10] {
    let mut config = [0u8; 10];
    // mac[6] stays zero: the frontend chooses the MAC.
    let status = u16::try_from(VIRTIO_NET_S_LINK_UP).unwrap_or(1);
    config[6..8].copy_from_slice(&status.to_le_bytes());
    config[8..10].copy_from_slice(&u16::try_from(queue_pairs).unwrap_or(u16::MAX).to_le_bytes());
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_twelve_bytes_for_version_1_and_mergeable_buffers() {
        assert_eq!(Negotiated { features: bit(VIRTIO_F_VERSION_1) }.hdr_len(), 12);
        assert_eq!(Negotiated { features: bit(VIRTIO_NET_F_MRG_RXBUF) }.hdr_len(), 12);
        assert_eq!(Negotiated { features: 0 }.hdr_len(), 10);
    }

    #[test]
    fn tso_reaches_the_tap_only_with_checksum_offload() {
        let tso = bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6);
        assert_eq!(Negotiated { features: tso }.tap_offloads(), 0);
        let all = tso | bit(VIRTIO_NET_F_GUEST_CSUM);
        assert_eq!(Negotiated { features: all }.tap_offloads(), TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6);
    }

    #[test]
    fn multiqueue_is_offered_with_more_than_one_pair() {
        assert_eq!(offered_features(1) & bit(VIRTIO_NET_F_MQ), 0);
        assert_ne!(offered_features(2) & bit(VIRTIO_NET_F_MQ), 0);
        assert_ne!(offered_features(1) & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
    }

    #[test]
    fn the_config_space_says_link_up_and_the_pairs() {
        assert_eq!(config_space(2), [0, 0, 0, 0, 0, 0, 1, 0, 2, 0]);
    }
}
