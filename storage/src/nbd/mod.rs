//! NBD: the wire formats ([`proto`]) and a server ([`server`]).

pub mod proto;
pub mod server;
