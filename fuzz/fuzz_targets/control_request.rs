//! The control socket's request path: the line reader (`control::read_line`)
//! and the request parser (`control::parse_request`) on arbitrary client
//! bytes, and the CLI's parse of a response line.
#![no_main]

use dataplane_fuzz::block_on;
use dataplane_user::control::{
    self, Response, code,
    server::{self, Line},
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    // The reader splits the input at each newline, whatever its buffer
    // size; a line over MAX_LINE reads as too long.
    let capacity = 1 + data.len() % 13;
    let mut reader = tokio::io::BufReader::with_capacity(capacity, data);
    let mut lines = Vec::new();
    loop {
        match block_on(server::read_line(&mut reader)).expect("reading a slice") {
            Line::Text(text) => lines.push(Some(text)),
            Line::TooLong => lines.push(None),
            Line::Closed => break,
            // Only after MAX_SKIP bytes without a newline; inputs are shorter.
            Line::Endless => panic!("{} bytes read as endless", data.len()),
        }
    }
    let mut expected: Vec<Option<&[u8]>> = data
        .split(|&b| b == b'\n')
        .map(|line| (line.len() <= server::MAX_LINE).then_some(line))
        .collect();
    if data.is_empty() || data.ends_with(b"\n") {
        expected.pop();
    }
    assert_eq!(
        lines.iter().map(Option::as_deref).collect::<Vec<_>>(),
        expected
    );

    for line in lines.iter().flatten() {
        check_request(line);
    }
    check_response(data);
});

/// A request line parses to a JSON-RPC 2.0 request, or to the error reply
/// the daemon sends, which the client reads back as that error.
fn check_request(line: &[u8]) {
    let json = serde_json::from_slice::<Value>(line).ok();
    match control::parse_request(line) {
        Ok(request) => {
            assert_eq!(request.jsonrpc, "2.0");
            assert!(json.is_some_and(|v| v.is_object()));
        }
        Err(reply) => {
            let error = reply
                .error
                .as_ref()
                .expect("an error reply carries an error");
            assert!(reply.result.is_none());
            match &json {
                None => {
                    assert_eq!(error.code, code::PARSE_ERROR);
                    assert!(reply.id.is_null());
                }
                Some(value) => {
                    assert_eq!(error.code, code::INVALID_REQUEST);
                    assert_eq!(Some(&reply.id), value.get("id").or(Some(&Value::Null)));
                }
            }
            let text = reply.line();
            let (body, newline) = text.split_at(text.len() - 1);
            assert!(
                newline == "\n" && !body.contains('\n'),
                "one line: {text:?}"
            );
            let back: Response = serde_json::from_str(body).expect("a reply parses back");
            assert_eq!(back.error.as_ref(), Some(error));
        }
    }
}

/// What the CLI's client does with a line from the daemon: a response that
/// parses serializes to one line that parses back to the same outcome.
fn check_response(data: &[u8]) {
    let Ok(response) = serde_json::from_slice::<Response>(data) else {
        return;
    };
    let text = response.line();
    let back: Response = serde_json::from_str(&text).expect("a response line parses back");
    assert_eq!(back.result.is_some(), response.result.is_some());
    assert_eq!(
        back.error.as_ref().map(|e| (e.code, &e.message)),
        response.error.as_ref().map(|e| (e.code, &e.message))
    );
}
