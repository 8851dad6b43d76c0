//! The microVM metadata service (MMDS), as Firecracker offers it: a JSON data store the host
//! fills over the API, read by the guest over HTTP at a link-local address on a virtio-net
//! interface, with EC2 IMDS-style session tokens (V2) and listings.
//!
//! - [`data_store`]: the document, its size limit, JSON and IMDS renderings;
//! - [`token`]: V2 session tokens;
//! - [`http`]: the guest's HTTP requests and their answers;
//! - [`stack`]: ARP and TCP for the service's address, served inside the VMM from the frames a
//!   virtio-net device takes off the guest's TX queue.

pub mod data_store;
pub mod http;
pub mod stack;
pub mod token;

pub use data_store::{
    merge_patch, Mmds, MmdsVersion, OutputFormat, StoreError, DEFAULT_SIZE_LIMIT,
};
pub use stack::{MmdsStack, StackCounters, DEFAULT_IPV4, MMDS_MAC};
