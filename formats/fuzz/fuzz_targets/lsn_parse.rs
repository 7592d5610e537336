//! Arbitrary text into `Lsn::from_str`: no panics; what parses prints and parses back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walferry_formats::Lsn;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(lsn) = s.parse::<Lsn>() {
        let text = lsn.to_string();
        assert_eq!(text.parse::<Lsn>().expect("printed LSN parses"), lsn);
        // The printed form is canonical: upper-case hex, no leading zeros.
        assert_eq!(text.parse::<Lsn>().expect("reparse").to_string(), text);
        assert!(!text.bytes().any(|b| b.is_ascii_lowercase()));
        assert!(text.len() <= 17);
    }
});
