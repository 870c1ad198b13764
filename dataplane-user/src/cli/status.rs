//! `dataplane status`, `metrics` and `ping`: the daemon's view of itself.
use std::net::SocketAddr;

use dataplane_user::{
    control::{
        answer::{PeerPong, Status},
        method::{Call, PeerAddress},
    },
    report::State,
};

use super::{
    Context, Failure,
    flows::{print_flows, print_services},
};

pub fn status(cx: &Context) -> Result<(), Failure> {
    let status: Status = cx.call(Call::Status)?;
    cx.show(&status, print_status);
    Ok(())
}

pub fn metrics(cx: &Context) -> Result<(), Failure> {
    let page: String = cx.call(Call::Metrics)?;
    print!("{page}");
    Ok(())
}

pub fn ping(cx: &Context, address: SocketAddr) -> Result<(), Failure> {
    let pong: PeerPong = cx.call(Call::PeerPing(PeerAddress { address }))?;
    cx.show(&pong, |p| {
        println!(
            "peer {} (protocol {}) answered in {} us",
            p.host, p.version, p.rtt_us
        )
    });
    Ok(())
}

fn print_status(s: &Status) {
    println!(
        "dataplane {}  pinned at {}  {}  up {} s",
        s.version,
        s.pin_root.display(),
        if s.adopted { "re-adopted" } else { "loaded" },
        s.uptime_s
    );
    println!(
        "interfaces: service {}  peer {}",
        s.interfaces.service,
        s.interfaces.peer.as_deref().unwrap_or("none")
    );
    if let Some(listen) = s.peer_listen {
        println!("peer link: listening on {listen}");
    }
    match &s.peer_key {
        Some(key) => println!("peer link: sealed, this host's key {key}"),
        None if !s.peers.is_empty() => println!("peer link: INSECURE (peer_insecure), in clear"),
        None => {}
    }
    if !s.peers.is_empty() {
        println!("peers: {}", s.peers.join(" "));
    }
    println!("programs: {}", s.programs.join(" "));
    print_flows(&s.flows);
    print_services(&s.services);
    let replicas: Vec<_> = s
        .migrations
        .iter()
        .filter(|m| m.state == State::Running)
        .filter_map(|m| Some((m, m.replica.as_ref()?)))
        .collect();
    if !replicas.is_empty() {
        println!("hot replicas:");
    }
    for (m, r) in replicas {
        println!(
            "  {} of {} at {}: {}, {} outputs compared up to input {}, lag {} inputs, \
             {} re-syncs, {}{}",
            m.id,
            m.service,
            m.to,
            r.state.name(),
            r.compared,
            r.compared_up_to,
            r.lag,
            r.resyncs,
            match r.failover_after_ms {
                0 => "no failover".to_string(),
                ms => format!("failover after {ms} ms"),
            },
            r.mismatch
                .as_ref()
                .map(|m| format!("; mismatch at {m}"))
                .unwrap_or_default()
        );
    }
    if !s.takeovers.is_empty() {
        println!("taken over:");
    }
    for t in &s.takeovers {
        println!(
            "  {}: after {:.1} ms of silence, answering from input {} ({} us to announce {:?}){}{}",
            t.service,
            t.silent_us as f64 / 1000.0,
            t.answers_from,
            t.takeover_us,
            t.announced,
            t.lost
                .as_ref()
                .map(|l| format!("; {l} lost"))
                .unwrap_or_default(),
            t.error
                .as_ref()
                .map(|e| format!("; {e}"))
                .unwrap_or_default()
        );
    }
    println!("counters:");
    for (name, value) in &s.counters {
        println!("  {name:>18} {value}");
    }
}
