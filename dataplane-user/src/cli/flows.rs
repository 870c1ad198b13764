//! `dataplane flow` and `dataplane service`: the daemon's flows and services.
use dataplane_user::{
    control::{
        answer::{
            FlowAdded, FlowInfo, FlowRemoved, ServiceRegistered, ServiceStarted,
            ServiceUnregistered, StandbySeeded,
        },
        method::{Call, ServiceName, ServiceStart},
    },
    service::{FlowSpec, Service},
};

use super::{Context, Failure, FlowCommand, ServiceCommand};

pub fn flow(cx: &Context, command: FlowCommand) -> Result<(), Failure> {
    match command {
        FlowCommand::Add { cps, service } => {
            let added: FlowAdded = cx.call(Call::FlowAdd(FlowSpec { cps, service }))?;
            cx.show(&added, |a| println!("flow {}: {}", a.id, a.flow));
        }
        FlowCommand::Rm { cps, service } => {
            let removed: FlowRemoved = cx.call(Call::FlowRemove(FlowSpec { cps, service }))?;
            cx.show(&removed, |r| println!("removed {}", r.removed));
        }
        FlowCommand::Ls => {
            let flows: Vec<FlowInfo> = cx.call(Call::FlowList)?;
            cx.show(&flows, |f| print_flows(f));
        }
    }
    Ok(())
}

pub fn service(cx: &Context, command: ServiceCommand) -> Result<(), Failure> {
    match command {
        ServiceCommand::Add {
            name,
            pid,
            netns,
            flows,
            standby_pid,
            container,
            standby_container,
            runtime,
        } => {
            let service = Service {
                name,
                pid: pid.unwrap_or_default(),
                netns,
                flows: flows
                    .into_iter()
                    .map(|(cps, service)| FlowSpec { cps, service })
                    .collect(),
                standby_pid,
                command: None,
                container,
                standby_container,
                runtime,
                registered: Vec::new(),
            };
            let registered: ServiceRegistered = cx.call(Call::ServiceRegister(service))?;
            cx.show(&registered, |r| println!("registered {}", r.registered));
        }
        ServiceCommand::Start {
            name,
            flows,
            standby,
            command,
            image,
        } => {
            let start = ServiceStart {
                name,
                flows: flows
                    .into_iter()
                    .map(|(cps, service)| FlowSpec { cps, service })
                    .collect(),
                standby,
                command,
                image,
            };
            let started: ServiceStarted = cx.call(Call::ServiceStart(start))?;
            cx.show(&started, |s| {
                let standby = s
                    .standby_pid
                    .map_or(String::new(), |p| format!(", standby {p}"));
                println!("started {}: pid {}{standby}", s.started, s.pid)
            });
        }
        ServiceCommand::Standby { name } => {
            let seeded: StandbySeeded = cx.call(Call::ServiceStandby(ServiceName { name }))?;
            cx.show(&seeded, |s| {
                println!("service {}: standby {}", s.service, s.standby_pid)
            });
        }
        ServiceCommand::Rm { name } => {
            let unregistered: ServiceUnregistered =
                cx.call(Call::ServiceUnregister(ServiceName { name }))?;
            cx.show(&unregistered, |u| {
                println!("unregistered {}", u.unregistered)
            });
        }
        ServiceCommand::Ls => {
            let services: Vec<Service> = cx.call(Call::ServiceList)?;
            cx.show(&services, |s| print_services(s));
        }
    }
    Ok(())
}

pub fn print_flows(rows: &[FlowInfo]) {
    print!("{}", flow_table(rows));
}

/// The flows as a table whose columns line up, however long the addresses.
fn flow_table(rows: &[FlowInfo]) -> String {
    let names: Vec<String> = rows
        .iter()
        .map(|f| format!("{} -> {}", f.cps, f.service))
        .collect();
    let width = names.iter().map(String::len).max().unwrap_or(0).max(4);
    let mut table = format!(
        "{:>4}  {:<width$}  {:>6}  {:>12}  {:>14}\n",
        "id", "flow", "mirror", "last_seq", "last_delivered"
    );
    for (f, name) in rows.iter().zip(&names) {
        table += &format!(
            "{:>4}  {name:<width$}  {:>6}  {:>12}  {:>14}\n",
            f.id,
            if f.mirror { "yes" } else { "no" },
            f.last_seq,
            f.last_delivered
        );
    }
    table
}

pub fn print_services(services: &[Service]) {
    for s in services {
        let flows: Vec<String> = s
            .flows
            .iter()
            .map(|f| format!("{}={}", f.cps, f.service))
            .collect();
        let standby = s.standby_pid.map_or("none".into(), |p| p.to_string());
        println!(
            "service {}: pid {} netns {} standby {standby} flows {}",
            s.name,
            s.pid,
            s.netns.as_deref().unwrap_or("(the daemon's)"),
            flows.join(" ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every line of the table has its columns at the same offsets, for
    /// short and long (IPv6) addresses alike.
    #[test]
    fn flow_columns_line_up() {
        let row = |id, cps: &str, service: &str, mirror, last_seq| FlowInfo {
            id,
            cps: cps.parse().unwrap(),
            service: service.parse().unwrap(),
            mirror,
            last_seq,
            last_delivered: last_seq,
        };
        let table = flow_table(&[
            row(0, "192.0.2.1:4000", "192.0.2.10:5000", true, 7),
            row(
                12,
                "[2001:db8::1]:4000",
                "[2001:db8::10]:5000",
                false,
                123456,
            ),
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines.iter().all(|l| l.len() == lines[0].len()), "{table}");
        let mirror_at = lines[0].find("mirror").unwrap();
        assert_eq!(&lines[1][mirror_at + 3..mirror_at + 6], "yes", "{table}");
        assert_eq!(&lines[2][mirror_at + 4..mirror_at + 6], "no", "{table}");
    }
}
