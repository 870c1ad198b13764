//! CRIU's RPC messages (`criu::proto`, prost): arbitrary bytes from the
//! `criu swrk` socket decode as a `Resp` or fail with a decode error, and a
//! decoded message re-encodes to bytes that decode to the same message.
//! The driver's own requests (`Req`) are checked the same way.
#![no_main]

use dataplane_user::criu::proto::{Req, ReqType, Resp};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(resp) = Resp::decode(data) {
        round_trip(&resp);
        // What `criu::exchange` reads from a response.
        let _kind = ReqType::try_from(resp.r#type).unwrap_or(ReqType::Empty);
        let _script = resp.notify.as_ref().and_then(|n| n.script.as_deref());
        let _pid = resp.restore.as_ref().map(|r| r.pid as u32);
    }
    if let Ok(req) = Req::decode(data) {
        round_trip(&req);
    }
    // A length-delimited message, as a stream of them would be read.
    if let Ok(resp) = Resp::decode_length_delimited(data) {
        round_trip(&resp);
    }
});

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(message: &M) {
    let bytes = message.encode_to_vec();
    assert_eq!(bytes.len(), message.encoded_len());
    let again = M::decode(bytes.as_slice()).expect("a re-encoded message decodes");
    assert_eq!(&again, message, "decode(encode(m)) != m");
    assert_eq!(again.encode_to_vec(), bytes, "encoding is stable");
}
