//! What a simulator or gateway receives: decoding a command never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ajour_protocol::decode_command(data);
});
