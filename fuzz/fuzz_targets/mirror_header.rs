//! The mirror header and the log records: `dataplane_common::parse_mirror_frame`
//! (the receiver's rules of docs/mirror-header.md) on arbitrary frames, each
//! accepted header re-encoded by `MirrorHeader::to_wire` and by the encoder
//! the senders use (`mirror_headers`); `logs::Record::parse` on arbitrary
//! ring-buffer items; and a parsed record, sent as a replay the way
//! `injector::Injector` builds it, parsing back to itself.
#![no_main]

use dataplane_common::{
    CaptureMeta, ETH_P_MIRROR, MAX_SEQ, MIRROR_FLAG_REPLAY, MIRROR_OVERHEAD,
    MIRROR_VERSION, MirrorHeader, MirrorRefusal, RecordHeader, mirror_headers, parse_mirror_frame,
};
use dataplane_user::kernel::logs::Record;
use libfuzzer_sys::fuzz_target;

const OVERHEAD: usize = MIRROR_OVERHEAD as usize;
const RECORD_HEADER: usize = size_of::<RecordHeader>();

fuzz_target!(|data: &[u8]| {
    check_mirror_frame(data);
    if let Some(record) = check_record(data) {
        check_replay(&record);
    }
});

fn check_mirror_frame(data: &[u8]) {
    match parse_mirror_frame(data) {
        Ok((header, inner)) => {
            assert_eq!(&data[12..14], ETH_P_MIRROR.to_be_bytes());
            assert_eq!(header.version, MIRROR_VERSION);
            assert_eq!(header.header_len as usize, OVERHEAD - 14);
            assert!(header.frame_len >= 14);
            assert!(header.seq != 0 || header.flags & MIRROR_FLAG_REPLAY == 0);
            assert!(header.seq <= MAX_SEQ);
            assert_eq!(inner, &data[OVERHEAD..OVERHEAD + header.frame_len as usize]);
            assert_eq!(header.to_wire(), data[14..OVERHEAD]);
            // The senders' encoder writes the same bytes but for flags and
            // the reserved word, which it leaves 0.
            let macs = (
                data[0..6].try_into().unwrap(),
                data[6..12].try_into().unwrap(),
            );
            let meta = CaptureMeta {
                flow_id: header.flow_id,
                seq: header.seq,
                timestamp_ns: header.timestamp_ns,
                ..Default::default()
            };
            let mut expected = data[..OVERHEAD].to_vec();
            expected[16..18].fill(0);
            expected[42..46].fill(0);
            assert_eq!(
                mirror_headers(macs, &meta, header.frame_len),
                &expected[..]
            );
        }
        Err(refusal) => {
            let why = if data.len() < OVERHEAD {
                MirrorRefusal::Short
            } else if data[12..14] != ETH_P_MIRROR.to_be_bytes() {
                MirrorRefusal::EtherType
            } else {
                let header = MirrorHeader::from_wire(data[14..OVERHEAD].try_into().unwrap());
                if header.version != MIRROR_VERSION {
                    MirrorRefusal::Version
                } else if header.header_len as usize != OVERHEAD - 14 {
                    MirrorRefusal::HeaderLen
                } else if header.frame_len < 14 || header.frame_len as usize > data.len() - OVERHEAD
                {
                    MirrorRefusal::FrameLen
                } else if header.seq > MAX_SEQ {
                    MirrorRefusal::Seq
                } else {
                    MirrorRefusal::UnnumberedReplay
                }
            };
            assert_eq!(refusal, why);
        }
    }
}

fn header_bytes(header: &RecordHeader) -> &[u8] {
    // SAFETY: RecordHeader is #[repr(C)] plain integers without padding.
    unsafe { std::slice::from_raw_parts((header as *const RecordHeader).cast(), RECORD_HEADER) }
}

fn check_record(data: &[u8]) -> Option<Record> {
    match Record::parse(data) {
        Ok(record) => {
            let h = record.header;
            assert_eq!(header_bytes(&h), &data[..RECORD_HEADER]);
            assert!(h.captured_len <= h.frame_len);
            assert_eq!(record.frame.len(), h.captured_len as usize);
            assert_eq!(
                &record.frame[..],
                &data[RECORD_HEADER..RECORD_HEADER + h.captured_len as usize]
            );
            Some(record)
        }
        Err(_) => {
            if let Some(raw) = data.get(..RECORD_HEADER) {
                // SAFETY: as above; raw holds RECORD_HEADER bytes.
                let h = unsafe { raw.as_ptr().cast::<RecordHeader>().read_unaligned() };
                assert!(
                    h.captured_len > h.frame_len
                        || RECORD_HEADER + h.captured_len as usize > data.len()
                );
            }
            None
        }
    }
}

/// A logged input as `injector::Injector::inject` sends it through the gate:
/// the receiver gets back the record's number, time, flow and bytes.
fn check_replay(record: &Record) {
    let h = record.header;
    let frame = dataplane_user::kernel::injector::replay_frame([2, 0, 0, 0, 0, 2], record);
    match parse_mirror_frame(&frame) {
        Ok((header, inner)) => {
            assert_eq!(
                (header.flow_id, header.seq, header.timestamp_ns),
                (h.flow_id, h.seq, h.timestamp_ns)
            );
            assert_eq!(header.flags, MIRROR_FLAG_REPLAY);
            assert_eq!(inner, &record.frame[..]);
        }
        Err(MirrorRefusal::FrameLen) => assert!(record.frame.len() < 14),
        Err(MirrorRefusal::UnnumberedReplay) => assert_eq!(h.seq, 0),
        Err(MirrorRefusal::Seq) => assert!(h.seq > MAX_SEQ),
        Err(e) => panic!("a replay of {h:?} refused: {e:?}"),
    }
}
