//! The host: network devices and addresses, the service's tasks.
pub mod netdev;
pub mod tasks;
