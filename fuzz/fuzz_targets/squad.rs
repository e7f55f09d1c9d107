//! The SQuAD reader on arbitrary bytes: text and counts, or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((text, stats)) = cllm::data::squad_to_text(data) {
        assert_eq!(text.len() as u64, stats.bytes);
    }
});
