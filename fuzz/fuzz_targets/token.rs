#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chinwag_fuzz::token(data));
