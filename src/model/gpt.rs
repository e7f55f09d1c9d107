//! The whole model: forward (tokens → mean loss) and backward (→ parameter gradients).

use super::activations::Activations;
use super::layers::*;
use super::packed::PackedWeights;
use super::params::ParamLayout;
use crate::config::ModelConfig;
use std::ops::Range;

fn view(buf: &[f32], off: usize, len: usize) -> &[f32] {
    &buf[off..off + len]
}

/// Two disjoint mutable views of one buffer (for a weight and its bias, say).
fn two_mut(buf: &mut [f32], a: Range<usize>, b: Range<usize>) -> (&mut [f32], &mut [f32]) {
    assert!(a.end <= b.start, "two_mut: ranges must be ordered and disjoint");
    let (lo, hi) = buf.split_at_mut(b.start);
    (&mut lo[a], &mut hi[..b.end - b.start])
}

/// Runs the model on `inputs` [b,t] and, given `targets` [b,t], returns the mean
/// cross-entropy over all b·t positions (NaN without targets). Probabilities are left in
/// `acts.probs`; what backward needs is saved in `acts`.
pub fn forward(
    cfg: &ModelConfig,
    params: &[f32],
    acts: &mut Activations,
    inputs: &[u32],
    targets: Option<&[u32]>,
    b: usize,
    t: usize,
) -> f32 {
    let layout = ParamLayout::new(cfg);
    forward_with_layout(&layout, params, None, acts, inputs, targets, b, t)
}

/// [`forward`] with a precomputed layout and, optionally, the weights prepacked from the same
/// `params` (faster, same bits).
#[allow(clippy::too_many_arguments)]
pub fn forward_with_layout(
    layout: &ParamLayout,
    params: &[f32],
    packed: Option<&PackedWeights>,
    acts: &mut Activations,
    inputs: &[u32],
    targets: Option<&[u32]>,
    b: usize,
    t: usize,
) -> f32 {
    let cfg = layout.config;
    let (v, c, nh) = (cfg.vocab, cfg.embed, cfg.heads);
    assert_eq!(params.len(), layout.num_params(), "parameter buffer has the wrong length");
    assert!(
        b <= acts.cap_b && t <= acts.cap_t,
        "batch {b}x{t} exceeds activation capacity {}x{}",
        acts.cap_b,
        acts.cap_t
    );
    assert_eq!(acts.config, cfg, "activations were sized for another config");
    if let Some(pw) = packed {
        assert_eq!(pw.blocks.len(), cfg.layers, "packed weights were sized for another config");
    }
    let n = b * t;
    assert_eq!(inputs.len(), n, "inputs must hold b*t tokens");
    assert!(inputs.iter().all(|&x| (x as usize) < v), "input token out of vocabulary range");
    acts.b = b;
    acts.t = t;
    acts.inputs[..n].copy_from_slice(inputs);
    acts.has_targets = false;
    if let Some(tg) = targets {
        assert_eq!(tg.len(), n, "targets must hold b*t tokens");
        assert!(tg.iter().all(|&x| (x as usize) < v), "target token out of vocabulary range");
        acts.targets[..n].copy_from_slice(tg);
        acts.has_targets = true;
    }

    encoder_forward(
        &mut acts.encoded[..n * c],
        inputs,
        view(params, layout.wte, v * c),
        view(params, layout.wpe, cfg.context * c),
        b,
        t,
        c,
    );
    for l in 0..cfg.layers {
        let p = &layout.blocks[l];
        let pk = packed.map(|pw| &pw.blocks[l]);
        let (prev, rest) = acts.blocks.split_at_mut(l);
        let a = &mut rest[0];
        let resid: &[f32] = if l == 0 { &acts.encoded[..n * c] } else { &prev[l - 1].res3[..n * c] };
        layernorm_forward(
            &mut a.ln1[..n * c],
            &mut a.ln1_mean[..n],
            &mut a.ln1_rstd[..n],
            resid,
            view(params, p.ln1_w, c),
            view(params, p.ln1_b, c),
            n,
            c,
        );
        linear_forward(
            &mut a.qkv[..n * 3 * c],
            &a.ln1[..n * c],
            view(params, p.qkv_w, c * 3 * c),
            pk.map(|b| &b.qkv.fwd),
            view(params, p.qkv_b, 3 * c),
            n,
            c,
            3 * c,
        );
        attention_forward(&mut a.atty[..n * c], &mut a.att[..b * nh * t * t], &a.qkv[..n * 3 * c], b, t, c, nh);
        linear_forward(
            &mut a.res2[..n * c],
            &a.atty[..n * c],
            view(params, p.proj_w, c * c),
            pk.map(|b| &b.proj.fwd),
            view(params, p.proj_b, c),
            n,
            c,
            c,
        );
        add_inplace(&mut a.res2[..n * c], resid);
        layernorm_forward(
            &mut a.ln2[..n * c],
            &mut a.ln2_mean[..n],
            &mut a.ln2_rstd[..n],
            &a.res2[..n * c],
            view(params, p.ln2_w, c),
            view(params, p.ln2_b, c),
            n,
            c,
        );
        linear_forward(
            &mut a.fch[..n * 4 * c],
            &a.ln2[..n * c],
            view(params, p.fc_w, c * 4 * c),
            pk.map(|b| &b.fc.fwd),
            view(params, p.fc_b, 4 * c),
            n,
            c,
            4 * c,
        );
        // fch now holds GELU'(c_fc output): all the backward pass needs of it.
        gelu_forward_saving_grad(&mut a.fch_gelu[..n * 4 * c], &mut a.fch[..n * 4 * c]);
        linear_forward(
            &mut a.res3[..n * c],
            &a.fch_gelu[..n * 4 * c],
            view(params, p.fcproj_w, 4 * c * c),
            pk.map(|b| &b.fcproj.fwd),
            view(params, p.fcproj_b, c),
            n,
            4 * c,
            c,
        );
        add_inplace(&mut a.res3[..n * c], &a.res2[..n * c]);
    }
    let last: &[f32] = match acts.blocks.last() {
        Some(blk) => &blk.res3[..n * c],
        None => &acts.encoded[..n * c],
    };
    layernorm_forward(
        &mut acts.lnf[..n * c],
        &mut acts.lnf_mean[..n],
        &mut acts.lnf_rstd[..n],
        last,
        view(params, layout.lnf_w, c),
        view(params, layout.lnf_b, c),
        n,
        c,
    );
    // logits[N,V] = lnf[N,C] · wteᵀ (tied head)
    super::gemm::gemm_prepacked(
        n,
        v,
        c,
        &mut acts.probs[..n * v],
        v,
        super::gemm::Mat::rows(&acts.lnf[..n * c], c),
        super::gemm::Mat::transposed(view(params, layout.wte, v * c), c),
        packed.map(|pw| &pw.head.fwd),
        false,
    );
    match targets {
        Some(tg) => softmax_crossentropy_forward(&mut acts.probs[..n * v], &mut acts.losses[..n], tg, n, v),
        None => {
            softmax_forward(&mut acts.probs[..n * v], n, v);
            f32::NAN
        }
    }
}

/// Tensors whose gradient a GEMM writes in full during backward.
fn is_gemm_written(name: &str) -> bool {
    name == "wte.weight" || (name.starts_with("h.") && name.ends_with(".weight") && !name.contains(".ln_"))
}

/// Overwrites `grads` with d(mean loss)/d(params) for the last [`forward`] call (which must
/// have had targets). A pure function of (params, inputs, targets): the same bits whichever
/// thread runs it.
pub fn backward(cfg: &ModelConfig, params: &[f32], acts: &mut Activations, grads: &mut [f32]) {
    let layout = ParamLayout::new(cfg);
    backward_with_layout(&layout, params, None, acts, grads)
}

/// [`backward`] with a precomputed layout and, optionally, the weights prepacked from the same
/// `params` (faster, same bits).
pub fn backward_with_layout(
    layout: &ParamLayout,
    params: &[f32],
    packed: Option<&PackedWeights>,
    acts: &mut Activations,
    grads: &mut [f32],
) {
    let cfg = layout.config;
    let (v, c, nh) = (cfg.vocab, cfg.embed, cfg.heads);
    let (b, t) = (acts.b, acts.t);
    let n = b * t;
    assert!(acts.has_targets, "backward needs a forward pass with targets");
    assert_eq!(grads.len(), layout.num_params(), "gradient buffer has the wrong length");
    // Linear weights are written (not accumulated) by their GEMM, and the tied `wte` first by
    // the output head's GEMM; only the small accumulated tensors need zeroing, which saves a
    // write of the whole buffer per micro-batch.
    for spec in &layout.tensors {
        if !is_gemm_written(&spec.name) {
            grads[spec.range()].fill(0.0);
        }
    }

    let targets = &acts.targets[..n];
    crossentropy_softmax_backward(&mut acts.probs[..n * v], targets, n, v, 1.0 / n as f32);
    let dlogits = &acts.probs[..n * v];
    let wte = view(params, layout.wte, v * c);
    // dlnf[N,C] = dlogits · wte ; dwte += dlogitsᵀ · lnf
    use super::gemm::{gemm, gemm_prepacked, Mat};
    if let Some(pw) = packed {
        assert_eq!(pw.blocks.len(), cfg.layers, "packed weights were sized for another config");
    }
    let head_bwd = packed.map(|pw| &pw.head.bwd);
    gemm_prepacked(n, c, v, &mut acts.d_ln[..n * c], c, Mat::rows(dlogits, v), Mat::rows(wte, c), head_bwd, false);
    gemm(
        v,
        c,
        n,
        &mut grads[layout.wte..layout.wte + v * c],
        c,
        Mat::transposed(dlogits, v),
        Mat::rows(&acts.lnf[..n * c], c),
        false,
    );

    let d_res = &mut acts.d_res[..n * c];
    d_res.fill(0.0);
    {
        let last: &[f32] = match acts.blocks.last() {
            Some(blk) => &blk.res3[..n * c],
            None => &acts.encoded[..n * c],
        };
        let (dw, db) = two_mut(grads, layout.lnf_w..layout.lnf_w + c, layout.lnf_b..layout.lnf_b + c);
        layernorm_backward(
            d_res,
            dw,
            db,
            &acts.d_ln[..n * c],
            last,
            view(params, layout.lnf_w, c),
            &acts.lnf_mean[..n],
            &acts.lnf_rstd[..n],
            n,
            c,
        );
    }

    for l in (0..cfg.layers).rev() {
        let p = &layout.blocks[l];
        let pk = packed.map(|pw| &pw.blocks[l]);
        let a = &acts.blocks[l];
        let resid: &[f32] = if l == 0 { &acts.encoded[..n * c] } else { &acts.blocks[l - 1].res3[..n * c] };
        let d_ln = &mut acts.d_ln[..n * c];
        let d_big = &mut acts.d_big[..n * 4 * c];

        // MLP half: res3 = res2 + c_proj(gelu(c_fc(ln_2(res2))))
        {
            let (dw, db) = two_mut(grads, p.fcproj_w..p.fcproj_w + 4 * c * c, p.fcproj_b..p.fcproj_b + c);
            linear_backward(
                d_big,
                dw,
                db,
                d_res,
                &a.fch_gelu[..n * 4 * c],
                view(params, p.fcproj_w, 4 * c * c),
                pk.map(|b| &b.fcproj.bwd),
                n,
                4 * c,
                c,
                false,
            );
        }
        gelu_backward_saved(d_big, &a.fch[..n * 4 * c]);
        {
            let (dw, db) = two_mut(grads, p.fc_w..p.fc_w + c * 4 * c, p.fc_b..p.fc_b + 4 * c);
            linear_backward(
                d_ln,
                dw,
                db,
                d_big,
                &a.ln2[..n * c],
                view(params, p.fc_w, c * 4 * c),
                pk.map(|b| &b.fc.bwd),
                n,
                c,
                4 * c,
                false,
            );
        }
        {
            let (dw, db) = two_mut(grads, p.ln2_w..p.ln2_w + c, p.ln2_b..p.ln2_b + c);
            layernorm_backward(
                d_res,
                dw,
                db,
                d_ln,
                &a.res2[..n * c],
                view(params, p.ln2_w, c),
                &a.ln2_mean[..n],
                &a.ln2_rstd[..n],
                n,
                c,
            );
        }

        // Attention half: res2 = resid + c_proj(attn(c_attn(ln_1(resid))))
        {
            let (dw, db) = two_mut(grads, p.proj_w..p.proj_w + c * c, p.proj_b..p.proj_b + c);
            linear_backward(
                d_ln,
                dw,
                db,
                d_res,
                &a.atty[..n * c],
                view(params, p.proj_w, c * c),
                pk.map(|b| &b.proj.bwd),
                n,
                c,
                c,
                false,
            );
        }
        let d_qkv = &mut acts.d_qkv[..n * 3 * c];
        attention_backward(
            d_qkv,
            &mut acts.d_att[..t * t],
            d_ln,
            &a.qkv[..n * 3 * c],
            &a.att[..b * nh * t * t],
            b,
            t,
            c,
            nh,
        );
        {
            let (dw, db) = two_mut(grads, p.qkv_w..p.qkv_w + c * 3 * c, p.qkv_b..p.qkv_b + 3 * c);
            linear_backward(
                d_ln,
                dw,
                db,
                d_qkv,
                &a.ln1[..n * c],
                view(params, p.qkv_w, c * 3 * c),
                pk.map(|b| &b.qkv.bwd),
                n,
                c,
                3 * c,
                false,
            );
        }
        {
            let (dw, db) = two_mut(grads, p.ln1_w..p.ln1_w + c, p.ln1_b..p.ln1_b + c);
            layernorm_backward(
                d_res,
                dw,
                db,
                d_ln,
                resid,
                view(params, p.ln1_w, c),
                &a.ln1_mean[..n],
                &a.ln1_rstd[..n],
                n,
                c,
            );
        }
    }

    let (dwte, dwpe) = two_mut(grads, layout.wte..layout.wte + v * c, layout.wpe..layout.wpe + cfg.context * c);
    encoder_backward(dwte, dwpe, d_res, &acts.inputs[..n], b, t, c);
}
