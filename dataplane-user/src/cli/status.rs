//! `dataplane status`, `metrics` and `ping`: the daemon's view of itself.
use std::net::SocketAddr;

use dataplane_user::control::method::{Call, PeerAddress};
use serde_json::Value;

use super::{
    Context, Failure,
    flows::{print_flows, print_services},
};

pub fn status(cx: &Context) -> Result<(), Failure> {
    cx.show(cx.call(Call::Status)?, print_status);
    Ok(())
}

pub fn metrics(cx: &Context) -> Result<(), Failure> {
    let page = cx.call(Call::Metrics)?;
    print!("{}", page.as_str().unwrap_or_default());
    Ok(())
}

pub fn ping(cx: &Context, address: SocketAddr) -> Result<(), Failure> {
    let pong = cx.call(Call::PeerPing(PeerAddress { address }))?;
    cx.show(pong, |v| {
        println!(
            "peer {} (protocol {}) answered in {} us",
            v["host"].as_str().unwrap_or("?"),
            v["version"],
            v["rtt_us"]
        )
    });
    Ok(())
}

fn print_status(v: &Value) {
    println!(
        "dataplane {}  pinned at {}  {}  up {} s",
        v["version"].as_str().unwrap_or("?"),
        v["pin_root"].as_str().unwrap_or("?"),
        if v["adopted"] == true {
            "re-adopted"
        } else {
            "loaded"
        },
        v["uptime_s"]
    );
    println!(
        "interfaces: service {}  peer {}",
        v["interfaces"]["service"], v["interfaces"]["peer"]
    );
    let programs: Vec<&str> = v["programs"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    println!("programs: {}", programs.join(" "));
    print_flows(&v["flows"]);
    print_services(&v["services"]);
    println!("counters:");
    if let Some(counters) = v["counters"].as_object() {
        for (name, value) in counters {
            println!("  {name:>18} {value}");
        }
    }
}
