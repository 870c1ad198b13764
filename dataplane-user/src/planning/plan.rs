//! `dataplane plan`'s predictions: every method for one service, from its
//! measured size and input rate and this host's calibration.
use serde::Serialize;

use crate::{
    planning::{
        model::{Calibration, Method, Prediction, Workload},
        policy::StopPolicy,
    },
    service::Service,
};

/// What `dataplane plan` found and predicts.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub service: String,
    pub pid: u32,
    /// The serving instance's resident anonymous memory, M.
    pub state_bytes: u64,
    pub standby_pid: Option<u32>,
    pub standby_state_bytes: Option<u64>,
    pub workload: Workload,
    /// Stop-and-copy, pre-copy, leave-running and standby, in that order.
    pub predictions: Vec<Prediction>,
}

impl Plan {
    /// Predicts every method for `service`, whose instance holds
    /// `state_bytes` (its standby `standby_state_bytes`) under `workload`.
    pub fn predict(
        service: &Service,
        state_bytes: u64,
        standby_state_bytes: Option<u64>,
        workload: Workload,
        calibration: &Calibration,
    ) -> Self {
        let rounds = calibration.precopy_rounds(&workload, StopPolicy::default().max_rounds);
        let predictions = [
            Method::StopAndCopy,
            Method::PreCopy { rounds },
            Method::LeaveRunning,
            Method::Standby,
        ]
        .into_iter()
        .map(|method| {
            // Standby mode checkpoints the standby: its size counts.
            let work = match (method, standby_state_bytes) {
                (Method::Standby, Some(m)) => Workload {
                    state_bytes: m as f64,
                    ..workload
                },
                _ => workload,
            };
            calibration.predict(method, &work)
        })
        .collect();
        Self {
            service: service.name.clone(),
            pid: service.pid,
            state_bytes,
            standby_pid: service.standby_pid,
            standby_state_bytes,
            workload,
            predictions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planning::model::{CriuCosts, Line};

    /// Standby mode checkpoints the standby: a 64 MiB standby beside a
    /// 1 MiB instance makes standby's image (and only standby's) 64 MiB.
    #[test]
    fn the_standby_method_is_sized_by_the_standby() {
        let mib = 1048576.0;
        let calibration = Calibration {
            criu: CriuCosts {
                dump: Line {
                    fixed: 80e3,
                    slope: 1e-3,
                },
                frozen: Line {
                    fixed: 40e3,
                    slope: 1e-3,
                },
                image: Line {
                    fixed: 0.0,
                    slope: 1.0,
                },
                copy: Line {
                    fixed: 2e3,
                    slope: 1e-4,
                },
                restore: Line {
                    fixed: 65e3,
                    slope: 1e-3,
                },
                check_us: 0.0,
            },
            ..Calibration::default()
        };
        let service = Service {
            name: "plc".into(),
            pid: 10,
            netns: None,
            flows: Vec::new(),
            standby_pid: Some(11),
            command: None,
            container: None,
            standby_container: None,
            runtime: Default::default(),
            registered: Vec::new(),
        };
        let workload = Workload {
            state_bytes: mib,
            dirty_rate: 0.0,
            input_rate: 1000.0,
        };
        let plan = Plan::predict(&service, 1 << 20, Some(64 << 20), workload, &calibration);
        let methods: Vec<Method> = plan.predictions.iter().map(|p| p.method).collect();
        assert_eq!(methods[0], Method::StopAndCopy);
        assert_eq!(methods[2..], [Method::LeaveRunning, Method::Standby]);
        let image = |m: Method| {
            plan.predictions
                .iter()
                .find(|p| p.method == m)
                .unwrap()
                .image_bytes
        };
        assert_eq!(image(Method::StopAndCopy), mib);
        assert_eq!(image(Method::LeaveRunning), mib);
        assert_eq!(image(Method::Standby), 64.0 * mib);
        assert_eq!((plan.pid, plan.standby_pid), (10, Some(11)));
    }
}
