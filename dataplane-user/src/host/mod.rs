//! The host: network devices and addresses, the service's tasks, randomness.
pub mod netdev;
pub mod random;
pub mod tasks;
