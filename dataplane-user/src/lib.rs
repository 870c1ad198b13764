//! The dataplane's user space: the daemon, its control socket and peer link,
//! the migration driver, and what they stand on (the kernel programs' loader
//! and logs, CRIU, the host's network devices and tasks).
//!
//! Layered from the bottom: `service` and `host` (plain types and OS calls),
//! `registry` (the services kept on disk),
//! `kernel` (the eBPF programs and maps), `standby` (the standbys' place on
//! a host), `criu`, `planning` (the migration model), `peer` (the transport between daemons), `migration` (both sides of
//! a migration), `control` (the socket's protocol), `daemon`, then the CLI.
pub mod config;
pub mod control;
pub mod criu;
pub mod daemon;
pub mod host;
pub mod kernel;
pub mod metrics;
pub mod migration;
pub mod peer;
pub mod planning;
pub mod registry;
pub mod report;
pub mod service;
pub mod standby;
