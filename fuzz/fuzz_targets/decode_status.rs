//! Any bytes a device (or anyone) sends: decoding never panics, and whatever decodes, the engine
//! answers with a command that encodes and decodes back to itself.
#![no_main]

use ajour_engine::{decide, EngineConfig, FirmwareImage, Target};
use ajour_protocol::{decode_command, decode_status, encode_command};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn image() -> &'static FirmwareImage {
    static IMAGE: OnceLock<FirmwareImage> = OnceLock::new();
    IMAGE.get_or_init(|| FirmwareImage::new("1.0.0", (0..3000u32).map(|i| i as u8).collect::<Vec<_>>()).unwrap())
}

fuzz_target!(|data: &[u8]| {
    if let Ok(status) = decode_status(data) {
        let decision = decide(&status, Target::Ready(image()), &EngineConfig::default());
        let bytes = encode_command(&decision.command);
        assert_eq!(decode_command(&bytes).unwrap(), decision.command);
    }
});
