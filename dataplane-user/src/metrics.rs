//! The `metrics` method: counters and registry sizes in the Prometheus text format.
use std::fmt::Write;

use dataplane_common::counter;

use crate::kernel::loader::Counters;

/// Renders the metrics page.
pub fn render(counters: &Counters, flows: usize, services: usize) -> String {
    let mut out = String::new();
    out.push_str(
        "# HELP dataplane_packets_total Packets by what the kernel programs did with them.\n",
    );
    out.push_str("# TYPE dataplane_packets_total counter\n");
    for (index, name) in counter::NAMES.iter().enumerate() {
        let value = counters.get(index as u32);
        writeln!(out, "dataplane_packets_total{{counter=\"{name}\"}} {value}").unwrap();
    }
    out.push_str(
        "# HELP dataplane_flows CPS flows in the flow map.\n# TYPE dataplane_flows gauge\n",
    );
    writeln!(out, "dataplane_flows {flows}").unwrap();
    out.push_str(
        "# HELP dataplane_services Registered services.\n# TYPE dataplane_services gauge\n",
    );
    writeln!(out, "dataplane_services {services}").unwrap();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_counter() {
        let mut counters = Counters::default();
        counters.0[counter::CAPTURED as usize] = 42;
        let page = render(&counters, 3, 1);
        assert!(page.contains("dataplane_packets_total{counter=\"captured\"} 42\n"));
        assert!(page.contains("dataplane_flows 3\n"));
        assert_eq!(
            page.matches("dataplane_packets_total{").count(),
            counter::COUNT as usize
        );
    }
}
