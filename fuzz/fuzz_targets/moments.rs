//! The checkpoint's optimizer-state loader (`state.safetensors`) on arbitrary bytes, for the
//! tiny model's parameter count: an error or valid moments, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let n = cllm::config::ModelConfig::tiny().num_params();
    if let Ok((m, v)) = cllm::checkpoint::deserialize_moments(data, n) {
        assert!(m.len() == n && v.len() == n);
        assert!(m.iter().all(|x| x.is_finite()) && v.iter().all(|x| x.is_finite() && *x >= 0.0));
    }
});
