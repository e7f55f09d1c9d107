//! The safetensors model loader on arbitrary bytes: an error or a model, never a panic, and
//! never a parameter buffer larger than the input.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(model) = cllm::model::weights::deserialize_safetensors(data) {
        assert!(model.params.len() * 4 <= data.len());
        assert!(model.params.iter().all(|x| x.is_finite()));
    }
});
