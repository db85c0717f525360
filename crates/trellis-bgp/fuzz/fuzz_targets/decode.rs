//! Any bytes from a peer: the decoder returns a message, "need more", or the NOTIFICATION to
//! send — never a panic — and whatever decodes re-encodes and decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_bgp::message::{decode, MAX_LEN};
use trellis_bgp::Context;

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let ctx = Context {
        four_octet_as: data[0] & 1 == 1,
        ibgp: data[0] & 2 == 2,
    };
    let bytes = &data[1..];
    if let Ok(Some((m, _))) = decode(bytes, ctx, MAX_LEN) {
        let again = m.encode(ctx);
        if again.len() <= MAX_LEN {
            let (m2, _) = decode(&again, ctx, MAX_LEN)
                .expect("re-encoded message decodes")
                .expect("complete");
            assert_eq!(m2.encode(ctx), again, "encoding is stable");
        }
    }
});
