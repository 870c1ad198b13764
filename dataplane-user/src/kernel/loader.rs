//! Loading, re-adopting and unloading the kernel programs.
//!
//! Everything lives under one bpffs root (default `/sys/fs/bpf/dataplane`):
//! `maps/<MAP>`, `links/<interface>/<program>` and `programs/ingress`. Pinned links keep the
//! programs attached and counting when no process holds them, so a daemon
//! restart re-opens the pins instead of detaching.
use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
};

use aya::{
    EbpfLoader,
    maps::{Array, DevMap, HashMap, Map, MapData, MapError, PerCpuArray, RingBuf},
    pin::PinError,
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use dataplane_common::{
    Config, FLOW_MIRROR, FlowConfig, FlowKey, FlowSequence, Gate, MAX_FLOWS, MIRROR_DEVMAP,
    MirrorTarget, PORT_DELIVER, PORT_MIRROR, counter,
};

use crate::{
    host::{netdev, netdev::InterfaceError},
    kernel::gate::{GateWindow, GateWindowError, MAP_GATES},
};

/// The kernel programs, built by build.rs (empty when it was told to skip
/// them: `DATAPLANE_SKIP_EBPF`).
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane.bpf.o"));

/// Held while a flow id is chosen and taken, so that two migrations (or a
/// migration and `flow add`) in this process never take the same one.
static FLOW_TABLE: Mutex<()> = Mutex::new(());

/// Where the dataplane is pinned unless configured otherwise.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/dataplane";

/// Errors of loading, adopting and driving the dataplane.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "a dataplane is already pinned at {0}; `dataplane unload --pin-root {0}` removes it, or adopt it"
    )]
    AlreadyLoaded(PathBuf),
    #[error("no dataplane is pinned at {0}; run `dataplane load` first")]
    NotLoaded(PathBuf),
    #[error(
        "this binary was built without the kernel programs (DATAPLANE_SKIP_EBPF); build it with `cargo xtask build`"
    )]
    NoPrograms,
    #[error(transparent)]
    Interface(#[from] InterfaceError),
    #[error(transparent)]
    GateWindow(#[from] GateWindowError),
    #[error(
        "loading the eBPF object: {0} (the kernel needs BPF ring buffers, XDP and TCX: Linux 6.6 or newer)"
    )]
    Ebpf(#[from] aya::EbpfError),
    #[error("program {program} on {interface}: {source}")]
    Attach {
        program: &'static str,
        interface: String,
        source: ProgramError,
    },
    #[error("pinning {path}: {source}")]
    Pin { path: PathBuf, source: PinError },
    #[error("link pin {path}: {source}")]
    Link { path: PathBuf, source: LinkError },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0} is not on a bpf filesystem; choose a pin root under /sys/fs/bpf")]
    NotBpffs(PathBuf),
    #[error("mounting bpffs at {BPFFS}: {0}")]
    MountBpffs(nix::Error),
    #[error("devmap mirroring needs a peer interface to mirror to")]
    DevmapWithoutPeer,
    #[error("setting the mirror ports: {0}")]
    MirrorPorts(String),
    #[error("flow table full ({MAX_FLOWS} flows)")]
    FlowTableFull,
    #[error("flow {0} is not known")]
    UnknownFlow(String),
    #[error("flow {0} is already known")]
    DuplicateFlow(String),
}

/// How to load the dataplane on a host.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// bpffs directory for the pins.
    pub pin_root: PathBuf,
    /// The service-facing interface: CPS inputs arrive here, outputs leave here.
    pub interface: String,
    /// The link to the peer host: mirror copies leave and arrive here.
    pub peer_interface: Option<String>,
    /// The interface mirror frames are taken on, when not `peer_interface`:
    /// a standby's dataplane, which has no peer, gets its copies on the
    /// link from its source (its `interface`). A mirror frame arriving
    /// anywhere else passes untouched (counter `mirror_foreign`): it would
    /// move a flow's numbering and gates.
    pub mirror_from: Option<String>,
    /// The link to a standby instance's network namespace on this host, and
    /// the MAC of its other end: flows marked `FLOW_STANDBY` are mirrored
    /// there too (clone mode).
    pub standby: Option<(String, [u8; 6])>,
    /// Most bytes of a frame copied into the logs; 0 means whole frames.
    pub snap_len: u32,
    /// Size of the input log ring buffer in bytes (a power of two, at least a page).
    pub input_ring_bytes: u32,
    /// Size of the output log ring buffer in bytes.
    pub output_ring_bytes: u32,
    /// How mirror copies are made.
    pub mirror_mode: MirrorMode,
}

/// How the source host makes the mirror copy of an input.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum MirrorMode {
    /// XDP passes the input to the stack; a TC ingress program clones it to
    /// the peer interface (works whatever sits behind the interface).
    #[default]
    Clone,
    /// XDP broadcasts the input through a devmap to the peer interface and to
    /// `deliver_interface`, a veth whose other end (MAC `deliver_mac`) leads
    /// to the service, as for a service in a container.
    Devmap {
        deliver_interface: String,
        deliver_mac: [u8; 6],
    },
}

impl LoadOptions {
    /// Options with documented defaults for `interface`.
    pub fn new(interface: impl Into<String>) -> Self {
        Self {
            pin_root: PathBuf::from(DEFAULT_PIN_ROOT),
            interface: interface.into(),
            peer_interface: None,
            mirror_from: None,
            standby: None,
            snap_len: 0,
            input_ring_bytes: 64 << 20,
            output_ring_bytes: 16 << 20,
            mirror_mode: MirrorMode::Clone,
        }
    }
}

/// Map names, as the kernel object declares them.
const MAP_FLOWS: &str = "FLOWS";
const MAP_SEQUENCES: &str = "SEQUENCES";
const MAP_CONFIG: &str = "CONFIG";
const MAP_COUNTERS: &str = "COUNTERS";
const MAP_MIRROR_PORTS: &str = "MIRROR_PORTS";
const MAP_MIRROR_TO: &str = "MIRROR_TO";
/// The input log ring buffer.
pub const MAP_INPUTS: &str = "INPUTS";
/// The output log ring buffer.
pub const MAP_OUTPUTS: &str = "OUTPUTS";

/// A loaded dataplane, reached through its pinned maps.
pub struct Dataplane {
    pin_root: PathBuf,
    flows: HashMap<MapData, FlowKey, FlowConfig>,
    sequences: Array<MapData, FlowSequence>,
    gates: Array<MapData, Gate>,
    mirror_to: Array<MapData, MirrorTarget>,
    config: Array<MapData, Config>,
    counters: PerCpuArray<MapData, u64>,
}

/// Counter totals over all CPUs, by `counter::*` index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub [u64; counter::COUNT as usize]);

impl Counters {
    /// The value of counter `index`.
    pub fn get(&self, index: u32) -> u64 {
        self.0[index as usize]
    }
}

impl Dataplane {
    /// Loads the programs, attaches them to the interfaces in `options`, and
    /// pins programs' links and maps under `options.pin_root`.
    pub fn load(options: &LoadOptions) -> Result<Self, LoadError> {
        let root = &options.pin_root;
        if root.join("links").exists() {
            return Err(LoadError::AlreadyLoaded(root.clone()));
        }
        // Resolve the interfaces before anything is pinned.
        let capture = netdev::Interface::by_name(&options.interface)?;
        let mut config = Config {
            snap_len: options.snap_len,
            capture_ifindex: capture.index,
            capture_mac: capture.mac,
            ..Default::default()
        };
        let mut attachments = vec![
            (&options.interface, "ingress"),
            (&options.interface, "egress"),
        ];
        if let Some(peer) = &options.peer_interface {
            let peer_if = netdev::Interface::by_name(peer)?;
            config.mirror_ifindex = peer_if.index;
            config.mirror_src_mac = peer_if.mac;
            config.mirror_from_ifindex = peer_if.index;
            attachments.push((peer, "ingress"));
            attachments.push((peer, "egress"));
        }
        if let Some(from) = &options.mirror_from {
            config.mirror_from_ifindex = netdev::Interface::by_name(from)?.index;
            if !attachments.contains(&(from, "ingress")) {
                attachments.push((from, "ingress"));
            }
        }
        if let Some((standby, mac)) = &options.standby {
            let standby_if = netdev::Interface::by_name(standby)?;
            config.standby_ifindex = standby_if.index;
            config.standby_src_mac = standby_if.mac;
            config.standby_dst_mac = *mac;
            attachments.push((standby, "egress"));
        }
        let deliver_ifindex = match &options.mirror_mode {
            MirrorMode::Clone => {
                attachments.push((&options.interface, "mirror"));
                None
            }
            MirrorMode::Devmap {
                deliver_interface,
                deliver_mac,
            } => {
                if options.peer_interface.is_none() {
                    return Err(LoadError::DevmapWithoutPeer);
                }
                config.mirror_mode = MIRROR_DEVMAP;
                config.deliver_mac = *deliver_mac;
                Some(netdev::Interface::by_name(deliver_interface)?.index)
            }
        };
        if EBPF_OBJECT.is_empty() {
            return Err(LoadError::NoPrograms);
        }
        ensure_bpffs()?;
        let maps_dir = root.join("maps");
        create_dir(&maps_dir)?;
        if !is_bpffs(&maps_dir) {
            return Err(LoadError::NotBpffs(root.clone()));
        }
        let mut ebpf = match EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .map_max_entries(MAP_INPUTS, options.input_ring_bytes)
            .map_max_entries(MAP_OUTPUTS, options.output_ring_bytes)
            .load(EBPF_OBJECT)
        {
            Ok(ebpf) => ebpf,
            Err(e) => {
                let _ = Self::unload(root);
                return Err(e.into());
            }
        };
        let attached = attachments.into_iter().try_for_each(|(iface, program)| {
            let link = attach(&mut ebpf, program, iface)?;
            let dir = root.join("links").join(iface);
            create_dir(&dir)?;
            let path = dir.join(program);
            // The pin, not this process, keeps the program attached.
            link.pin(&path)
                .map(drop)
                .map_err(|source| LoadError::Pin { path, source })
        });
        let loaded = attached.and_then(|()| {
            pin_ingress(&mut ebpf, root)?;
            if let Some(deliver_ifindex) = deliver_ifindex {
                set_mirror_ports(&mut ebpf, config.mirror_ifindex, deliver_ifindex)?;
            }
            let mut dataplane = Self::open(root)?;
            dataplane
                .config
                .set(0, config, 0)
                .map_err(|source| LoadError::Map {
                    name: MAP_CONFIG,
                    source,
                })?;
            set_replay_key(root)?;
            Ok(dataplane)
        });
        if loaded.is_err() {
            // Leave nothing half-attached behind; the first error is the one to report.
            let _ = Self::unload(root);
        }
        loaded
    }

    /// Re-adopts a dataplane pinned at `pin_root`, leaving it attached as it is.
    pub fn open(pin_root: &Path) -> Result<Self, LoadError> {
        ensure_bpffs()?;
        if !pin_root.join("links").exists() {
            return Err(LoadError::NotLoaded(pin_root.to_owned()));
        }
        let map = |name: &'static str| {
            MapData::from_pin(pin_root.join("maps").join(name))
                .map_err(|source| LoadError::Map { name, source })
        };
        let typed_err = |name: &'static str| move |source| LoadError::Map { name, source };
        Ok(Self {
            pin_root: pin_root.to_owned(),
            flows: HashMap::try_from(Map::HashMap(map(MAP_FLOWS)?))
                .map_err(typed_err(MAP_FLOWS))?,
            sequences: pinned_array(pin_root, MAP_SEQUENCES)?,
            gates: pinned_array(pin_root, MAP_GATES)?,
            mirror_to: pinned_array(pin_root, MAP_MIRROR_TO)?,
            config: pinned_array(pin_root, MAP_CONFIG)?,
            counters: PerCpuArray::try_from(Map::PerCpuArray(map(MAP_COUNTERS)?))
                .map_err(typed_err(MAP_COUNTERS))?,
        })
    }

    /// Detaches every program pinned at `pin_root` and removes the pins.
    pub fn unload(pin_root: &Path) -> Result<(), LoadError> {
        ensure_bpffs()?;
        if !pin_root.exists() {
            return Err(LoadError::NotLoaded(pin_root.to_owned()));
        }
        let links = pin_root.join("links");
        // A load that failed part-way may have pinned maps but no links.
        create_dir(&links)?;
        for iface in read_dir(&links)? {
            for path in read_dir(&iface)? {
                let pinned = PinnedLink::from_pin(&path).map_err(|source| LoadError::Link {
                    path: path.clone(),
                    source,
                })?;
                let link = pinned.unpin().map_err(|source| LoadError::Io {
                    path: path.clone(),
                    source,
                })?;
                // Dropping the last reference to a bpf_link detaches it.
                drop(link);
            }
            remove_dir(&iface)?;
        }
        remove_dir(&links)?;
        for dir in [PROGRAMS_DIR, "maps"] {
            let dir = pin_root.join(dir);
            if !dir.exists() {
                continue;
            }
            for path in read_dir(&dir)? {
                fs::remove_file(&path).map_err(|source| LoadError::Io { path, source })?;
            }
            remove_dir(&dir)?;
        }
        remove_dir(pin_root)
    }

    /// The bpffs root this dataplane is pinned at.
    pub fn pin_root(&self) -> &Path {
        &self.pin_root
    }

    /// The id of `program` as attached to `interface`, from its link pin.
    pub fn program_id(&self, interface: &str, program: &str) -> Result<u32, LoadError> {
        let path = self.pin_root.join("links").join(interface).join(program);
        let link_err = |source| LoadError::Link {
            path: path.clone(),
            source,
        };
        let link = FdLink::from(PinnedLink::from_pin(&path).map_err(link_err)?);
        Ok(link.info().map_err(link_err)?.program_id())
    }

    /// The attached programs, as "interface/program", from the link pins.
    pub fn attached_programs(&self) -> Result<Vec<String>, LoadError> {
        let mut attached = Vec::new();
        for iface in read_dir(&self.pin_root.join("links"))? {
            for link in read_dir(&iface)? {
                let name = |p: &Path| {
                    p.file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned()
                };
                attached.push(format!("{}/{}", name(&iface), name(&link)));
            }
        }
        attached.sort();
        Ok(attached)
    }

    /// Opens one of the log ring buffers ([`MAP_INPUTS`] or [`MAP_OUTPUTS`]).
    pub fn open_log(&self, name: &'static str) -> Result<RingBuf<MapData>, LoadError> {
        let data = MapData::from_pin(self.pin_root.join("maps").join(name))
            .map_err(|source| LoadError::Map { name, source })?;
        RingBuf::try_from(Map::RingBuf(data)).map_err(|source| LoadError::Map { name, source })
    }

    /// Serializes choosing and taking flow ids in this process: hold it
    /// from [`Dataplane::free_flow_ids`] to [`Dataplane::adopt_flows`].
    pub fn lock_flow_table() -> MutexGuard<'static, ()> {
        FLOW_TABLE.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts capturing `key` under the lowest free flow id, and returns the id.
    pub fn add_flow(&mut self, key: FlowKey, flags: u32) -> Result<u32, LoadError> {
        let _table = Self::lock_flow_table();
        let flows = self.flows()?;
        if flows.iter().any(|(k, _)| *k == key) {
            return Err(LoadError::DuplicateFlow(crate::kernel::flow::display(&key)));
        }
        let flow_id = self.free_flow_ids(1)?[0];
        self.group(&[(key, flags)], flow_id)?;
        Ok(flow_id)
    }

    /// The `count` lowest flow ids no flow has.
    pub fn free_flow_ids(&self, count: usize) -> Result<Vec<u32>, LoadError> {
        let flows = self.flows()?;
        let free: Vec<u32> = (0..MAX_FLOWS)
            .filter(|id| flows.iter().all(|(_, c)| c.flow_id != *id))
            .take(count)
            .collect();
        match free.len() == count {
            true => Ok(free),
            false => Err(LoadError::FlowTableFull),
        }
    }

    /// Makes `keys` one service's flows on this host, all under `flow_id`
    /// (a migration's destination, a standby), numbered afresh as one. An
    /// existing entry for one of `keys` is replaced; another flow holding
    /// `flow_id` is an error.
    pub fn adopt_flows(&mut self, keys: &[FlowKey], flow_id: u32) -> Result<(), LoadError> {
        if flow_id >= MAX_FLOWS {
            return Err(LoadError::FlowTableFull);
        }
        if let Some((other, _)) = self
            .flows()?
            .into_iter()
            .find(|(k, c)| c.flow_id == flow_id && !keys.contains(k))
        {
            return Err(LoadError::DuplicateFlow(format!(
                "id {flow_id} belongs to {}",
                crate::kernel::flow::display(&other)
            )));
        }
        let keys: Vec<(FlowKey, u32)> = keys.iter().map(|&k| (k, 0)).collect();
        self.group(&keys, flow_id)
    }

    /// Gives the known flows `keys` one numbering, so that a service fed by
    /// several flows is held, replayed and handed over as one, its inputs
    /// in one order: their common id if no other flow has it, otherwise
    /// an id no flow has (numbering afresh). The id.
    pub fn join_flows(&mut self, keys: &[FlowKey]) -> Result<u32, LoadError> {
        let _table = Self::lock_flow_table();
        let flows = self.flows()?;
        let members: Vec<(FlowKey, FlowConfig)> = keys
            .iter()
            .map(|key| {
                flows
                    .iter()
                    .find(|(k, _)| k == key)
                    .copied()
                    .ok_or_else(|| LoadError::UnknownFlow(crate::kernel::flow::display(key)))
            })
            .collect::<Result<_, _>>()?;
        let Some(&(_, first)) = members.first() else {
            return Err(LoadError::UnknownFlow("no flow given".into()));
        };
        let apart = members.iter().any(|(_, c)| c.flow_id != first.flow_id)
            || flows
                .iter()
                .any(|(k, c)| c.flow_id == first.flow_id && !keys.contains(k));
        if !apart {
            return Ok(first.flow_id);
        }
        let flow_id = self.free_flow_ids(1)?[0];
        let keys: Vec<(FlowKey, u32)> = members.iter().map(|(k, c)| (*k, c.flags)).collect();
        self.group(&keys, flow_id)?;
        Ok(flow_id)
    }

    /// Changes the flags (`FLOW_*`) of the known flow `key`.
    pub fn set_flow_flags(&mut self, key: &FlowKey, flags: u32) -> Result<(), LoadError> {
        let config = self.flow_config(key)?;
        self.write_flow_flags(key, config, flags)
    }

    /// The entry of the known flow `key`.
    fn flow_config(&self, key: &FlowKey) -> Result<FlowConfig, LoadError> {
        self.flows.get(key, 0).map_err(|source| match source {
            MapError::KeyNotFound => LoadError::UnknownFlow(crate::kernel::flow::display(key)),
            source => LoadError::Map {
                name: MAP_FLOWS,
                source,
            },
        })
    }

    fn write_flow_flags(
        &mut self,
        key: &FlowKey,
        config: FlowConfig,
        flags: u32,
    ) -> Result<(), LoadError> {
        self.flows
            .insert(*key, FlowConfig { flags, ..config }, 0)
            .map_err(|source| LoadError::Map {
                name: MAP_FLOWS,
                source,
            })
    }

    /// Mirrors the known flow `key` to `to` (the host's MAC on the mirror
    /// interface and the flow's id there), or (`None`) stops mirroring it.
    /// The target is set before the flag and cleared after it: no copy
    /// leaves without one.
    pub fn mirror_flow(
        &mut self,
        key: &FlowKey,
        to: Option<MirrorTarget>,
    ) -> Result<(), LoadError> {
        let config = self.flow_config(key)?;
        let set_target = |this: &mut Self, target| {
            this.mirror_to
                .set(config.flow_id, target, 0)
                .map_err(|source| LoadError::Map {
                    name: MAP_MIRROR_TO,
                    source,
                })
        };
        match to {
            Some(target) => {
                set_target(self, target)?;
                self.write_flow_flags(key, config, config.flags | FLOW_MIRROR)
            }
            None => {
                self.write_flow_flags(key, config, config.flags & !FLOW_MIRROR)?;
                set_target(self, MirrorTarget::default())
            }
        }
    }

    /// Where flow `flow_id`'s mirror copies go; none if nowhere.
    pub fn mirror_target(&self, flow_id: u32) -> Result<Option<MirrorTarget>, LoadError> {
        self.mirror_to
            .get(&flow_id, 0)
            .map(MirrorTarget::get)
            .map_err(|source| LoadError::Map {
                name: MAP_MIRROR_TO,
                source,
            })
    }

    /// Makes `keys` (each with its flags) the flows of `flow_id`, which
    /// starts numbering afresh, mirrored nowhere, its gate open.
    fn group(&mut self, keys: &[(FlowKey, u32)], flow_id: u32) -> Result<(), LoadError> {
        self.sequences
            .set(flow_id, FlowSequence::default(), 0)
            .map_err(|source| LoadError::Map {
                name: MAP_SEQUENCES,
                source,
            })?;
        self.mirror_to
            .set(flow_id, MirrorTarget::default(), 0)
            .map_err(|source| LoadError::Map {
                name: MAP_MIRROR_TO,
                source,
            })?;
        self.gates
            .set(flow_id, Gate::default(), 0)
            .map_err(|source| LoadError::Map {
                name: MAP_GATES,
                source,
            })?;
        for &(key, flags) in keys {
            self.flows
                .insert(key, FlowConfig { flow_id, flags }, 0)
                .map_err(|source| LoadError::Map {
                    name: MAP_FLOWS,
                    source,
                })?;
        }
        Ok(())
    }

    /// Stops capturing `key`.
    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<(), LoadError> {
        self.flows.remove(key).map_err(|source| match source {
            MapError::KeyNotFound => LoadError::UnknownFlow(crate::kernel::flow::display(key)),
            source => LoadError::Map {
                name: MAP_FLOWS,
                source,
            },
        })
    }

    /// Every known flow with its configuration.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowConfig)>, LoadError> {
        self.flows
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|source| LoadError::Map {
                name: MAP_FLOWS,
                source,
            })
    }

    /// The sequencing state of flow `flow_id`.
    pub fn sequence(&self, flow_id: u32) -> Result<FlowSequence, LoadError> {
        self.sequences
            .get(&flow_id, 0)
            .map_err(|source| LoadError::Map {
                name: MAP_SEQUENCES,
                source,
            })
    }

    /// Sets the gate of flow `flow_id` on this host.
    pub fn set_gate(&mut self, flow_id: u32, gate: Gate) -> Result<(), LoadError> {
        self.gates
            .set(flow_id, gate, 0)
            .map_err(|source| LoadError::Map {
                name: MAP_GATES,
                source,
            })
    }

    /// The gate of flow `flow_id` on this host.
    pub fn gate(&self, flow_id: u32) -> Result<Gate, LoadError> {
        self.gates
            .get(&flow_id, 0)
            .map_err(|source| LoadError::Map {
                name: MAP_GATES,
                source,
            })
    }

    /// Changes the input gate of flow `flow_id` to `mode` (and `next_expected`),
    /// keeping its output gate and cutover point. Through the memory
    /// mapping, a word at a time: rewriting the whole gate could undo a
    /// kernel program's concurrent advance of `next_expected`, and the input
    /// it had just taken would then be held with nobody left to replay it.
    pub fn set_input_gate(
        &mut self,
        flow_id: u32,
        mode: u32,
        next_expected: u64,
    ) -> Result<(), LoadError> {
        self.gate_window()?
            .set_input_gate(flow_id, mode, next_expected);
        Ok(())
    }

    /// The gates array mapped into this process, for flips that must be one store.
    pub fn gate_window(&self) -> Result<GateWindow, LoadError> {
        Ok(GateWindow::open(&self.pin_root)?)
    }

    /// The host-wide settings the programs run with.
    pub fn config(&self) -> Result<Config, LoadError> {
        self.config.get(&0, 0).map_err(|source| LoadError::Map {
            name: MAP_CONFIG,
            source,
        })
    }

    /// Counter totals over all CPUs.
    pub fn counters(&self) -> Result<Counters, LoadError> {
        let mut totals = Counters::default();
        for (index, total) in totals.0.iter_mut().enumerate() {
            *total = self.counter_per_cpu(index as u32)?.iter().sum();
        }
        Ok(totals)
    }

    /// Counter `index` (`counter::*`) on each possible CPU.
    pub fn counter_per_cpu(&self, index: u32) -> Result<Vec<u64>, LoadError> {
        let values = self
            .counters
            .get(&index, 0)
            .map_err(|source| LoadError::Map {
                name: MAP_COUNTERS,
                source,
            })?;
        Ok(values.to_vec())
    }
}

/// The array map `name` pinned under `pin_root`.
pub(crate) fn pinned_array<T: aya::Pod>(
    pin_root: &Path,
    name: &'static str,
) -> Result<Array<MapData, T>, LoadError> {
    let err = move |source| LoadError::Map { name, source };
    let data = MapData::from_pin(pin_root.join("maps").join(name)).map_err(err)?;
    Array::try_from(Map::Array(data)).map_err(err)
}

/// The replay trigger's key (see [`crate::kernel::injector::Injector`]).
pub(crate) const MAP_REPLAY_KEY: &str = "REPLAY_KEY";

/// Gives the dataplane at `root` a random replay key, never 0 (no key).
fn set_replay_key(root: &Path) -> Result<(), LoadError> {
    let io_err = |source| LoadError::Io {
        path: root.join("maps").join(MAP_REPLAY_KEY),
        source,
    };
    // Below 2^63: a key travels in a mirror header's sequence field.
    let key = (getrandom::u64().map_err(|e| io_err(e.into()))? >> 1).max(1);
    pinned_array::<u64>(root, MAP_REPLAY_KEY)?
        .set(0, key, 0)
        .map_err(|source| LoadError::Map {
            name: MAP_REPLAY_KEY,
            source,
        })
}

/// Where programs themselves are pinned (links keep them attached; a pinned
/// program can be run on a frame by user space, which is how replay injects).
const PROGRAMS_DIR: &str = "programs";

/// Pins the `ingress` program, for [`crate::kernel::injector::Injector`].
fn pin_ingress(ebpf: &mut aya::Ebpf, root: &Path) -> Result<(), LoadError> {
    let dir = root.join(PROGRAMS_DIR);
    create_dir(&dir)?;
    let path = dir.join("ingress");
    let xdp: &mut Xdp = ebpf
        .program_mut("ingress")
        .expect("program is in the object")
        .try_into()
        .map_err(|source| LoadError::Attach {
            program: "ingress",
            interface: "-".into(),
            source,
        })?;
    xdp.pin(&path)
        .map_err(|source| LoadError::Pin { path, source })
}

/// Fills the `MIRROR_PORTS` devmap of `MirrorMode::Devmap`: each port with
/// the devmap program that prepares its copy. The map keeps the programs.
fn set_mirror_ports(
    ebpf: &mut aya::Ebpf,
    mirror_ifindex: u32,
    deliver_ifindex: u32,
) -> Result<(), LoadError> {
    let mut fds = Vec::new();
    for program in ["mirror_port", "deliver_port"] {
        let err = |source| LoadError::Attach {
            program,
            interface: "MIRROR_PORTS".into(),
            source,
        };
        let xdp: &mut Xdp = ebpf
            .program_mut(program)
            .expect("program is in the object")
            .try_into()
            .map_err(err)?;
        xdp.load().map_err(err)?;
        let fd = xdp.fd().map_err(err)?.try_clone();
        fds.push(fd.map_err(|source| LoadError::Io {
            path: PathBuf::from(program),
            source,
        })?);
    }
    let map_err = |source| LoadError::Map {
        name: MAP_MIRROR_PORTS,
        source,
    };
    let map = ebpf
        .take_map(MAP_MIRROR_PORTS)
        .expect("map is in the object");
    let mut ports = DevMap::try_from(map).map_err(map_err)?;
    for (slot, ifindex, fd) in [
        (PORT_MIRROR, mirror_ifindex, &fds[0]),
        (PORT_DELIVER, deliver_ifindex, &fds[1]),
    ] {
        ports
            .set(slot, ifindex, Some(fd), 0)
            .map_err(|e| LoadError::MirrorPorts(e.to_string()))?;
    }
    Ok(())
}

/// Loads `program` (once) and attaches it to `iface` at the hook it is written for.
fn attach(ebpf: &mut aya::Ebpf, program: &'static str, iface: &str) -> Result<FdLink, LoadError> {
    let err = |source| LoadError::Attach {
        program,
        interface: iface.to_owned(),
        source,
    };
    let not_fd = |source| LoadError::Link {
        path: PathBuf::from(iface).join(program),
        source,
    };
    let prog = ebpf.program_mut(program).expect("program is in the object");
    if program == "ingress" {
        let xdp: &mut Xdp = prog.try_into().map_err(err)?;
        if xdp.fd().is_err() {
            xdp.load().map_err(err)?;
        }
        let id = xdp.attach(iface, XdpMode::Default).map_err(err)?;
        FdLink::try_from(xdp.take_link(id).map_err(err)?).map_err(not_fd)
    } else {
        let tc: &mut SchedClassifier = prog.try_into().map_err(err)?;
        if tc.fd().is_err() {
            tc.load().map_err(err)?;
        }
        let hook = if program == "mirror" {
            TcAttachType::Ingress
        } else {
            TcAttachType::Egress
        };
        let id = tc.attach(iface, hook).map_err(err)?;
        FdLink::try_from(tc.take_link(id).map_err(err)?).map_err(not_fd)
    }
}

const BPFFS: &str = "/sys/fs/bpf";

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// Mounts bpffs at /sys/fs/bpf when this mount namespace lacks it (as under
/// `ip netns exec`, which remounts /sys).
fn ensure_bpffs() -> Result<(), LoadError> {
    if is_bpffs(Path::new(BPFFS)) {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(LoadError::MountBpffs)
}

fn create_dir(path: &Path) -> Result<(), LoadError> {
    fs::create_dir_all(path).map_err(|source| LoadError::Io {
        path: path.to_owned(),
        source,
    })
}

fn remove_dir(path: &Path) -> Result<(), LoadError> {
    fs::remove_dir(path).map_err(|source| LoadError::Io {
        path: path.to_owned(),
        source,
    })
}

fn read_dir(path: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let entries = fs::read_dir(path).map_err(|source| LoadError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
}
