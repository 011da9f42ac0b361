//! The model: what the user asked for, checked and pure. The netdev graph ([`registry`]), the
//! guest NICs' receive filters ([`rx_filter`]) and the tunnels ([`tunnel`]).

pub mod registry;
pub mod rx_filter;
pub mod tunnel;
