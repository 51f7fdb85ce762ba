//! The 4-byte header that opens an opaque TCP connection, as the receiving
//! sidecar reads it from a peer.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tern_proxy::tcp::header::{self, Status};
use tokio::runtime::Runtime;

static RT: LazyLock<Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
});

fuzz_target!(|data: &[u8]| {
    let read = RT.block_on(header::read(&mut &data[..]));
    match data.first_chunk::<{ header::LEN }>() {
        None => assert!(read.is_err(), "a short header was accepted"),
        Some(h) => {
            let port = read.expect("4 bytes are there to read");
            assert_eq!(port, header::decode(*h));
            if let Some(port) = port {
                assert_ne!(port, 0);
                assert_eq!(
                    header::encode(port),
                    *h,
                    "decode accepted a non-canonical header"
                );
            }
        }
    }
    for &b in data.iter().take(8) {
        if let Some(s) = Status::from_byte(b) {
            assert_eq!(s as u8, b);
            assert!(!s.outcome().is_empty());
        }
    }
});
