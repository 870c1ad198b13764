//! The cutover: the destination arms its output gate, the source flips its
//! gate window, and the source's kernel program picks K at the first input
//! numbered after the flip; then the destination announces the service and
//! the source's instance stops.
use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use serde_json::Value;
use tokio::net::TcpStream;

use crate::migration::{
    protocol::{Finished, Step},
    report::MigrationError,
    source::{Migration, Source, step},
};

impl Migration {
    /// Agrees on K with the destination and flips.
    pub(super) async fn cutover(
        &mut self,
        source: &mut Source,
        link: &mut TcpStream,
    ) -> Result<(), MigrationError> {
        let t = self.begin("cutover")?;
        let flow_id = source.flow_id;
        // The destination mutes its outputs until the first input the
        // source forwards past K; the source's kernel program picks K at
        // the first input numbered after the flip. No K is agreed ahead,
        // so no input can slip between an agreement and the flip, however
        // fast inputs come.
        let _: Value = step(
            link,
            &Step::Arm {
                flows: vec![flow_id],
            },
        )
        .await
        .map_err(|e| self.fail(e))?;
        let window = source.dataplane.gate_window().map_err(|e| self.fail(e))?;
        // The last moment to back out if the source's log lost an input.
        source.check_log().map_err(|e| self.fail(e))?;
        // Touch the word first: the flip is timed without the page fault.
        window.set_deliver_until(flow_id, 0);
        let flip = Instant::now();
        window.flip(flow_id);
        self.report.flip_ns = (flip.elapsed().as_nanos() as u64).max(1);
        // The handover happens when the next input arrives. Until then the
        // path must stay as it is: an input reaching the destination
        // directly would be answered by neither instance.
        let waited = Instant::now();
        let limit = Duration::from_millis(self.request.deadline_ms);
        let k = loop {
            if let Some(k) = window.cutover_point(flow_id) {
                break k;
            }
            if waited.elapsed() > limit || self.context.abort.load(Ordering::Relaxed) {
                match window.unflip(flow_id) {
                    Ok(()) => {
                        self.report.flip_ns = 0;
                        return Err(self.fail(format!(
                            "no input arrived within {} ms of the flip",
                            self.request.deadline_ms
                        )));
                    }
                    // An input crossed the flip meanwhile: the cutover stands.
                    Err(k) => break k,
                }
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        self.report.handover_seq = k;
        self.end(t);

        let t = self.begin("announce")?;
        // Inputs above K now go to the destination through the mirror;
        // announcing the address there makes the path direct.
        let _: Value = step(link, &Step::Announce)
            .await
            .map_err(|e| self.fail(e))?;
        source
            .wait_quiet(Duration::from_millis(20), Duration::from_secs(2))
            .await;
        self.end(t);

        let t = self.begin("finish")?;
        for pid in std::iter::once(self.service.pid).chain(self.service.standby_pid) {
            crate::host::tasks::demote(pid);
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let finished: Finished = step(link, &Step::Finish).await.map_err(|e| self.fail(e))?;
        self.report.load.destination_daemon_us = finished.daemon_cpu_us;
        self.report.load.destination_criu_us = finished.criu_cpu_us;
        self.end(t);
        Ok(())
    }
}
