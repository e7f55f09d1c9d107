//! Forward/backward pairs for each layer of the transformer. Shapes are given above each
//! function; N = B·T rows. Backward functions ACCUMULATE into gradients unless the comment
//! says "overwrites".

use super::gemm::{backend, Backend};
use super::gemm::{gemm, gemm_bias_prepacked, gemm_prepacked, Mat};
use super::kernel::{gemm_packed_block, PackedB};
use crate::simd::multiversion;
use std::cell::RefCell;

/// LayerNorm epsilon, as GPT-2.
pub const LN_EPS: f32 = 1e-5;

/// Partial sums kept by the reductions below: one 256-bit vector.
const LANES: usize = 8;

/// Adds the lanes of a partial-sum vector in a fixed tree order.
#[inline(always)]
fn combine_lanes(acc: &[f32; LANES]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Σ f(x[i]), element i going to partial sum i % 8. A plain running sum cannot vectorize
/// (float addition does not reassociate); eight partial sums in a fixed order do, and the
/// result is still a pure function of the input.
#[inline(always)]
fn sum_lanes_map(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for ch in &mut chunks {
        for j in 0..LANES {
            acc[j] += f(ch[j]);
        }
    }
    for (j, &v) in chunks.remainder().iter().enumerate() {
        acc[j] += f(v);
    }
    combine_lanes(&acc)
}

/// Σ x[i] (see [`sum_lanes_map`]).
#[inline(always)]
fn sum_lanes(x: &[f32]) -> f32 {
    sum_lanes_map(x, |v| v)
}

/// Σ a[i]·b[i] over the shorter length, with the partial sums of [`sum_lanes_map`].
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for j in 0..LANES {
            acc[j] += x[j] * y[j];
        }
    }
    for (j, (&x, &y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[j] += x * y;
    }
    combine_lanes(&acc)
}

// ---------------------------------------------------------------------------------------
// Embedding
// ---------------------------------------------------------------------------------------

/// out[B,T,C] = wte[tokens] + wpe[position]
pub fn encoder_forward(out: &mut [f32], tokens: &[u32], wte: &[f32], wpe: &[f32], b: usize, t: usize, c: usize) {
    for bi in 0..b {
        for ti in 0..t {
            let tok = tokens[bi * t + ti] as usize;
            let o = &mut out[(bi * t + ti) * c..][..c];
            let te = &wte[tok * c..][..c];
            let pe = &wpe[ti * c..][..c];
            for i in 0..c {
                o[i] = te[i] + pe[i];
            }
        }
    }
}

/// dwte[tokens] += dout, dwpe[position] += dout
#[allow(clippy::too_many_arguments)]
pub fn encoder_backward(
    dwte: &mut [f32],
    dwpe: &mut [f32],
    dout: &[f32],
    tokens: &[u32],
    b: usize,
    t: usize,
    c: usize,
) {
    for bi in 0..b {
        for ti in 0..t {
            let tok = tokens[bi * t + ti] as usize;
            let d = &dout[(bi * t + ti) * c..][..c];
            let te = &mut dwte[tok * c..][..c];
            for i in 0..c {
                te[i] += d[i];
            }
            let pe = &mut dwpe[ti * c..][..c];
            for i in 0..c {
                pe[i] += d[i];
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// LayerNorm
// ---------------------------------------------------------------------------------------

multiversion! {
    /// out[N,C] = (inp - mean) · rstd · w + b; saves mean[N], rstd[N] for the backward pass.
    pub fn layernorm_forward(
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        w: &[f32],
        bias: &[f32],
        n: usize,
        c: usize,
    ) {
        for r in 0..n {
            let x = &inp[r * c..][..c];
            let m = sum_lanes(x) / c as f32;
            let var = sum_lanes_map(x, |v| (v - m) * (v - m));
            let rs = 1.0 / (var / c as f32 + LN_EPS).sqrt();
            let o = &mut out[r * c..][..c];
            for i in 0..c {
                o[i] = (x[i] - m) * rs * w[i] + bias[i];
            }
            mean[r] = m;
            rstd[r] = rs;
        }
    }
}

multiversion! {
    /// dinp[N,C] += ..., dw[C] += ..., db[C] += ... (one pass per row over dout and inp).
    pub fn layernorm_backward(
        dinp: &mut [f32],
        dw: &mut [f32],
        db: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        w: &[f32],
        mean: &[f32],
        rstd: &[f32],
        n: usize,
        c: usize,
    ) {
        for r in 0..n {
            let x = &inp[r * c..][..c];
            let d = &dout[r * c..][..c];
            let (m, rs) = (mean[r], rstd[r]);
            // Two reductions: mean of dnorm and mean of dnorm·norm, where dnorm = w·dout.
            let (mut s_dn, mut s_dnn) = ([0.0f32; LANES], [0.0f32; LANES]);
            let full = c / LANES * LANES;
            for i0 in (0..full).step_by(LANES) {
                for j in 0..LANES {
                    let i = i0 + j;
                    let norm = (x[i] - m) * rs;
                    let dn = w[i] * d[i];
                    s_dn[j] += dn;
                    s_dnn[j] += dn * norm;
                }
            }
            for i in full..c {
                let norm = (x[i] - m) * rs;
                let dn = w[i] * d[i];
                s_dn[i - full] += dn;
                s_dnn[i - full] += dn * norm;
            }
            let dnorm_mean = combine_lanes(&s_dn) / c as f32;
            let dnorm_norm_mean = combine_lanes(&s_dnn) / c as f32;
            let di = &mut dinp[r * c..][..c];
            for i in 0..c {
                let norm = (x[i] - m) * rs;
                let dn = w[i] * d[i];
                db[i] += d[i];
                dw[i] += norm * d[i];
                di[i] += (dn - dnorm_mean - norm * dnorm_norm_mean) * rs;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Linear (Conv1D convention: w is [IC, OC], y = x·w + b)
// ---------------------------------------------------------------------------------------

/// out[N,OC] = inp[N,IC] · w[IC,OC] + bias[OC]; `packed`, if given, is `w` already packed.
#[allow(clippy::too_many_arguments)]
pub fn linear_forward(
    out: &mut [f32],
    inp: &[f32],
    w: &[f32],
    packed: Option<&PackedB>,
    bias: &[f32],
    n: usize,
    ic: usize,
    oc: usize,
) {
    gemm_bias_prepacked(n, oc, ic, out, oc, Mat::rows(inp, ic), Mat::rows(w, oc), packed, bias);
}

/// dinp[N,IC] (overwrites, or accumulates when `accumulate_dinp`) = dout · wᵀ;
/// dw[IC,OC] = inpᵀ · dout (overwrites: each weight is used once per pass, and writing
/// instead of accumulating spares zeroing the whole gradient buffer); dbias[OC] += Σ_rows dout.
/// `packed_t`, if given, is `wᵀ` already packed.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    dinp: &mut [f32],
    dw: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    packed_t: Option<&PackedB>,
    n: usize,
    ic: usize,
    oc: usize,
    accumulate_dinp: bool,
) {
    gemm_prepacked(n, ic, oc, dinp, ic, Mat::rows(dout, oc), Mat::transposed(w, oc), packed_t, accumulate_dinp);
    gemm(ic, oc, n, dw, oc, Mat::transposed(inp, ic), Mat::rows(dout, oc), false);
    bias_backward(dbias, dout, n, oc);
}

multiversion! {
    /// dbias[OC] += Σ_rows dout[N,OC]
    pub fn bias_backward(dbias: &mut [f32], dout: &[f32], n: usize, oc: usize) {
        for r in 0..n {
            let d = &dout[r * oc..][..oc];
            for (db, &g) in dbias[..oc].iter_mut().zip(d) {
                *db += g;
            }
        }
    }
}

multiversion! {
    /// dst[·] += src[·] (a residual connection).
    pub fn add_inplace(dst: &mut [f32], src: &[f32]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d += x;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Causal multi-head self-attention
// ---------------------------------------------------------------------------------------

/// Row blocks (start, len) of a causal T×T matrix: per block only the columns up to its last
/// row are needed, which skips about 3/8 of the attention products for T=128.
fn row_blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    const BLOCK: usize = 32;
    (0..t).step_by(BLOCK).map(move |r0| (r0, BLOCK.min(t - r0)))
}

thread_local! {
    /// Per-thread packings of one head's B operands (Kᵀ and V forward; Vᵀ, dOut, K and Q
    /// backward), reused for every head.
    static HEAD_PACKS: RefCell<[PackedB; 4]> = RefCell::new(std::array::from_fn(|_| PackedB::zeros(0, 0)));
}

/// Runs `f` with this thread's head packings when the native kernel is in use (each B
/// operand of a head is then packed once and its blocks reused by every causal row block),
/// or with `None` for the crate backends, which pack per call.
fn with_head_packs<R>(f: impl FnOnce(Option<&mut [PackedB; 4]>) -> R) -> R {
    if backend() != Backend::Native {
        return f(None);
    }
    HEAD_PACKS.with(|p| f(Some(&mut p.borrow_mut())))
}

/// `c[m, cols] = a · B[rows, ..cols]`, where `block` views that block of B and `packed`, if
/// given, holds all of B packed. Same bits either way.
#[allow(clippy::too_many_arguments)]
fn gemm_block(
    m: usize,
    c: &mut [f32],
    c_rs: usize,
    a: Mat,
    block: Mat,
    packed: Option<&PackedB>,
    rows: std::ops::Range<usize>,
    cols: usize,
) {
    match packed {
        Some(pb) => gemm_packed_block(m, c, c_rs, a, pb, rows, cols, false),
        None => gemm(m, cols, rows.len(), c, c_rs, a, block, false),
    }
}

/// out[B,T,C] = softmax(Q·Kᵀ/√hd, causal)·V per head; att[B,NH,T,T] saves the probabilities
/// (zero above the diagonal). qkv[B,T,3C] holds Q | K | V, each split into NH heads of hd.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(out: &mut [f32], att: &mut [f32], qkv: &[f32], b: usize, t: usize, c: usize, nh: usize) {
    let hd = c / nh;
    let scale = 1.0 / (hd as f32).sqrt();
    let c3 = 3 * c;
    with_head_packs(|mut packs| {
        for bi in 0..b {
            for h in 0..nh {
                let base = bi * t * c3 + h * hd;
                let q = Mat::strided(&qkv[base..], c3, 1);
                let kt = Mat::strided(&qkv[base + c..], 1, c3);
                let v = Mat::strided(&qkv[base + 2 * c..], c3, 1);
                let (kt_p, v_p) = match packs.as_deref_mut() {
                    Some([kt_p, v_p, ..]) => {
                        kt_p.repack_as(hd, t, kt);
                        v_p.repack_as(t, hd, v);
                        (Some(&*kt_p), Some(&*v_p))
                    }
                    None => (None, None),
                };
                let p = &mut att[(bi * nh + h) * t * t..][..t * t];
                // Scores only on and below the diagonal, a block of rows at a time: rows
                // [r0, r0+rb) need columns [0, r0+rb). The softmax below zeroes the rest.
                for (r0, rb) in row_blocks(t) {
                    let q_rows = Mat::strided(&q.data[r0 * c3..], c3, 1);
                    gemm_block(rb, &mut p[r0 * t..], t, q_rows, kt, kt_p, 0..hd, r0 + rb);
                }
                causal_softmax_rows(p, t, scale);
                for (r0, rb) in row_blocks(t) {
                    let o = &mut out[(bi * t + r0) * c + h * hd..];
                    gemm_block(rb, o, c, Mat::rows(&p[r0 * t..], t), v, v_p, 0..r0 + rb, hd);
                }
            }
        }
    })
}

/// dqkv[B,T,3C] (overwrites) from dout[B,T,C]; datt[T,T] is scratch for one head.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dqkv: &mut [f32],
    datt: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    att: &[f32],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    let hd = c / nh;
    let scale = 1.0 / (hd as f32).sqrt();
    let c3 = 3 * c;
    with_head_packs(|mut packs| {
        for bi in 0..b {
            for h in 0..nh {
                let base = bi * t * c3 + h * hd;
                let p = &att[(bi * nh + h) * t * t..][..t * t];
                let dout_h = Mat::strided(&dout[bi * t * c + h * hd..], c, 1);
                let vt = Mat::strided(&qkv[base + 2 * c..], 1, c3);
                let k = Mat::strided(&qkv[base + c..], c3, 1);
                let q = Mat::strided(&qkv[base..], c3, 1);
                let (vt_p, dout_p, k_p, q_p) = match packs.as_deref_mut() {
                    Some([vt_p, dout_p, k_p, q_p]) => {
                        vt_p.repack_as(hd, t, vt);
                        dout_p.repack_as(t, hd, dout_h);
                        k_p.repack_as(t, hd, k);
                        q_p.repack_as(t, hd, q);
                        (Some(&*vt_p), Some(&*dout_p), Some(&*k_p), Some(&*q_p))
                    }
                    None => (None, None, None, None),
                };
                let ds = &mut datt[..t * t];
                // dP = dOut · Vᵀ, only where P is non-zero (j ≤ i)
                for (r0, rb) in row_blocks(t) {
                    let dout_rows = Mat::strided(&dout_h.data[r0 * c..], c, 1);
                    gemm_block(rb, &mut ds[r0 * t..], t, dout_rows, vt, vt_p, 0..hd, r0 + rb);
                }
                // dV = Pᵀ · dOut: rows [j0, j0+jb) of dV gather rows i ≥ j0 of dOut
                for (j0, jb) in row_blocks(t) {
                    let pt = Mat::strided(&p[j0 * t + j0..], 1, t);
                    let dout_rows = Mat::strided(&dout_h.data[j0 * c..], c, 1);
                    let dv = &mut dqkv[base + 2 * c + j0 * c3..];
                    gemm_block(jb, dv, c3, pt, dout_rows, dout_p, j0..t, hd);
                }
                // softmax backward, folding in the score scale: dS = P ⊙ (dP - rowsum(P ⊙ dP)) / √hd
                causal_softmax_backward_rows(p, ds, t, scale);
                // dQ = dS · K ; dK = dSᵀ · Q
                for (r0, rb) in row_blocks(t) {
                    let ds_rows = Mat::rows(&ds[r0 * t..], t);
                    gemm_block(rb, &mut dqkv[base + r0 * c3..], c3, ds_rows, k, k_p, 0..r0 + rb, hd);
                    let dst = Mat::strided(&ds[r0 * t + r0..], 1, t);
                    let q_rows = Mat::strided(&q.data[r0 * c3..], c3, 1);
                    gemm_block(rb, &mut dqkv[base + c + r0 * c3..], c3, dst, q_rows, q_p, r0..t, hd);
                }
            }
        }
    })
}

multiversion! {
    /// In place on a T×T score matrix: row i becomes softmax(scale · row[..=i]) followed by
    /// zeros (the causal mask).
    fn causal_softmax_rows(p: &mut [f32], t: usize, scale: f32) {
        for i in 0..t {
            let (live, masked) = p[i * t..][..t].split_at_mut(i + 1);
            let mx = row_max(live);
            for s in live.iter_mut() {
                *s = fast_exp((*s - mx) * scale);
            }
            let inv = 1.0 / sum_lanes(live);
            for s in live.iter_mut() {
                *s *= inv;
            }
            masked.fill(0.0);
        }
    }
}

multiversion! {
    /// In place, from dP to dS with the score scale folded in: dS = P ⊙ (dP - rowsum(P ⊙ dP))
    /// · scale on and below the diagonal, zero above.
    fn causal_softmax_backward_rows(p: &[f32], ds: &mut [f32], t: usize, scale: f32) {
        for i in 0..t {
            let pr = &p[i * t..][..=i];
            let (live, masked) = ds[i * t..][..t].split_at_mut(i + 1);
            let dot = dot_lanes(pr, live);
            for (d, &pj) in live.iter_mut().zip(pr) {
                *d = pj * (*d - dot) * scale;
            }
            masked.fill(0.0);
        }
    }
}

// ---------------------------------------------------------------------------------------
// GELU (tanh approximation) and residual
// ---------------------------------------------------------------------------------------

const GELU_K: f32 = 0.797_884_6; // sqrt(2/pi)
const GELU_C: f32 = 0.044715;

/// e^x for f32, branch-free so loops over it vectorize: range reduction to
/// x = k·ln2 + r with |r| ≤ ln2/2, a degree-6 polynomial for e^r (relative error < 2e-7,
/// about one f32 ulp), and 2^k built in the exponent bits. Inputs are clamped to
/// [-87, 88], where e^x stays a normal f32.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5·2^23 rounds to the nearest integer and leaves that integer in the low
    // mantissa bits, so no float-to-int conversion (which would not vectorize) is needed.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let k = shifted - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let k_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(k_bits.wrapping_add(127) << 23);
    p * scale
}

/// GELU written as x·σ(2u), u = √(2/π)(x + 0.044715x³), which equals the tanh form
/// 0.5·x·(1 + tanh u) exactly but needs one exp and no cancellation near 0.
#[inline(always)]
fn gelu_sigmoid(x: f32) -> f32 {
    let u = GELU_K * (x + GELU_C * x * x * x);
    1.0 / (1.0 + fast_exp(-2.0 * u))
}

multiversion! {
    /// out = 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))
    pub fn gelu_forward(out: &mut [f32], inp: &[f32]) {
        for (o, &x) in out.iter_mut().zip(inp) {
            *o = x * gelu_sigmoid(x);
        }
    }
}

#[inline(always)]
fn gelu_grad(x: f32) -> f32 {
    gelu_grad_from(x, gelu_sigmoid(x))
}

/// GELU'(x) given s = σ(2u(x)): d/dx [x·s] = s + 2x·s(1−s)·u'(x).
#[inline(always)]
fn gelu_grad_from(x: f32, s: f32) -> f32 {
    s + 2.0 * x * s * (1.0 - s) * GELU_K * (1.0 + 3.0 * GELU_C * x * x)
}

multiversion! {
    /// out = GELU(x), and x is replaced by GELU'(x): the forward pass computes the sigmoid
    /// both need once, and the backward pass is left with a multiplication
    /// ([`gelu_backward_saved`]). The same bits as [`gelu_forward`] and [`gelu_backward`].
    pub fn gelu_forward_saving_grad(out: &mut [f32], x_then_grad: &mut [f32]) {
        for (o, x) in out.iter_mut().zip(x_then_grad.iter_mut()) {
            let s = gelu_sigmoid(*x);
            *o = *x * s;
            *x = gelu_grad_from(*x, s);
        }
    }
}

multiversion! {
    /// In place: d[·] *= grad[·], with `grad` from [`gelu_forward_saving_grad`].
    pub fn gelu_backward_saved(d: &mut [f32], grad: &[f32]) {
        for (di, &g) in d.iter_mut().zip(grad) {
            *di *= g;
        }
    }
}

multiversion! {
    /// dinp (overwrites) = gelu'(inp) · dout
    pub fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
        for ((di, &x), &d) in dinp.iter_mut().zip(inp).zip(dout) {
            *di = gelu_grad(x) * d;
        }
    }
}

multiversion! {
    /// In place: d[·] = gelu'(inp) · d
    pub fn gelu_backward_inplace(d: &mut [f32], inp: &[f32]) {
        for (di, &x) in d.iter_mut().zip(inp) {
            *di *= gelu_grad(x);
        }
    }
}

/// The maximum of a row; a plain comparison (unlike `f32::max`'s NaN rules) lets the loop
/// vectorize. A NaN logit makes the loss NaN either way, which the trainer's scan catches.
#[inline]
fn row_max(row: &[f32]) -> f32 {
    let mut m = f32::NEG_INFINITY;
    for &x in row {
        m = if x > m { x } else { m };
    }
    m
}

/// out = a + b
pub fn residual_forward(out: &mut [f32], a: &[f32], b: &[f32]) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = x + y;
    }
}

// ---------------------------------------------------------------------------------------
// Softmax + cross-entropy (fused)
// ---------------------------------------------------------------------------------------

/// In place: logits[N,V] -> probs[N,V]; losses[N] = -ln probs[target]. Returns the mean loss.
pub fn softmax_crossentropy_forward(probs: &mut [f32], losses: &mut [f32], targets: &[u32], n: usize, v: usize) -> f32 {
    softmax_forward(probs, n, v);
    let mut total = 0.0f64;
    for r in 0..n {
        let l = -probs[r * v + targets[r] as usize].ln();
        losses[r] = l;
        total += l as f64;
    }
    (total / n as f64) as f32
}

multiversion! {
    /// Softmax only (no targets), in place: logits[N,V] -> probs[N,V].
    pub fn softmax_forward(probs: &mut [f32], n: usize, v: usize) {
        for r in 0..n {
            let row = &mut probs[r * v..][..v];
            let mx = row_max(row);
            for x in row.iter_mut() {
                *x = fast_exp(*x - mx);
            }
            let inv = 1.0 / sum_lanes(row);
            for x in row.iter_mut() {
                *x *= inv;
            }
        }
    }
}

/// In place: probs[N,V] -> dlogits = (probs - onehot(target)) · scale, scale = 1/N for a mean.
pub fn crossentropy_softmax_backward(dlogits: &mut [f32], targets: &[u32], n: usize, v: usize, scale: f32) {
    for r in 0..n {
        let row = &mut dlogits[r * v..][..v];
        for x in row.iter_mut() {
            *x *= scale;
        }
        row[targets[r] as usize] -= scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_sums_match_a_double_precision_sum_at_every_length() {
        for n in 0..40 {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.7).collect();
            let sum: f64 = a.iter().map(|&x| x as f64).sum();
            let dot: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let sq: f64 = a.iter().map(|&x| x as f64 * x as f64).sum();
            assert!((sum_lanes(&a) as f64 - sum).abs() < 1e-5, "sum, n={n}");
            assert!((dot_lanes(&a, &b) as f64 - dot).abs() < 1e-5, "dot, n={n}");
            assert!((sum_lanes_map(&a, |x| x * x) as f64 - sq).abs() < 1e-5, "sum of squares, n={n}");
        }
    }

    #[test]
    fn fast_exp_is_within_two_ulp_of_std_exp() {
        let mut worst = 0.0f64;
        let mut x = -80.0f32;
        while x < 80.0 {
            let want = (x as f64).exp();
            let got = fast_exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
    }

    #[test]
    fn fast_exp_saturates_instead_of_overflowing() {
        assert!(fast_exp(-1000.0) >= 0.0 && fast_exp(-1000.0) < 1e-37);
        assert!(fast_exp(1000.0).is_finite());
    }

    #[test]
    fn gelu_saving_the_derivative_gives_the_same_bits() {
        let x: Vec<f32> = (0..2000).map(|i| (i as f32 - 1000.0) * 0.013).collect();
        let (mut out1, mut out2) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        gelu_forward(&mut out1, &x);
        let mut saved = x.clone();
        gelu_forward_saving_grad(&mut out2, &mut saved);
        assert!(out1.iter().zip(&out2).all(|(a, b)| a.to_bits() == b.to_bits()));
        let d: Vec<f32> = (0..x.len()).map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.1).collect();
        let mut d1 = d.clone();
        gelu_backward_inplace(&mut d1, &x);
        let mut d2 = d.clone();
        gelu_backward_saved(&mut d2, &saved);
        assert!(d1.iter().zip(&d2).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn gelu_matches_the_tanh_formula_and_its_derivative() {
        let reference = |x: f64| 0.5 * x * (1.0 + (0.7978845608028654 * (x + 0.044715 * x * x * x)).tanh());
        let mut x = -12.0f32;
        while x < 12.0 {
            let mut out = [0.0f32];
            gelu_forward(&mut out, &[x]);
            assert!((out[0] as f64 - reference(x as f64)).abs() < 2e-6 * (1.0 + x.abs() as f64), "gelu({x})");
            let h = 1e-4;
            let numeric = (reference(x as f64 + h) - reference(x as f64 - h)) / (2.0 * h);
            let mut d = [1.0f32];
            gelu_backward_inplace(&mut d, &[x]);
            assert!((d[0] as f64 - numeric).abs() < 1e-5, "gelu'({x}): {} vs {numeric}", d[0]);
            x += 0.01;
        }
    }

    /// Causal attention in plain f64 loops: out[b,i] = Σ_{j≤i} softmax_j(q_i·k_j/√hd) v_j, and
    /// the gradient of Σ out ⊙ r with respect to qkv.
    fn naive_attention(qkv: &[f32], r: &[f32], b: usize, t: usize, c: usize, nh: usize) -> (Vec<f64>, Vec<f64>) {
        let hd = c / nh;
        let scale = 1.0 / (hd as f64).sqrt();
        let at = |bi: usize, i: usize, part: usize, h: usize, d: usize| {
            qkv[(bi * t + i) * 3 * c + part * c + h * hd + d] as f64
        };
        let mut out = vec![0.0; b * t * c];
        let mut dqkv = vec![0.0; b * t * 3 * c];
        for bi in 0..b {
            for h in 0..nh {
                for i in 0..t {
                    let s: Vec<f64> = (0..=i)
                        .map(|j| (0..hd).map(|d| at(bi, i, 0, h, d) * at(bi, j, 1, h, d)).sum::<f64>() * scale)
                        .collect();
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    let pr: Vec<f64> = e.iter().map(|x| x / z).collect();
                    let dout: Vec<f64> = (0..hd).map(|d| r[(bi * t + i) * c + h * hd + d] as f64).collect();
                    for d in 0..hd {
                        out[(bi * t + i) * c + h * hd + d] = (0..=i).map(|j| pr[j] * at(bi, j, 2, h, d)).sum();
                    }
                    let dp: Vec<f64> = (0..=i).map(|j| (0..hd).map(|d| dout[d] * at(bi, j, 2, h, d)).sum()).collect();
                    let dot: f64 = (0..=i).map(|j| pr[j] * dp[j]).sum();
                    for j in 0..=i {
                        let ds = pr[j] * (dp[j] - dot) * scale;
                        for d in 0..hd {
                            dqkv[(bi * t + i) * 3 * c + h * hd + d] += ds * at(bi, j, 1, h, d);
                            dqkv[(bi * t + j) * 3 * c + c + h * hd + d] += ds * at(bi, i, 0, h, d);
                            dqkv[(bi * t + j) * 3 * c + 2 * c + h * hd + d] += pr[j] * dout[d];
                        }
                    }
                }
            }
        }
        (out, dqkv)
    }

    #[test]
    fn blocked_causal_attention_matches_naive_loops_across_several_row_blocks() {
        // t = 70 spans three row blocks, the last one partial.
        let (b, t, c, nh) = (2, 70, 16, 2);
        let fill = |n: usize, seed: u32| -> Vec<f32> {
            (0..n).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0).collect()
        };
        let qkv = fill(b * t * 3 * c, 11);
        let r = fill(b * t * c, 23);
        let mut out = vec![0.0f32; b * t * c];
        let mut att = vec![f32::NAN; b * nh * t * t];
        attention_forward(&mut out, &mut att, &qkv, b, t, c, nh);
        let mut dqkv = vec![f32::NAN; b * t * 3 * c];
        let mut datt = vec![f32::NAN; t * t];
        attention_backward(&mut dqkv, &mut datt, &r, &qkv, &att, b, t, c, nh);
        let (want_out, want_d) = naive_attention(&qkv, &r, b, t, c, nh);
        for (i, (&x, &y)) in out.iter().zip(&want_out).enumerate() {
            assert!((x as f64 - y).abs() < 1e-5, "out[{i}]: {x} vs {y}");
        }
        for (i, (&x, &y)) in dqkv.iter().zip(&want_d).enumerate() {
            assert!((x as f64 - y).abs() < 1e-5, "dqkv[{i}]: {x} vs {y}");
        }
        assert!(att.iter().all(|x| x.is_finite()), "probabilities above the diagonal must be written (as 0)");
    }
}
