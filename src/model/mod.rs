//! The math of a GPT-2-style byte-level transformer: no threads here.
//!
//! From the top down: [`gpt`] runs the whole model (forward, backward) as one call per layer
//! of [`layers`], over the flat parameters laid out by [`params`] and the buffers of
//! [`activations`]; the layers' matrix products go through [`gemm`] to cllm's own kernel
//! ([`kernel`], the only GEMM implementation), optionally with weights packed ahead of time
//! ([`packed`]). [`init`] and [`weights`] create, save and load the parameters; [`hf`] reads and writes
//! Hugging Face's `config.json`. Nothing here
//! depends on anything above it in the crate: only the model's shape ([`crate::config`]), the
//! SIMD helpers (`crate::simd`) and the error type.

pub mod activations;
pub mod dropout;
pub mod gemm;
pub mod gpt;
pub mod hf;
pub mod init;
pub mod kernel;
pub mod kv;
pub mod layers;
pub mod packed;
pub mod params;
pub mod weights;

pub use activations::Activations;
pub use gpt::{backward, forward};
pub use packed::PackedWeights;
pub use params::{BlockParams, BlockTensors, ParamLayout, TensorSpec};
pub use weights::{load_safetensors, save_safetensors, Model};
