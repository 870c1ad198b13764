//! The peer link's frames: `peer::read_frame` on an arbitrary byte stream
//! (first byte: the handshake's limit or the established link's), each
//! frame written back by `peer::write_frame`, and the payload decoders
//! each frame type goes to (hello, migration step and answer, image
//! transfer begin and file header, receipts).
#![no_main]

use std::path::{Component, Path};

use dataplane_fuzz::block_on;
use dataplane_user::{
    migration::protocol,
    peer,
    peer::{Hello, MAGIC, MAX_FRAME, MAX_HELLO, PeerError, VERSION, frame, transfer},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut stream)) = data.split_first() else {
        return;
    };
    let limit = if mode & 1 == 0 { MAX_HELLO } else { MAX_FRAME };
    let mut first = true;
    loop {
        let before = stream;
        match block_on(peer::read_frame(&mut stream, limit)) {
            Ok((kind, payload)) => {
                let used = &before[..before.len() - stream.len()];
                assert_eq!(used.len(), 5 + payload.len());
                assert!(used.len() - 4 <= limit as usize);
                let mut written = Vec::new();
                block_on(peer::write_frame(&mut written, kind, &payload)).expect("under MAX_FRAME");
                assert_eq!(written, used, "a frame writes back to its bytes");
                check_payload(kind, &payload, first);
                first = false;
            }
            Err(PeerError::TooLong(len, max)) => {
                assert_eq!(max, limit);
                assert!(len == 0 || len > limit);
                assert_eq!(before.get(..4), Some(&len.to_be_bytes()[..]));
                return;
            }
            Err(PeerError::Io(e)) => {
                assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
                return;
            }
            Err(e) => panic!("read_frame: {e}"),
        }
    }
});

fn check_payload(kind: u8, payload: &[u8], first: bool) {
    // What the server does with the first frame of a link.
    if first {
        match peer::check_hello(kind, payload) {
            Ok(hello) => {
                assert_eq!(kind, frame::HELLO);
                assert_eq!((hello.magic.as_str(), hello.version), (MAGIC, VERSION));
            }
            Err(PeerError::Garbage(_) | PeerError::Version(_)) => {}
            Err(e) => panic!("check_hello: unexpected error {e}"),
        }
    }
    // Whatever the frame type, a plain name never names a path.
    if let Ok(text) = std::str::from_utf8(payload)
        && let Ok(name) = transfer::plain_name(text)
    {
        assert_single_component(name);
    }
    match kind {
        frame::WELCOME => round_trip::<Hello>(payload),
        frame::IMAGES => {
            if let Ok(migration) = transfer::parse_begin(payload) {
                assert_single_component(&migration);
                assert_single_component(&format!("{migration}.partial"));
            }
        }
        frame::FILE => {
            if let Ok(header) = transfer::parse_file_header(payload) {
                assert_inside_images(&header.name, header.link.as_deref());
                let again = serde_json::to_vec(&header).expect("serializes");
                assert_eq!(transfer::parse_file_header(&again).ok(), Some(header));
            }
        }
        frame::FILE_END => round_trip::<transfer::FileEnd>(payload),
        frame::IMAGES_OK => round_trip::<transfer::Received>(payload),
        frame::MIGRATE => {
            if let Ok(step) = serde_json::from_slice::<protocol::Step>(payload) {
                let again = serde_json::to_vec(&step).expect("serializes");
                serde_json::from_slice::<protocol::Step>(&again).expect("a step parses back");
            }
        }
        // An answer is its value, the step's own error, or garbage.
        frame::MIGRATED => match peer::migration_answer(payload) {
            Ok(_) | Err(PeerError::StepFailed(_) | PeerError::Garbage(_)) => {}
            Err(e) => panic!("migration_answer: unexpected error {e}"),
        },
        _ => {}
    }
}

/// `name` joined to a directory stays in it: exactly one normal component.
fn assert_single_component(name: &str) {
    let components: Vec<_> = Path::new(name).components().collect();
    assert_eq!(
        components,
        [Component::Normal(name.as_ref())],
        "{name:?} is a path"
    );
}

/// A file at `name` (one level deep at most), and the target of a link
/// there, both stay inside the images directory.
fn assert_inside_images(name: &str, link: Option<&str>) {
    let parts: Vec<_> = Path::new(name).components().collect();
    assert!(
        (1..=2).contains(&parts.len()) && parts.iter().all(|c| matches!(c, Component::Normal(_))),
        "{name:?} leaves the images or nests too deep"
    );
    if let Some(target) = link {
        // Resolve it from the link's directory, lexically.
        let mut depth = parts.len() as i64 - 1;
        for component in Path::new(target).components() {
            depth += match component {
                Component::Normal(_) => 1,
                Component::ParentDir => -1,
                other => panic!("{name:?} -> {target:?}: {other:?}"),
            };
            assert!(depth >= 0, "{name:?} -> {target:?} leaves the images");
        }
    }
}

/// A payload that parses as `T` serializes to one that parses to the same.
fn round_trip<T>(payload: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(value) = serde_json::from_slice::<T>(payload) {
        let again = serde_json::to_vec(&value).expect("serializes");
        assert_eq!(serde_json::from_slice::<T>(&again).ok(), Some(value));
    }
}
