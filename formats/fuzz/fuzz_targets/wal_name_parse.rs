//! Arbitrary text into `WalFileName::parse` for every segment size: no panics, and
//! whatever parses is canonical (formats back to the same text) and parses again the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walferry_formats::{SegmentSize, WalFileName};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    for shift in 20..=30 {
        let size = SegmentSize::new(1u64 << shift).expect("valid segment size");
        if let Ok(name) = WalFileName::parse(s, size) {
            let text = name.format(size);
            assert_eq!(text, s, "parsed name is not canonical");
            assert_eq!(
                WalFileName::parse(&text, size).expect("formatted name parses"),
                name
            );
            assert_ne!(name.timeline().0, 0, "timeline 0 does not exist");
        }
    }
});
