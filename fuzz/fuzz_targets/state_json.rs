//! `state.json` on arbitrary bytes: the checksummed parse, and the value checks on whatever
//! parses as a state (without its checksum, so mutations reach them).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cllm::checkpoint::parse_state(data);
    if let Ok(state) = serde_json::from_slice::<cllm::checkpoint::TrainState>(data) {
        if cllm::checkpoint::check_state(&state).is_ok() {
            assert!(state.adam_t <= state.step && state.step <= state.options.steps);
            assert!(state.options.batch <= cllm::train::options::MAX_BATCH);
        }
    }
});
