//! Failover to a hot replica this host holds: when the host serving the
//! service (the source) stops, this host takes the service over.
//!
//! A watcher thread per replica asks two independent paths whether the
//! source lives:
//!
//! - the migration network: the mirror (the flow's numbering moves with
//!   every input the source's kernel mirrors here) and the peer link
//!   (every step the source's daemon sends);
//! - the service network: unicast ARP probes (IPv4) or neighbour
//!   solicitations (IPv6) for the service address at the source's MAC,
//!   which the source's kernel answers while it is up ([`HolderProbe`]);
//!   sent only once the migration network has been silent past half of
//!   `failover_after`, one at a time.
//!
//! It takes over only when both are silent: the migration network for
//! `failover_after` and a probe for the rest of it ([`Timing`]). A cut of the
//! migration network alone leaves the probes answered, and a cut of the
//! service network (or a quiet CPS) leaves the mirror or the link
//! speaking, so neither makes two instances answer. The watcher's own
//! scheduling cannot fake a silence: a reply that came while it slept is
//! read before it decides, and a probe it did not send is not unanswered.
//!
//! Taking over: the output gate opens from the input after the last one
//! mirrored here (whose answer the source is taken to have sent), the
//! input gate delivers every input from there on (numbered here now,
//! after the highest number the source sent), and the service addresses
//! are announced. The link task then registers the service (see
//! `destination`).
use std::{
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    host::netdev::HolderProbe,
    kernel::{
        gate::GateWindow,
        injector::Injector,
        loader::Dataplane,
        logs::{Record, Records, Subscription},
    },
    migration::{hold, protocol::TargetFlow},
};

/// Watches the source of the replica of `service` held here (flow
/// `flow_id`), and takes the service over when the source stops.
pub struct Watch {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// What a replica's watch starts from.
pub struct Watched {
    pub service: String,
    pub flows: Vec<TargetFlow>,
    pub pin_root: PathBuf,
    /// The service interface: probes leave and the announce goes there.
    pub interface: String,
    /// The source's MAC on the service network.
    pub holder: [u8; 6],
    pub failover_after: Duration,
    /// Where the takeover is recorded for `status`.
    pub takeovers: Arc<Mutex<Vec<Takeover>>>,
    /// The inputs a switch floods here for the source's MAC once its
    /// port is down, and the injector that replays them at a takeover
    /// (none: they are missed).
    pub flooded: Option<(Subscription, Injector)>,
}

/// A takeover, as `status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Takeover {
    pub service: String,
    /// How long both paths had been silent when this host decided, µs:
    /// the migration network's silence (the detection time).
    pub silent_us: u64,
    /// The first input whose answers leave from here: the one after the
    /// last the source mirrored.
    pub answers_from: u64,
    /// Inputs mirrored here that the replica had not yet been given (a
    /// gap in the mirror), which no instance answers: named.
    pub lost: Option<String>,
    /// Inputs that reached this host only by a switch's flooding after
    /// the last mirrored one (the source's port was down), replayed to
    /// the replica as the first it answers: late, not missed.
    #[serde(default)]
    pub replayed: u64,
    /// From the decision to the announce sent, µs.
    pub takeover_us: u64,
    pub announced: Vec<IpAddr>,
    /// Why the takeover is incomplete, if it is (the service is this
    /// host's all the same).
    pub error: Option<String>,
}

/// Where a watch stands; its thread and the link task move it on by
/// compare-and-exchange, so that a takeover and the end of the replica
/// (a planned handover, a rollback) never both happen.
const WATCHING: u8 = 0;
const STOPPED: u8 = 1;
const TAKEN_OVER: u8 = 2;

struct Shared {
    epoch: Instant,
    /// µs since `epoch`: the last frame on the peer link, and the last
    /// sign of life by any path.
    link_us: AtomicU64,
    alive_us: AtomicU64,
    state: AtomicU8,
    taken: tokio::sync::Notify,
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }
}

/// How often the watcher looks: an eighth of the failover time, and no
/// more often than every 250 µs.
fn tick(failover_after: Duration) -> Duration {
    (failover_after / 8).max(Duration::from_micros(250))
}

impl Watch {
    /// Starts watching; an error if the probe cannot be opened.
    pub fn start(watched: Watched) -> std::io::Result<Self> {
        // Any of the service's addresses: the source holds them all.
        let address = watched.flows[0].spec.service.ip();
        let probe = HolderProbe::open(&watched.interface, address, watched.holder)?;
        let dataplane = Dataplane::open(&watched.pin_root).map_err(std::io::Error::other)?;
        // Mapped ahead: the takeover is one store away.
        let window = dataplane.gate_window().map_err(std::io::Error::other)?;
        let shared = Arc::new(Shared {
            epoch: Instant::now(),
            link_us: AtomicU64::new(0),
            alive_us: AtomicU64::new(0),
            state: AtomicU8::new(WATCHING),
            taken: tokio::sync::Notify::new(),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("failover".into())
                .spawn(move || watch(&shared, (dataplane, &window), &probe, address, watched))?
        };
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// The source's daemon spoke on the peer link.
    pub fn heard(&self) {
        let now = self.shared.now_us();
        self.shared.link_us.store(now, Ordering::SeqCst);
        self.shared.alive_us.fetch_max(now, Ordering::SeqCst);
    }

    /// Whether this host took the service over.
    pub fn taken_over(&self) -> bool {
        self.shared.state.load(Ordering::SeqCst) == TAKEN_OVER
    }

    /// Ends the watch unless it took over: whether it ended (`false`: the
    /// service is this host's).
    pub fn stop(&self) -> bool {
        let stopped = self.shared.state.compare_exchange(
            WATCHING,
            STOPPED,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        stopped.is_ok() || stopped == Err(STOPPED)
    }

    /// Resolves once this host took the service over.
    pub fn on_takeover(&self) -> impl Future<Output = ()> + use<> {
        let shared = self.shared.clone();
        async move {
            loop {
                // Enabled before the look: a takeover between the two
                // still wakes it.
                let notified = shared.taken.notified();
                let mut notified = std::pin::pin!(notified);
                notified.as_mut().enable();
                if shared.state.load(Ordering::SeqCst) == TAKEN_OVER {
                    return;
                }
                notified.await;
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The watcher thread: see the module's documentation.
fn watch(
    shared: &Shared,
    (mut dataplane, window): (Dataplane, &GateWindow),
    probe: &HolderProbe,
    address: IpAddr,
    mut watched: Watched,
) {
    let flow_id = watched.flows[0].flow_id;
    let tick = tick(watched.failover_after);
    let timing = Timing::of(watched.failover_after, tick);
    let last_seq = |d: &Dataplane| d.sequence(flow_id).map_or(0, |s| s.last_seq);
    let mut seq = last_seq(&dataplane);
    let mut mirror_us = shared.now_us();
    // The probe waiting for its answer, and when the last one was sent.
    let mut unanswered_since: Option<u64> = None;
    let mut probed_us = 0;
    let mut flooded = Flooded::default();
    tracing::info!(service = %watched.service, %address, holder = ?watched.holder,
        failover_after_us = timing.failover_us, "watching the source of the hot replica");
    while shared.state.load(Ordering::SeqCst) == WATCHING {
        std::thread::sleep(tick);
        let now = shared.now_us();
        let current = last_seq(&dataplane);
        if current != seq {
            (seq, mirror_us) = (current, now);
            shared.alive_us.fetch_max(now, Ordering::SeqCst);
        }
        if let Some((subscription, _)) = &mut watched.flooded {
            flooded.take(subscription, current);
        }
        let migration_us = mirror_us.max(shared.link_us.load(Ordering::SeqCst));
        let silent_us = now.saturating_sub(migration_us);
        if silent_us < timing.probe_after_us {
            unanswered_since = None;
            continue;
        }
        match probe.answered() {
            Ok(true) => {
                unanswered_since = None;
                shared.alive_us.fetch_max(now, Ordering::SeqCst);
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(%address, "reading the probe's answers: {e}"),
        }
        let probe_silent = unanswered_since
            .is_some_and(|sent| now.saturating_sub(sent) >= timing.probe_timeout_us);
        if silent_us >= timing.failover_us && probe_silent {
            let decided = shared.state.compare_exchange(
                WATCHING,
                TAKEN_OVER,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
            if decided.is_ok() {
                let takeover = take_over(
                    &mut dataplane,
                    window,
                    &mut watched,
                    flooded,
                    flow_id,
                    silent_us,
                );
                watched.takeovers.lock().unwrap().push(takeover);
                shared.taken.notify_waiters();
            }
            return;
        }
        // One probe at a time, at most one per probe timeout.
        if unanswered_since.is_none() && now.saturating_sub(probed_us) >= timing.probe_timeout_us {
            match probe.send() {
                Ok(()) => (unanswered_since, probed_us) = (Some(now), now),
                Err(e) => tracing::warn!(%address, "probing the source: {e}"),
            }
        }
    }
}

/// When the watcher probes and decides, µs of silence: it probes the
/// service network once the migration network has been silent past half
/// the failover time (and a tick: a control period's jitter is no
/// reason), and takes over at the failover time if a probe has waited
/// the rest of it (at least 500 µs) unanswered. While the mirror flows,
/// the service network sees no probe at all.
struct Timing {
    failover_us: u64,
    probe_after_us: u64,
    probe_timeout_us: u64,
}

impl Timing {
    fn of(failover_after: Duration, tick: Duration) -> Self {
        let failover_us = failover_after.as_micros() as u64;
        let probe_after_us = failover_us / 2 + tick.as_micros() as u64;
        Self {
            failover_us,
            probe_after_us,
            probe_timeout_us: failover_us.saturating_sub(probe_after_us).max(500),
        }
    }
}

/// The inputs flooded to the replica since the last mirrored one: a
/// switch floods the CPS's frames for the source's MAC to every port once
/// the source's port is down, and those the source never got. One that
/// came before a later mirrored input may be one the source got too
/// (flooded while the switch had lost its MAC): it goes.
#[derive(Default)]
struct Flooded(Vec<Record>);

/// Most flooded inputs a takeover replays: a few control periods' worth.
const MAX_FLOODED: usize = 64;

impl Flooded {
    /// Takes what `subscription` has; `last_seq`: the flow's number now.
    fn take(&mut self, subscription: &mut Subscription, last_seq: u64) {
        self.keep(std::iter::from_fn(|| subscription.try_next()), last_seq);
    }

    fn keep(&mut self, records: impl Iterator<Item = Record>, last_seq: u64) {
        for record in records {
            if self.0.len() < MAX_FLOODED {
                self.0.push(record);
            }
        }
        // A flooded record's `seq` is the flow's last number when it came.
        self.0.retain(|r| r.header.seq >= last_seq);
    }
}

/// Makes the service this host's: outputs from the input after the last
/// mirrored, the inputs flooded here since replayed as the next ones, the
/// addresses announced, every later input delivered.
fn take_over(
    dataplane: &mut Dataplane,
    window: &GateWindow,
    watched: &mut Watched,
    mut flooded: Flooded,
    flow_id: u32,
    silent_us: u64,
) -> Takeover {
    let start = Instant::now();
    let mut takeover = Takeover {
        service: watched.service.clone(),
        silent_us,
        answers_from: 0,
        lost: None,
        replayed: 0,
        takeover_us: 0,
        announced: Vec::new(),
        error: None,
    };
    // Each step is taken whatever the one before did: the service is
    // this host's now, and every part of the takeover that can be done is.
    let mut errors = Vec::new();
    match dataplane.sequence(flow_id) {
        Ok(sequence) => {
            let last = sequence.last_seq;
            takeover.answers_from = last + 1;
            window.open_outputs_from(flow_id, last + 1);
            if let Some((subscription, injector)) = &mut watched.flooded {
                flooded.take(subscription, last);
                match replay(injector, flooded, last) {
                    Ok(replayed) => takeover.replayed = replayed,
                    Err(e) => errors.push(format!("replaying the flooded inputs: {e}")),
                }
            }
        }
        Err(e) => errors.push(format!("reading the numbering: {e}")),
    }
    // The CPS's inputs come here from the announce on: the sequenced gate
    // delivers them in order meanwhile, and opens after.
    let addresses = watched.flows.iter().map(|f| f.spec.service.ip());
    match crate::host::netdev::announce(&watched.interface, addresses) {
        Ok(announced) => takeover.announced = announced,
        Err(e) => errors.push(e.to_string()),
    }
    match hold::open(dataplane, flow_id) {
        Ok(lost) => takeover.lost = lost.as_ref().map(hold::name_inputs),
        Err(e) => errors.push(format!("opening the input gate: {e}")),
    }
    takeover.error = (!errors.is_empty()).then(|| errors.join("; "));
    takeover.takeover_us = start.elapsed().as_micros() as u64;
    tracing::warn!(service = %takeover.service, silent_us, answers_from = takeover.answers_from,
        replayed = takeover.replayed, lost = ?takeover.lost, takeover_us = takeover.takeover_us,
        error = ?takeover.error,
        "the source went silent on both networks: this host took the service over");
    takeover
}

/// Replays the `flooded` inputs as the ones after input `last`, in the
/// order they came: how many.
fn replay(
    injector: &mut Injector,
    flooded: Flooded,
    last: u64,
) -> Result<u64, crate::kernel::injector::ReplayError> {
    let replay: Vec<Record> = (last + 1..)
        .zip(flooded.0)
        .map(|(seq, mut record)| {
            record.header.seq = seq;
            record
        })
        .collect();
    for batch in replay.chunks(Injector::BATCH) {
        injector.inject(batch)?;
    }
    Ok(replay.len() as u64)
}

#[cfg(test)]
mod tests {
    use dataplane_common::{RECORD_FLOODED, RecordHeader};

    use super::*;

    fn flooded(last_seq: u64, byte: u8) -> Record {
        Record {
            header: RecordHeader {
                kind: RECORD_FLOODED,
                seq: last_seq,
                ..Default::default()
            },
            frame: vec![byte].into(),
        }
    }

    #[test]
    fn a_probe_has_the_rest_of_the_failover_time_to_be_answered() {
        let ms = Duration::from_millis;
        let timing = Timing::of(ms(2), tick(ms(2)));
        assert_eq!(tick(ms(2)), Duration::from_micros(250));
        assert_eq!(
            (timing.probe_after_us, timing.probe_timeout_us),
            (1250, 750)
        );
        // A decision at the failover time: the first probe's wait ends there.
        assert_eq!(
            timing.probe_after_us + timing.probe_timeout_us,
            timing.failover_us
        );
        // A short failover time gives an answer 500 µs all the same.
        let short = Timing::of(ms(1), tick(ms(1)));
        assert_eq!((short.probe_after_us, short.probe_timeout_us), (750, 500));
    }

    #[test]
    fn only_inputs_flooded_after_the_last_mirrored_one_are_kept_in_order() {
        let mut kept = Flooded::default();
        // Flooded while the source still mirrored (input 7 came after):
        // the source may have got it too.
        kept.keep([flooded(6, 1)].into_iter(), 6);
        kept.keep([flooded(7, 2), flooded(7, 3)].into_iter(), 7);
        let frames: Vec<u8> = kept.0.iter().map(|r| r.frame[0]).collect();
        assert_eq!(frames, [2, 3]);
        // A mirrored input after them: they go too.
        kept.keep(std::iter::empty(), 8);
        assert!(kept.0.is_empty());
        // Never more than a takeover replays.
        kept.keep((0..100).map(|i| flooded(8, i)), 8);
        assert_eq!(kept.0.len(), MAX_FLOODED);
    }
}
