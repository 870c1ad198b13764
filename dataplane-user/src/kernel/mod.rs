//! The kernel side as user space sees it: loading and pinning the eBPF
//! programs and maps, the flow table, the gate window the cutover flips, the
//! input and output logs, and the injector that replays logged inputs.
pub mod flow;
pub mod gate;
pub mod injector;
pub mod loader;
pub mod logs;
