//! Test hosts made of network namespaces and veth pairs, used by every
//! integration test and by the demo.
//!
//! ```text
//!   cps netns: br0 192.0.2.1/24 2001:db8::1/64 ── ports to-src, to-dst (the field network)
//!   src netns: eth0 192.0.2.30 2001:db8::30, and the service      peer0 198.51.100.1 ──┐
//!              address 192.0.2.10 2001:db8::10 (/32, /128)                              │
//!   dst netns: eth0 192.0.2.20 2001:db8::20, service address on lo peer0 198.51.100.2 ──┤
//!   mig netns: br0 ── ports to-src, to-dst (the migration network) ─────────────────────┘
//! ```
//!
//! Every host answers ARP only for its eth0's addresses and names its own
//! in its requests, so the CPS reaches `src` until a cutover moves the
//! service address. A [`Cell`] adds a third host, `c` (192.0.2.40,
//! 198.51.100.4), with no service address. Names carry the process id, so
//! test runs never collide; everything is removed on drop.
mod cell;
mod container;
mod daemon;
mod hosts;
mod migration;
mod netns;
mod services;
mod stats;
mod timing;
mod trace;

pub use cell::{C_ADDRESSES, CELL, Cell, flows_json};
pub use container::{RuncContainer, Runtime, missing};
pub use daemon::{DaemonProcess, Flow, dataplane_bin};
pub use hosts::{
    CPS_V4, CPS_V6, DST_ADDRESSES, HostAddresses, Loaded, RawSocket, SERVICE_V4, SERVICE_V6,
    SRC_ADDRESSES, TestHosts, mac_text, sock,
};
pub use migration::{
    CONTROLLER_COMM, ContainerStart, DST_PEER, EXTRA_SERVICE_V4, MigrationSetup, SRC_PEER,
    StopAndCopy, cps_verdict, cps_verdicts, files_under,
};
pub use netns::{NetNs, ip, run, veth};
pub use services::{
    ChainService, chain, chain_state, count_datagrams, in_netns, in_netns_at, kill_pid, pids_named,
    service_command, udp_payload,
};
pub use stats::{Outcomes, Sample, bar};
pub use timing::{
    CONNTRACK_BUCKETS, ConntrackBuckets, MachineCpu, Pin, Pinning, clock_ticks_per_second,
    cpu_split, realtime_priority, tune_host_for_timing,
};
pub use trace::{Cycle, gaps_between, output_gaps, read_trace, report_phase};
