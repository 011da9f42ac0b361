//! The L2TPv3 data header (RFC 3931) in QEMU's layout: building and checking it.
