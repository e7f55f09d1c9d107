//! Forward/backward pairs for each layer of the transformer. Shapes are given above each
//! function; N = B·T rows. Backward functions ACCUMULATE into parameter gradients (a
//! parameter may be used more than once, e.g. the tied `wte`) and into input gradients unless
//! the comment says "overwrites".

use super::gemm::{gemm, Mat};

/// LayerNorm epsilon, as GPT-2.
pub const LN_EPS: f32 = 1e-5;

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

/// out[N,C] = (inp - mean) · rstd · w + b; saves mean[N], rstd[N] for the backward pass.
#[allow(clippy::too_many_arguments)]
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
        let mut s = 0.0f32;
        for &v in x {
            s += v;
        }
        let m = s / c as f32;
        let mut var = 0.0f32;
        for &v in x {
            let d = v - m;
            var += d * d;
        }
        let rs = 1.0 / (var / c as f32 + LN_EPS).sqrt();
        let o = &mut out[r * c..][..c];
        for i in 0..c {
            o[i] = (x[i] - m) * rs * w[i] + bias[i];
        }
        mean[r] = m;
        rstd[r] = rs;
    }
}

/// dinp[N,C] += ..., dw[C] += ..., db[C] += ... (one pass per row over dout and inp).
#[allow(clippy::too_many_arguments)]
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
        let mut dnorm_mean = 0.0f32;
        let mut dnorm_norm_mean = 0.0f32;
        for i in 0..c {
            let norm = (x[i] - m) * rs;
            let dn = w[i] * d[i];
            dnorm_mean += dn;
            dnorm_norm_mean += dn * norm;
        }
        dnorm_mean /= c as f32;
        dnorm_norm_mean /= c as f32;
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

// ---------------------------------------------------------------------------------------
// Linear (Conv1D convention: w is [IC, OC], y = x·w + b)
// ---------------------------------------------------------------------------------------

/// out[N,OC] = inp[N,IC] · w[IC,OC] + bias[OC]
pub fn linear_forward(out: &mut [f32], inp: &[f32], w: &[f32], bias: &[f32], n: usize, ic: usize, oc: usize) {
    for r in 0..n {
        out[r * oc..][..oc].copy_from_slice(&bias[..oc]);
    }
    gemm(n, oc, ic, out, oc, Mat::rows(inp, ic), Mat::rows(w, oc), true);
}

/// dinp[N,IC] (overwrites, or accumulates when `accumulate_dinp`) = dout · wᵀ;
/// dw[IC,OC] += inpᵀ · dout; dbias[OC] += Σ_rows dout.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    dinp: &mut [f32],
    dw: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    n: usize,
    ic: usize,
    oc: usize,
    accumulate_dinp: bool,
) {
    gemm(n, ic, oc, dinp, ic, Mat::rows(dout, oc), Mat::transposed(w, oc), accumulate_dinp);
    gemm(ic, oc, n, dw, oc, Mat::transposed(inp, ic), Mat::rows(dout, oc), true);
    bias_backward(dbias, dout, n, oc);
}

/// dbias[OC] += Σ_rows dout[N,OC]
pub fn bias_backward(dbias: &mut [f32], dout: &[f32], n: usize, oc: usize) {
    for r in 0..n {
        let d = &dout[r * oc..][..oc];
        for (db, &g) in dbias[..oc].iter_mut().zip(d) {
            *db += g;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Causal multi-head self-attention
// ---------------------------------------------------------------------------------------

/// out[B,T,C] = softmax(Q·Kᵀ/√hd, causal)·V per head; att[B,NH,T,T] saves the probabilities
/// (zero above the diagonal). qkv[B,T,3C] holds Q | K | V, each split into NH heads of hd.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(out: &mut [f32], att: &mut [f32], qkv: &[f32], b: usize, t: usize, c: usize, nh: usize) {
    let hd = c / nh;
    let scale = 1.0 / (hd as f32).sqrt();
    let c3 = 3 * c;
    for bi in 0..b {
        for h in 0..nh {
            let base = bi * t * c3 + h * hd;
            let q = Mat::strided(&qkv[base..], c3, 1);
            let kt = Mat::strided(&qkv[base + c..], 1, c3);
            let v = Mat::strided(&qkv[base + 2 * c..], c3, 1);
            let p = &mut att[(bi * nh + h) * t * t..][..t * t];
            gemm(t, t, hd, p, t, q, kt, false);
            for i in 0..t {
                let row = &mut p[i * t..][..t];
                let mut mx = f32::NEG_INFINITY;
                for &s in &row[..=i] {
                    mx = mx.max(s);
                }
                let mut sum = 0.0f32;
                for s in &mut row[..=i] {
                    let e = ((*s - mx) * scale).exp();
                    *s = e;
                    sum += e;
                }
                let inv = 1.0 / sum;
                for s in &mut row[..=i] {
                    *s *= inv;
                }
                row[i + 1..].fill(0.0);
            }
            let o = &mut out[bi * t * c + h * hd..];
            gemm(t, hd, t, o, c, Mat::rows(p, t), v, false);
        }
    }
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
    for bi in 0..b {
        for h in 0..nh {
            let base = bi * t * c3 + h * hd;
            let p = &att[(bi * nh + h) * t * t..][..t * t];
            let dout_h = Mat::strided(&dout[bi * t * c + h * hd..], c, 1);
            let ds = &mut datt[..t * t];
            // dP = dOut · Vᵀ
            gemm(t, t, hd, ds, t, dout_h, Mat::strided(&qkv[base + 2 * c..], 1, c3), false);
            // dV = Pᵀ · dOut
            gemm(t, hd, t, &mut dqkv[base + 2 * c..], c3, Mat::transposed(p, t), dout_h, false);
            // softmax backward, folding in the score scale: dS = P ⊙ (dP - rowsum(P ⊙ dP)) / √hd
            for i in 0..t {
                let pr = &p[i * t..][..t];
                let dr = &mut ds[i * t..][..t];
                let mut dot = 0.0f32;
                for j in 0..=i {
                    dot += pr[j] * dr[j];
                }
                for j in 0..=i {
                    dr[j] = pr[j] * (dr[j] - dot) * scale;
                }
                dr[i + 1..].fill(0.0);
            }
            // dQ = dS · K ; dK = dSᵀ · Q
            let k = Mat::strided(&qkv[base + c..], c3, 1);
            let q = Mat::strided(&qkv[base..], c3, 1);
            gemm(t, hd, t, &mut dqkv[base..], c3, Mat::rows(ds, t), k, false);
            gemm(t, hd, t, &mut dqkv[base + c..], c3, Mat::transposed(ds, t), q, false);
        }
    }
}

// ---------------------------------------------------------------------------------------
// GELU (tanh approximation) and residual
// ---------------------------------------------------------------------------------------

const GELU_K: f32 = 0.797_884_6; // sqrt(2/pi)

/// out = 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))
pub fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    for (o, &x) in out.iter_mut().zip(inp) {
        let u = GELU_K * (x + 0.044715 * x * x * x);
        *o = 0.5 * x * (1.0 + u.tanh());
    }
}

/// dinp (overwrites) = gelu'(inp) · dout
pub fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    for ((di, &x), &d) in dinp.iter_mut().zip(inp).zip(dout) {
        let u = GELU_K * (x + 0.044715 * x * x * x);
        let th = u.tanh();
        let sech2 = 1.0 - th * th;
        let grad = 0.5 * (1.0 + th) + 0.5 * x * sech2 * GELU_K * (1.0 + 3.0 * 0.044715 * x * x);
        *di = grad * d;
    }
}

/// In place: d[·] = gelu'(inp) · d
pub fn gelu_backward_inplace(d: &mut [f32], inp: &[f32]) {
    for (di, &x) in d.iter_mut().zip(inp) {
        let u = GELU_K * (x + 0.044715 * x * x * x);
        let th = u.tanh();
        let sech2 = 1.0 - th * th;
        let grad = 0.5 * (1.0 + th) + 0.5 * x * sech2 * GELU_K * (1.0 + 3.0 * 0.044715 * x * x);
        *di *= grad;
    }
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
    let mut total = 0.0f64;
    for r in 0..n {
        let row = &mut probs[r * v..][..v];
        let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for x in row.iter_mut() {
            let e = (*x - mx).exp();
            *x = e;
            sum += e;
        }
        let inv = 1.0 / sum;
        for x in row.iter_mut() {
            *x *= inv;
        }
        let l = -row[targets[r] as usize].ln();
        losses[r] = l;
        total += l as f64;
    }
    (total / n as f64) as f32
}

/// Softmax only (no targets), in place: logits[N,V] -> probs[N,V].
pub fn softmax_forward(probs: &mut [f32], n: usize, v: usize) {
    for r in 0..n {
        let row = &mut probs[r * v..][..v];
        let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for x in row.iter_mut() {
            let e = (*x - mx).exp();
            *x = e;
            sum += e;
        }
        let inv = 1.0 / sum;
        for x in row.iter_mut() {
            *x *= inv;
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
