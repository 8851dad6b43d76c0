//! The API socket's HTTP/1.1 parser and router, over one client's byte stream: every request the
//! bytes hold is parsed, routed and answered until the connection would close.
#![no_main]

use std::io::{Cursor, Read, Write};

use libfuzzer_sys::fuzz_target;
use vmm::api::http::Response;
use vmm::api::routes::Routed;
use vmm::api::serve_connection;

/// A client that sends `input` and swallows the responses.
struct Client<'a> {
    input: Cursor<&'a [u8]>,
    responses: usize,
}

impl Read for Client<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Client<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.responses += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let client = Client {
        input: Cursor::new(data),
        responses: 0,
    };
    // Actions would go to the VMM thread; here they succeed without a VM.
    serve_connection(client, |routed| match routed {
        Routed::Reply(r) => r,
        Routed::Action(_) => Response::no_content(),
    });
});
