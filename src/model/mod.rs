//! The math of a GPT-2-style byte-level transformer: no threads here.

pub mod activations;
pub mod gemm;
pub mod gpt;
pub mod init;
pub mod kernel;
pub mod layers;
pub mod packed;
pub mod params;
pub mod weights;

pub use activations::Activations;
pub use gpt::{backward, forward};
pub use packed::PackedWeights;
pub use params::{BlockParams, BlockTensors, ParamLayout, TensorSpec};
pub use weights::{load_safetensors, save_safetensors, Model};
