//! The `metrics` method: counters and registry sizes in the Prometheus
//! (OpenMetrics) text format, written by `prometheus-client`.
use dataplane_common::counter;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, text::encode},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::kernel::loader::Counters;

/// Renders the metrics page.
pub fn render(counters: &Counters, flows: usize, services: usize) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Packets(counters.clone())));
    registry.register(
        "dataplane_flows",
        "CPS flows in the flow map",
        ConstGauge::new(flows as i64),
    );
    registry.register(
        "dataplane_services",
        "Registered services",
        ConstGauge::new(services as i64),
    );
    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String");
    out
}

/// `dataplane_packets_total{counter="NAME"}`, in the kernel counters' order.
#[derive(Debug)]
struct Packets(Counters);

impl Collector for Packets {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "dataplane_packets",
            "Packets by what the kernel programs did with them.",
            None,
            MetricType::Counter,
        )?;
        for (index, name) in counter::NAMES.iter().enumerate() {
            let value = ConstCounter::new(self.0.get(index as u32));
            value.encode(family.encode_family(&[("counter", *name)])?)?;
        }
        Ok(())
    }
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
        assert!(page.contains("dataplane_services 1\n"));
        assert_eq!(
            page.matches("dataplane_packets_total{").count(),
            counter::COUNT as usize
        );
    }
}
