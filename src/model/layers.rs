//! Forward/backward pairs for each layer of the transformer. Shapes are given above each
//! function; N = B·T rows. Backward functions ACCUMULATE into gradients unless the comment
//! says "overwrites".

use super::gemm::{gemm_bias_prepacked, gemm_colsum, gemm_prepacked};
use super::kernel::{gemm_packed_block, Mat, PackedB};
use crate::simd::{multiversion, simd_dispatch, Portable, Simd};
use std::cell::RefCell;

use super::dropout::Mask;

/// LayerNorm epsilon, as GPT-2.
pub const LN_EPS: f32 = 1e-5;

/// Partial sums kept by the reductions below: one 256-bit vector.
const LANES: usize = 8;

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

simd_dispatch! {
    /// out[N,C] = (inp - mean) · rstd · w + b; saves mean[N], rstd[N] for the backward pass.
    pub fn layernorm_forward<S>(
        simd,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        w: &[f32],
        bias: &[f32],
        n: usize,
        c: usize,
    ) {
        let s = simd;
        // Exact-length views let the last loop vectorize (no bounds check per element).
        let (w, bias) = (&w[..c], &bias[..c]);
        for r in 0..n {
            let x = &inp[r * c..][..c];
            let m = lane_sum(s, x, 0.0, |v| v) / c as f32;
            let mv = s.splat(m);
            let var = lane_sum(s, x, m, |v| {
                let d = s.sub(v, mv);
                s.mul(d, d)
            });
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

/// Σ f(x[i]) with element i in lane i % 8 and the lanes combined by [`Simd::sum`]. `f` gets
/// eight elements at a time; the tail is padded with `pad`, whose `f` must be +0 (or -0).
#[inline(always)]
fn lane_sum<S: Simd>(s: S, x: &[f32], pad: f32, f: impl Fn(S::V) -> S::V) -> f32 {
    let (xv, xt) = x.as_chunks::<LANES>();
    let mut acc = s.splat(0.0);
    for ch in xv {
        acc = s.add(acc, f(s.load(ch)));
    }
    if !xt.is_empty() {
        acc = s.add(acc, f(s.load_partial(xt, pad)));
    }
    s.sum(acc)
}

simd_dispatch! {
    /// dinp[N,C] += ..., dw[C] += ..., db[C] += ... (per row: one pass for two reductions,
    /// then one that writes all three).
    pub fn layernorm_backward<S>(
        simd,
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
        let s = simd;
        // Exact-length views let the last loop vectorize (no bounds check per element).
        let (w, dw, db) = (&w[..c], &mut dw[..c], &mut db[..c]);
        let (w_vec, w_tail) = w.as_chunks::<LANES>();
        for r in 0..n {
            let x = &inp[r * c..][..c];
            let d = &dout[r * c..][..c];
            let (m, rs) = (mean[r], rstd[r]);
            // Two reductions: mean of dnorm and mean of dnorm·norm, where dnorm = w·dout.
            let (mv, rsv) = (s.splat(m), s.splat(rs));
            let (mut s_dn, mut s_dnn) = (s.splat(0.0), s.splat(0.0));
            let mut accumulate = |xs: S::V, ds: S::V, ws: S::V| {
                let norm = s.mul(s.sub(xs, mv), rsv);
                let dn = s.mul(ws, ds);
                s_dn = s.add(s_dn, dn);
                s_dnn = s.add(s_dnn, s.mul(dn, norm));
            };
            let (x_vec, x_tail) = x.as_chunks::<LANES>();
            let (d_vec, d_tail) = d.as_chunks::<LANES>();
            for ((xs, ds), ws) in x_vec.iter().zip(d_vec).zip(w_vec) {
                accumulate(s.load(xs), s.load(ds), s.load(ws));
            }
            if !x_tail.is_empty() {
                // Padding that adds +0 to both sums: x = mean, dout = w = 0.
                accumulate(s.load_partial(x_tail, m), s.load_partial(d_tail, 0.0), s.load_partial(w_tail, 0.0));
            }
            let dnorm_mean = s.sum(s_dn) / c as f32;
            let dnorm_norm_mean = s.sum(s_dnn) / c as f32;
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

/// dinp[N,IC] (overwrites) = dout · wᵀ; dw[IC,OC] = inpᵀ · dout (overwrites: each weight is
/// used once per pass, and writing instead of accumulating spares zeroing the whole gradient
/// buffer); dbias[OC] += Σ_rows dout. `packed_t`, if given, is `wᵀ` already packed.
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
) {
    gemm_prepacked(n, ic, oc, dinp, ic, Mat::rows(dout, oc), Mat::transposed(w, oc), packed_t, false);
    // dbias[OC] += Σ_rows dout, summed row by row while dout is packed for the dW product.
    gemm_colsum(ic, oc, n, dw, oc, Mat::transposed(inp, ic), Mat::rows(dout, oc), dbias);
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

/// Runs `f` with this thread's head packings: each B operand of a head is packed once and its
/// blocks reused by every causal row block ([`gemm_packed_block`]).
fn with_head_packs<R>(f: impl FnOnce(&mut [PackedB; 4]) -> R) -> R {
    HEAD_PACKS.with(|p| f(&mut p.borrow_mut()))
}

thread_local! {
    /// One head's dropped-out probabilities [T,T] (dropout only), grown once per thread.
    static DROPPED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's [`DROPPED`] buffer, at least `len` long.
fn with_dropped<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    DROPPED.with(|d| {
        let mut d = d.borrow_mut();
        if d.len() < len {
            d.resize(len, 0.0);
        }
        f(&mut d[..len])
    })
}

/// out[B,T,C] = softmax(Q·Kᵀ/√hd, causal)·V per head; att[B,NH,T,T] saves the probabilities
/// (zero above the diagonal). qkv[B,T,3C] holds Q | K | V, each split into NH heads of hd.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(out: &mut [f32], att: &mut [f32], qkv: &[f32], b: usize, t: usize, c: usize, nh: usize) {
    attention_forward_dropout(out, att, qkv, b, t, c, nh, None)
}

/// [`attention_forward`] with dropout on the probabilities that weight V (`att` still saves
/// them before dropout; element (b, h, i, j) of the mask is number ((b·NH + h)·T + i)·T + j).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_dropout(
    out: &mut [f32],
    att: &mut [f32],
    qkv: &[f32],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    mask: Option<Mask>,
) {
    let hd = c / nh;
    let scale = 1.0 / (hd as f32).sqrt();
    let c3 = 3 * c;
    with_head_packs(|[kt_p, v_p, ..]| {
        for bi in 0..b {
            for h in 0..nh {
                let base = bi * t * c3 + h * hd;
                let q = Mat::strided(&qkv[base..], c3, 1);
                kt_p.repack_as(hd, t, Mat::strided(&qkv[base + c..], 1, c3));
                v_p.repack_as(t, hd, Mat::strided(&qkv[base + 2 * c..], c3, 1));
                let p = &mut att[(bi * nh + h) * t * t..][..t * t];
                // Scores only on and below the diagonal, a block of rows at a time: rows
                // [r0, r0+rb) need columns [0, r0+rb). The softmax below zeroes the rest.
                for (r0, rb) in row_blocks(t) {
                    let q_rows = Mat::strided(&q.data[r0 * c3..], c3, 1);
                    gemm_packed_block(rb, &mut p[r0 * t..], t, q_rows, kt_p, 0..hd, r0 + rb, false);
                }
                causal_softmax_rows(p, t, scale);
                let first = ((bi * nh + h) * t * t) as u64;
                let mut weigh = |w: &[f32]| {
                    for (r0, rb) in row_blocks(t) {
                        let o = &mut out[(bi * t + r0) * c + h * hd..];
                        gemm_packed_block(rb, o, c, Mat::rows(&w[r0 * t..], t), v_p, 0..r0 + rb, hd, false);
                    }
                };
                match mask {
                    None => weigh(&*p),
                    Some(m) => with_dropped(t * t, |pd| {
                        m.apply_into(pd, p, first);
                        weigh(pd)
                    }),
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
    attention_backward_dropout(dqkv, datt, dout, qkv, att, b, t, c, nh, None)
}

/// [`attention_backward`] for [`attention_forward_dropout`] with the same `mask`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_dropout(
    dqkv: &mut [f32],
    datt: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    att: &[f32],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    mask: Option<Mask>,
) {
    let hd = c / nh;
    let scale = 1.0 / (hd as f32).sqrt();
    let c3 = 3 * c;
    with_head_packs(|[vt_p, dout_p, k_p, q_p]| {
        for bi in 0..b {
            for h in 0..nh {
                let base = bi * t * c3 + h * hd;
                let p = &att[(bi * nh + h) * t * t..][..t * t];
                let dout_h = &dout[bi * t * c + h * hd..];
                vt_p.repack_as(hd, t, Mat::strided(&qkv[base + 2 * c..], 1, c3));
                dout_p.repack_as(t, hd, Mat::strided(dout_h, c, 1));
                k_p.repack_as(t, hd, Mat::strided(&qkv[base + c..], c3, 1));
                q_p.repack_as(t, hd, Mat::strided(&qkv[base..], c3, 1));
                let ds = &mut datt[..t * t];
                // dP = dOut · Vᵀ, only where P is non-zero (j ≤ i)
                for (r0, rb) in row_blocks(t) {
                    let dout_rows = Mat::strided(&dout_h[r0 * c..], c, 1);
                    gemm_packed_block(rb, &mut ds[r0 * t..], t, dout_rows, vt_p, 0..hd, r0 + rb, false);
                }
                // dV = Pᵀ · dOut: rows [j0, j0+jb) of dV gather rows i ≥ j0 of dOut (P after
                // dropout; dP then goes back through the mask)
                let dv_from = |w: &[f32], dqkv: &mut [f32]| {
                    for (j0, jb) in row_blocks(t) {
                        let pt = Mat::strided(&w[j0 * t + j0..], 1, t);
                        let dv = &mut dqkv[base + 2 * c + j0 * c3..];
                        gemm_packed_block(jb, dv, c3, pt, dout_p, j0..t, hd, false);
                    }
                };
                match mask {
                    None => dv_from(p, dqkv),
                    Some(m) => {
                        let first = ((bi * nh + h) * t * t) as u64;
                        with_dropped(t * t, |pd| {
                            m.apply_into(pd, p, first);
                            dv_from(pd, dqkv)
                        });
                        m.apply(ds, first);
                    }
                }
                // softmax backward, folding in the score scale: dS = P ⊙ (dP - rowsum(P ⊙ dP)) / √hd
                causal_softmax_backward_rows(p, ds, t, scale);
                // dQ = dS · K ; dK = dSᵀ · Q
                for (r0, rb) in row_blocks(t) {
                    let ds_rows = Mat::rows(&ds[r0 * t..], t);
                    gemm_packed_block(rb, &mut dqkv[base + r0 * c3..], c3, ds_rows, k_p, 0..r0 + rb, hd, false);
                    let dst = Mat::strided(&ds[r0 * t + r0..], 1, t);
                    gemm_packed_block(rb, &mut dqkv[base + c + r0 * c3..], c3, dst, q_p, r0..t, hd, false);
                }
            }
        }
    })
}

simd_dispatch! {
    /// In place on a T×T score matrix: row i becomes softmax(scale · row[..=i]) followed by
    /// zeros (the causal mask).
    fn causal_softmax_rows<S>(simd, p: &mut [f32], t: usize, scale: f32) {
        for i in 0..t {
            let (live, masked) = p[i * t..][..t].split_at_mut(i + 1);
            softmax_row(simd, live, scale);
            masked.fill(0.0);
        }
    }
}

simd_dispatch! {
    /// In place: row = softmax(scale · row), the same bits as [`causal_softmax_rows`] gives the
    /// live part of a row (generation's single-row attention, [`super::kv`]).
    pub fn softmax_scaled<S>(simd, row: &mut [f32], scale: f32) {
        softmax_row(simd, row, scale)
    }
}

simd_dispatch! {
    /// In place, from dP to dS with the score scale folded in: dS = P ⊙ (dP - rowsum(P ⊙ dP))
    /// · scale on and below the diagonal, zero above.
    fn causal_softmax_backward_rows<S>(simd, p: &[f32], ds: &mut [f32], t: usize, scale: f32) {
        let s = simd;
        for i in 0..t {
            let pr = &p[i * t..][..=i];
            let (live, masked) = ds[i * t..][..t].split_at_mut(i + 1);
            let (pv, pt) = pr.as_chunks::<LANES>();
            let (dv, dt) = live.as_chunks::<LANES>();
            let mut acc = s.splat(0.0);
            for (a, b) in pv.iter().zip(dv) {
                acc = s.add(acc, s.mul(s.load(a), s.load(b)));
            }
            if !pt.is_empty() {
                acc = s.add(acc, s.mul(s.load_partial(pt, 0.0), s.load_partial(dt, 0.0)));
            }
            let dot = s.sum(acc);
            for (d, &pj) in live.iter_mut().zip(pr) {
                *d = pj * (*d - dot) * scale;
            }
            masked.fill(0.0);
        }
    }
}

/// In place: row = softmax(scale · row). The maximum is subtracted first (a NaN is not
/// picked as the maximum, but it reaches every output through the sum).
#[inline(always)]
fn softmax_row<S: Simd>(s: S, row: &mut [f32], scale: f32) {
    let (rv, rt) = row.as_chunks_mut::<LANES>();
    let mut mx = s.splat(f32::NEG_INFINITY);
    for ch in rv.iter() {
        mx = s.max(s.load(ch), mx);
    }
    if !rt.is_empty() {
        mx = s.max(s.load_partial(rt, f32::NEG_INFINITY), mx);
    }
    let mx = s.splat(s.max_lane(mx));
    let scale_v = s.splat(scale);
    let mut acc = s.splat(0.0);
    for ch in rv.iter_mut() {
        let e = s.exp(s.mul(s.sub(s.load(ch), mx), scale_v));
        s.store(e, ch);
        acc = s.add(acc, e);
    }
    if !rt.is_empty() {
        let e = s.exp(s.mul(s.sub(s.load_partial(rt, 0.0), mx), scale_v));
        s.store_partial(e, rt);
        // Only the row's lanes join the sum (the padding's exponentials would not be 0).
        acc = s.add(acc, s.load_partial(rt, 0.0));
    }
    let inv = 1.0 / s.sum(acc);
    for x in row.iter_mut() {
        *x *= inv;
    }
}

// ---------------------------------------------------------------------------------------
// GELU (tanh approximation) and residual
// ---------------------------------------------------------------------------------------

const GELU_K: f32 = 0.797_884_6; // sqrt(2/pi)
const GELU_C: f32 = 0.044715;

/// e^x for one f32: [`Simd::exp`] (the same bits as the vectorized loops).
pub fn fast_exp(x: f32) -> f32 {
    Portable.exp(Portable.splat(x))[0]
}

/// (GELU(x), GELU'(x)) per lane. GELU is written as x·σ(2u), u = √(2/π)(x + 0.044715x³), which
/// equals the tanh form 0.5·x·(1 + tanh u) exactly but needs one exp and no cancellation
/// near 0; GELU'(x) = d/dx [x·σ] = σ + x·σ(1−σ)·2u'(x).
#[inline(always)]
fn gelu_and_grad<S: Simd>(s: S, x: S::V) -> (S::V, S::V) {
    let one = s.splat(1.0);
    let x2 = s.mul(x, x);
    // -2u = x·(-2K - 2KC·x²)
    let minus_2u = s.mul(s.mul_add(x2, s.splat(-2.0 * GELU_K * GELU_C), s.splat(-2.0 * GELU_K)), x);
    let sg = s.div(one, s.add(one, s.exp(minus_2u)));
    let y = s.mul(x, sg);
    // 2u' = 2K + 6KC·x²
    let du2 = s.mul_add(x2, s.splat(6.0 * GELU_K * GELU_C), s.splat(2.0 * GELU_K));
    let grad = s.mul_add(s.mul(x, du2), s.mul(sg, s.sub(one, sg)), sg);
    (y, grad)
}

/// Runs `f` on `a` eight lanes at a time (the tail padded with zeros, only its own lanes
/// written back), handing it the chunk of `b` at the same place.
#[inline(always)]
fn map_lanes<S: Simd>(s: S, a: &mut [f32], b: &[f32], mut f: impl FnMut(S::V, S::V) -> S::V) {
    let n = a.len().min(b.len());
    let (av, at) = a[..n].as_chunks_mut::<LANES>();
    let (bv, bt) = b[..n].as_chunks::<LANES>();
    for (x, y) in av.iter_mut().zip(bv) {
        let r = f(s.load(x), s.load(y));
        s.store(r, x);
    }
    if !at.is_empty() {
        let r = f(s.load_partial(at, 0.0), s.load_partial(bt, 0.0));
        s.store_partial(r, at);
    }
}

simd_dispatch! {
    /// out = 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))
    pub fn gelu_forward<S>(simd, out: &mut [f32], inp: &[f32]) {
        map_lanes(simd, out, inp, |_, x| gelu_and_grad(simd, x).0);
    }
}

simd_dispatch! {
    /// out = GELU(x), and x is replaced by GELU'(x): the forward pass computes the sigmoid
    /// both need once, and the backward pass is left with a multiplication
    /// ([`gelu_backward_saved`]). The same bits as [`gelu_forward`] and [`gelu_backward`].
    pub fn gelu_forward_saving_grad<S>(simd, out: &mut [f32], x_then_grad: &mut [f32]) {
        let s = simd;
        let n = out.len().min(x_then_grad.len());
        let (ov, ot) = out[..n].as_chunks_mut::<LANES>();
        let (xv, xt) = x_then_grad[..n].as_chunks_mut::<LANES>();
        for (o, x) in ov.iter_mut().zip(xv.iter_mut()) {
            let (y, g) = gelu_and_grad(s, s.load(x));
            s.store(y, o);
            s.store(g, x);
        }
        if !xt.is_empty() {
            let (y, g) = gelu_and_grad(s, s.load_partial(xt, 0.0));
            s.store_partial(y, ot);
            s.store_partial(g, xt);
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

simd_dispatch! {
    /// dinp (overwrites) = gelu'(inp) · dout
    pub fn gelu_backward<S>(simd, dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
        let n = inp.len().min(dout.len()).min(dinp.len());
        dinp[..n].copy_from_slice(&dout[..n]);
        gelu_backward_inplace_body(simd, &mut dinp[..n], inp);
    }
}

simd_dispatch! {
    /// In place: d[·] = gelu'(inp) · d
    pub fn gelu_backward_inplace<S>(simd, d: &mut [f32], inp: &[f32]) {
        gelu_backward_inplace_body(simd, d, inp);
    }
}

#[inline(always)]
fn gelu_backward_inplace_body<S: Simd>(s: S, d: &mut [f32], inp: &[f32]) {
    map_lanes(s, d, inp, |dv, x| s.mul(dv, gelu_and_grad(s, x).1));
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

simd_dispatch! {
    /// Softmax only (no targets), in place: logits[N,V] -> probs[N,V].
    pub fn softmax_forward<S>(simd, probs: &mut [f32], n: usize, v: usize) {
        for r in 0..n {
            softmax_row(simd, &mut probs[r * v..][..v], 1.0);
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
            let sum: f64 = a.iter().map(|&x| x as f64).sum();
            let sq: f64 = a.iter().map(|&x| x as f64 * x as f64).sum();
            let s = Portable;
            assert!((lane_sum(s, &a, 0.0, |v| v) as f64 - sum).abs() < 1e-5, "sum, n={n}");
            assert!((lane_sum(s, &a, 0.0, |v| s.mul(v, v)) as f64 - sq).abs() < 1e-5, "sum of squares, n={n}");
        }
    }

    /// Inputs for the parity tests: ordinary values, large ones, ±0, and the exp clamp's edges.
    fn parity_inputs() -> Vec<f32> {
        let mut x: Vec<f32> = (0..3001).map(|i| (i as f32 - 1500.0) * 0.0123).collect();
        x.extend([0.0, -0.0, 87.0, -87.0, 88.5, -90.0, 1e-30, -1e-30, 17.3, -17.3, 0.5, -0.5, 3.0]);
        x
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_and_portable_lanes_give_the_same_bits() {
        let Some(avx) = crate::simd::Avx2::detect() else {
            eprintln!("no AVX2+FMA here: nothing to compare");
            return;
        };
        let p = Portable;
        let x = parity_inputs();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for (n, chunk) in x.chunks(8).enumerate() {
            let mut lanes = [0.0; 8];
            lanes[..chunk.len()].copy_from_slice(chunk);
            let mut got = [0.0; 8];
            avx.store(avx.exp(avx.load(&lanes)), &mut got);
            assert_eq!(bits(&got), bits(&p.exp(lanes)), "exp, chunk {n}");
            let (ya, ga) = gelu_and_grad(avx, avx.load(&lanes));
            let (yp, gp) = gelu_and_grad(p, lanes);
            let (mut y, mut g) = ([0.0; 8], [0.0; 8]);
            avx.store(ya, &mut y);
            avx.store(ga, &mut g);
            assert_eq!((bits(&y), bits(&g)), (bits(&yp), bits(&gp)), "gelu, chunk {n}");
            assert_eq!(avx.sum(avx.load(&lanes)).to_bits(), p.sum(lanes).to_bits(), "sum, chunk {n}");
        }
        for len in [1, 7, 8, 9, 64, 129, 256] {
            let (mut ra, mut rp) = (x[..len].to_vec(), x[..len].to_vec());
            softmax_row(avx, &mut ra, 0.17);
            softmax_row(p, &mut rp, 0.17);
            assert_eq!(bits(&ra), bits(&rp), "softmax row of {len}");
            let (sa, sp) = (lane_sum(avx, &x[..len], 0.0, |v| v), lane_sum(p, &x[..len], 0.0, |v| v));
            assert_eq!(sa.to_bits(), sp.to_bits(), "lane sum of {len}");
        }
    }

    #[test]
    fn softmax_rows_sum_to_one_and_propagate_nan() {
        for len in [1, 5, 8, 13, 256] {
            let mut row: Vec<f32> = (0..len).map(|i| (i * 7 % 5) as f32 - 30.0).collect();
            softmax_forward(&mut row, 1, len);
            let total: f64 = row.iter().map(|&p| p as f64).sum();
            assert!((total - 1.0).abs() < 1e-6 && row.iter().all(|&p| p > 0.0), "len {len}: {row:?}");
            let mut bad = vec![0.5f32; len];
            bad[len / 2] = f32::NAN;
            softmax_forward(&mut bad, 1, len);
            assert!(bad.iter().all(|p| p.is_nan()), "len {len}: a NaN logit must poison the row");
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
