//! netdevd library.
