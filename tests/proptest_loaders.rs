//! The loaders on damaged and hostile bytes: the model loader (safetensors), the checkpoint
//! loader (`state.json` and the Adam moments) and the SQuAD reader. Arbitrary bytes,
//! truncation at every offset of a real file, bit flips, huge declared sizes, wrong dtypes,
//! NaN weights and duplicate names: each gives `Ok` or `Err`, never a panic, and never
//! allocates more than a small multiple of its input (measured by the counting allocator
//! below; each call runs on one thread, so the count of that thread is the call's).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use cllm::checkpoint::{check_state, deserialize_moments, parse_state};
use cllm::config::ModelConfig;
use cllm::data::squad_to_text;
use cllm::model::weights::deserialize_safetensors;
use proptest::prelude::*;
use safetensors::tensor::Dtype;

mod common;
use common::{tensor_bytes, tensor_parts};

/// Counts the live and peak heap bytes of each thread.
struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is System's; the thread-local counters are const-initialised `Cell`s
// without destructors, whose access never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let _ = LIVE.try_with(|l| {
                l.set(l.get() + layout.size());
                let _ = PEAK.try_with(|pk| pk.set(pk.get().max(l.get())));
            });
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        let _ = LIVE.try_with(|l| l.set(l.get().saturating_sub(layout.size())));
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result and the peak heap growth of this thread during it.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, PEAK.with(Cell::get) - base)
}

/// The loaders' allowance: a small multiple of the input plus a fixed 256 KiB for headers,
/// names and messages.
fn assert_bounded(what: &str, peak: usize, input: usize) {
    assert!(peak <= 3 * input + (256 << 10), "{what}: {peak} bytes allocated for {input} bytes of input");
}

fn model_bytes() -> Vec<u8> {
    std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny_reference.safetensors")).unwrap()
}

const CKPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/checkpoints/segmented-step-000003");

fn load_model(bytes: &[u8]) -> bool {
    let (r, peak) = peak_of(|| deserialize_safetensors(bytes));
    assert_bounded("model loader", peak, bytes.len());
    if let Ok(m) = &r {
        assert!(m.params.iter().all(|x| x.is_finite()));
    }
    r.is_ok()
}

fn load_moments(bytes: &[u8]) -> bool {
    let n = ModelConfig::tiny().num_params();
    let (r, peak) = peak_of(|| deserialize_moments(bytes, n));
    assert_bounded("moments loader", peak, bytes.len());
    if let Ok((_, v)) = &r {
        assert!(v.iter().all(|x| *x >= 0.0));
    }
    r.is_ok()
}

fn load_state(bytes: &[u8]) -> bool {
    let (r, peak) = peak_of(|| parse_state(bytes).map(|s| check_state(&s).is_ok()));
    assert_bounded("state.json loader", peak, bytes.len());
    matches!(r, Ok(true))
}

/// The SQuAD reader keeps the input, the output and one paragraph: bounded by both.
fn read_squad(bytes: &[u8]) -> bool {
    let (r, peak) = peak_of(|| squad_to_text(bytes));
    let out = r.as_ref().map_or(0, |(t, _)| t.len());
    assert!(peak <= 3 * (bytes.len() + out) + (256 << 10), "squad: {peak} bytes for {} in, {out} out", bytes.len());
    r.is_ok()
}

/// `state.json` of the fixture checkpoint with `edit` applied and its checksum recomputed.
fn resigned_state(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    common::resign_state_json(&std::fs::read(format!("{CKPT}/state.json")).unwrap(), edit)
}

#[test]
fn the_real_files_load_and_every_truncation_of_them_is_an_error() {
    let model = model_bytes();
    assert!(load_model(&model));
    let (_, peak) = peak_of(|| deserialize_safetensors(&model));
    assert!(peak >= model.len() * 9 / 10, "the counter sees the parameter buffer: {peak} bytes");
    for len in 0..model.len() {
        assert!(!load_model(&model[..len]), "model truncated to {len} bytes loaded");
    }
    let moments = std::fs::read(format!("{CKPT}/state.safetensors")).unwrap();
    assert!(load_moments(&moments));
    // Every offset in the header, then every 4th in the data (a cut inside an f32 is the same
    // failure as one at its start: the lengths no longer match).
    let header_end = 8 + u64::from_le_bytes(moments[..8].try_into().unwrap()) as usize;
    for len in (0..header_end).chain((header_end..moments.len()).step_by(4)) {
        assert!(!load_moments(&moments[..len]), "moments truncated to {len} bytes loaded");
    }
    let state = std::fs::read(format!("{CKPT}/state.json")).unwrap();
    assert!(load_state(&state));
    for len in 0..state.len() - 1 {
        assert!(!load_state(&state[..len]), "state.json truncated to {len} bytes loaded");
    }
    for name in ["v11_pretty.json", "pt_excerpt.json"] {
        let squad = std::fs::read(format!("{}/tests/fixtures/squad/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert!(read_squad(&squad));
        for len in 0..squad.len() {
            read_squad(&squad[..len]);
        }
    }
}

#[test]
fn absurd_declared_shapes_are_refused_without_allocating_them() {
    let (list, meta) = tensor_parts(&model_bytes());
    let c: serde_json::Value = serde_json::from_str(&meta["cllm.config"]).unwrap();
    for field in ["layers", "heads", "embed", "context", "vocab"] {
        for v in [0u64, 3, 1 << 20, 1 << 31, 1_000_000_000_000, u64::MAX] {
            let mut c = c.clone();
            c[field] = v.into();
            let mut meta = meta.clone();
            meta.insert("cllm.config".into(), c.to_string());
            assert!(!load_model(&tensor_bytes(&list, &meta)), "{field} = {v} loaded");
        }
    }
    // A header length past the end of the file, and a header that declares a tensor the data
    // does not hold.
    let mut bytes = model_bytes();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(!load_model(&bytes));
    let mut big = list.clone();
    big[0].2 = vec![1 << 40];
    let mut header = tensor_bytes(&list, &meta);
    let text = String::from_utf8_lossy(&header).into_owned();
    let shape = format!("{:?}", list[0].2).replace(' ', "");
    if let Some(pos) = text.find(&shape) {
        header.splice(pos..pos + shape.len(), b"[1099511627776]".iter().copied());
        assert!(!load_model(&header));
    }
}

#[test]
fn wrong_dtypes_nan_weights_and_duplicate_names_are_refused() {
    let (list, meta) = tensor_parts(&model_bytes());
    for i in 0..list.len() {
        for dtype in [Dtype::F16, Dtype::I32, Dtype::U8, Dtype::F64] {
            let mut l = list.clone();
            let (_, d, sh, data) = &mut l[i];
            *d = dtype;
            // Keep the byte length consistent with the shape for the new element size.
            let n = data.len() / dtype.size();
            *sh = vec![n];
            data.truncate(n * dtype.size());
            assert!(!load_model(&tensor_bytes(&l, &meta)), "{} as {dtype:?} loaded", l[i].0);
        }
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut l = list.clone();
            l[i].3[..4].copy_from_slice(&bad.to_le_bytes());
            assert!(!load_model(&tensor_bytes(&l, &meta)), "{} with {bad} loaded", l[i].0);
        }
        let mut l = list.clone();
        let mut dup = l[i].clone();
        dup.0 = format!("transformer.{}", dup.0);
        l.push(dup);
        assert!(!load_model(&tensor_bytes(&l, &meta)), "{} twice loaded", list[i].0);
    }
    let moments = std::fs::read(format!("{CKPT}/state.safetensors")).unwrap();
    let (mlist, mmeta) = tensor_parts(&moments);
    for (i, bad) in [(0, f32::NAN), (0, f32::INFINITY), (1, -1.0), (1, f32::NAN)] {
        let mut l = mlist.clone();
        l[i].3[40..44].copy_from_slice(&bad.to_le_bytes());
        assert!(!load_moments(&tensor_bytes(&l, &mmeta)), "{} with {bad}", l[i].0);
    }
}

#[test]
fn hostile_counters_in_a_resigned_state_json_are_refused() {
    assert!(load_state(&resigned_state(|_| {})));
    for (path, v) in [
        ("/options/batch", u64::MAX),
        ("/options/batch", 1_000_000_000),
        ("/options/batch", 0),
        ("/options/context", 1 << 40),
        ("/options/spheres", 1_000_000_000),
        ("/options/threads", 100_000),
        ("/options/steps", u64::MAX),
        ("/options/eval_windows", u64::MAX),
        ("/options/warmup_steps", u64::MAX),
        ("/adam_t", u64::MAX),
        ("/step", u64::MAX),
        ("/sampler/seq_len", 1 << 40),
        ("/sampler/data_len", 1 << 40),
        ("/data/bytes", u64::MAX),
        ("/data/train_bytes", u64::MAX),
        ("/model_config/layers", 100_000_000),
        ("/model_config/vocab", 1_000_000_000_000),
    ] {
        let bytes = resigned_state(|st| *st.pointer_mut(path).unwrap() = v.into());
        assert!(!load_state(&bytes), "{path} = {v} accepted");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_any_loader(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        load_model(&bytes);
        load_moments(&bytes);
        load_state(&bytes);
        read_squad(&bytes);
    }

    #[test]
    fn bit_flips_in_real_files_never_panic_or_overallocate(flips in proptest::collection::vec((any::<usize>(), 0u8..8), 1..8)) {
        let mut model = model_bytes();
        let mut state = std::fs::read(format!("{CKPT}/state.json")).unwrap();
        let mut moments = std::fs::read(format!("{CKPT}/state.safetensors")).unwrap();
        let mut squad = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/squad/v11_pretty.json")).unwrap();
        for &(at, bit) in &flips {
            for f in [&mut model, &mut state, &mut moments, &mut squad] {
                let i = at % f.len();
                f[i] ^= 1 << bit;
            }
        }
        load_model(&model);
        // A flip in the header of the moments is caught by the parser, one in the data is a
        // changed value: only invalid values may load as errors, never a panic.
        load_moments(&moments);
        prop_assert!(!load_state(&state), "a bit flip in state.json passed its checksum");
        read_squad(&squad);
    }
}
