//! # cllm
//!
//! Train small GPT-2-style byte-level language models on the CPU with many worker threads
//! ("spheres"), bit-for-bit deterministic at any thread count, with the concurrency protocol
//! model-checked by loom and shuttle.
//!
//! Module map:
//! - [`config`]: model shapes and presets (`tiny`, `small`, `seed`).
//! - [`model`]: the math, no threads: flat parameter buffer with named views, per-layer
//!   forward/backward pairs, per-worker activations, initialisation, safetensors weights.
//! - [`optim`]: AdamW. [`grad`]: gradient scan (NaN/Inf + norm in one pass), clip, scale.
//! - [`simd`]: the SIMD path (AVX-512, AVX2 or portable), chosen once from the CPU and
//!   `CLLM_SIMD`, and the run-time dispatch every vectorized loop goes through.
//! - [`sync`]: the synchronization backend the protocol code is generic over (std; loom and
//!   shuttle behind features).
//! - [`train`]: persistent workers, the step barrier, the four strategies, the training loop.
//! - [`data`]: text and SQuAD input, train/validation split, seeded batch sampling.
//! - [`checkpoint`]: atomic checkpoints with exact resume.
//! - [`memory`]: the memory plan of a run, checked against the memory available before
//!   anything is allocated.
//! - [`signals`]: SIGINT/SIGTERM/SIGHUP as a stop request the training loop checks.
//! - [`generate`]: sampling text from a model.
//! - [`tokenizer`]: Hugging Face `tokenizer.json` files: byte-level BPE training, encode, decode.
//! - [`bench`]: the scaling matrix and its report.
//! - [`cli`]: the `cllm` command line.

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod dist;
pub mod error;
pub mod generate;
pub mod grad;
pub mod memory;
pub mod model;
mod names;
pub mod optim;
pub mod signals;
pub mod simd;
pub mod sync;
pub mod tokenizer;
pub mod train;

pub use config::ModelConfig;
pub use error::{Error, Result};
