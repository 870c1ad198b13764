//! The dataplane's user space: loading the kernel programs, reading their
//! logs and counters, and managing CPS flows.
pub mod calibrate;
pub mod capture;
pub mod checkpoint;
pub mod config;
pub mod control;
pub mod convergence;
pub mod criu;
pub mod daemon;
pub mod flow;
pub mod loader;
pub mod metrics;
pub mod migration;
pub mod model;
pub mod netdev;
pub mod peer;
pub mod random;
pub mod replay;
pub mod tasks;

pub use capture::{LogReader, Record};
pub use loader::{Counters, Dataplane, LoadError, LoadOptions};
