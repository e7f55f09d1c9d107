//! The whole model: forward (tokens → mean loss) and backward (→ parameter gradients), laid
//! out as llm.c's `gpt2_forward`/`gpt2_backward`: the embedding, one short call per layer of
//! each block (`block_forward`, `block_backward`), then the tied output head.
//!
//! Shapes: B sequences of T positions, N = B·T rows, width C, NH heads, vocabulary V. Which
//! gradients the backward pass overwrites and which it accumulates (after zeroing them) is
//! [`super::params::TensorSpec::written_by_gemm`].

use super::activations::{Activations, BlockActs};
use super::dropout::{Dropout, Mask, Site};
use super::gemm::{gemm, gemm_prepacked};
use super::kernel::Mat;
use super::layers::*;
use super::packed::{PackedBlock, PackedWeights};
use super::params::{split_mut, BlockTensors, ParamLayout};
use crate::config::ModelConfig;

/// The sizes of one pass.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    /// N = B·T.
    n: usize,
}

impl Dims {
    fn new(cfg: &ModelConfig, b: usize, t: usize) -> Self {
        Dims { b, t, c: cfg.embed, nh: cfg.heads, n: b * t }
    }
    /// Elements of one head-by-head attention matrix for the batch: B·NH·T·T.
    fn att(&self) -> usize {
        self.b * self.nh * self.t * self.t
    }
}

/// One block's weights, as views of the parameters.
pub(super) type BlockWeights<'a> = BlockTensors<&'a [f32]>;

/// The residual stream entering block `blocks.len()`: the last block's output, or the
/// embeddings when there is none.
fn residual_after<'a>(blocks: &'a [BlockActs], encoded: &'a [f32], nc: usize) -> &'a [f32] {
    blocks.last().map_or(&encoded[..nc], |blk| &blk.res3[..nc])
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
    forward_dropout(layout, params, packed, acts, inputs, targets, b, t, None)
}

/// [`forward_with_layout`] in training mode: with `dropout` (see [`super::dropout`]) on the
/// attention probabilities and the two residual branches, which [`backward_with_layout`] then
/// follows. `None` is exactly [`forward_with_layout`].
#[allow(clippy::too_many_arguments)]
pub fn forward_dropout(
    layout: &ParamLayout,
    params: &[f32],
    packed: Option<&PackedWeights>,
    acts: &mut Activations,
    inputs: &[u32],
    targets: Option<&[u32]>,
    b: usize,
    t: usize,
    dropout: Option<Dropout>,
) -> f32 {
    load_batch(layout, params, packed, acts, inputs, targets, b, t);
    let d = body_forward(layout, params, packed, acts, inputs, b, t, dropout);
    head_forward(layout, params, packed, acts, targets, d, 0)
}

/// The next-token probabilities after the last of `inputs` [1,t] only, in `acts.probs_at(0,
/// t - 1)` (the other rows of `acts.probs` are not computed): what sampling needs. The blocks
/// run as in [`forward_with_layout`], and the final LayerNorm, the logits and the softmax are
/// row by row there, so this row has the same bits as that call's; the head, a third of a
/// GPT-2 124M forward over the whole window, is skipped for the other rows.
pub fn forward_last_position(
    layout: &ParamLayout,
    params: &[f32],
    packed: Option<&PackedWeights>,
    acts: &mut Activations,
    inputs: &[u32],
    t: usize,
) {
    load_batch(layout, params, packed, acts, inputs, None, 1, t);
    let d = body_forward(layout, params, packed, acts, inputs, 1, t, None);
    head_forward(layout, params, packed, acts, None, d, t - 1);
}

/// The embeddings and every block on the batch [`load_batch`] recorded; returns its dims.
#[allow(clippy::too_many_arguments)]
fn body_forward(
    layout: &ParamLayout,
    params: &[f32],
    packed: Option<&PackedWeights>,
    acts: &mut Activations,
    inputs: &[u32],
    b: usize,
    t: usize,
    dropout: Option<Dropout>,
) -> Dims {
    acts.dropout = dropout;
    let d = Dims::new(&layout.config, b, t);
    let nc = d.n * d.c;
    let (wte, wpe) = (&params[layout.wte.clone()], &params[layout.wpe.clone()]);
    encoder_forward(&mut acts.encoded[..nc], inputs, wte, wpe, b, t, d.c);
    for (l, p) in layout.blocks.iter().enumerate() {
        let (done, rest) = acts.blocks.split_at_mut(l);
        let resid = residual_after(done, &acts.encoded, nc);
        let masks = dropout.map(|dr| BlockMasks::new(&dr, l));
        block_forward(&p.of(params), packed.map(|pw| &pw.blocks[l]), &mut rest[0], resid, d, masks);
    }
    d
}

/// Checks a forward call's arguments and records the batch in `acts`.
#[allow(clippy::too_many_arguments)]
fn load_batch(
    layout: &ParamLayout,
    params: &[f32],
    packed: Option<&PackedWeights>,
    acts: &mut Activations,
    inputs: &[u32],
    targets: Option<&[u32]>,
    b: usize,
    t: usize,
) {
    let cfg = layout.config;
    let v = cfg.vocab;
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
}

/// One block's dropout masks.
#[derive(Clone, Copy)]
pub(super) struct BlockMasks {
    probs: Mask,
    proj: Mask,
    mlp: Mask,
}

impl BlockMasks {
    fn new(d: &Dropout, layer: usize) -> Self {
        BlockMasks {
            probs: d.mask(layer, Site::AttnProbs),
            proj: d.mask(layer, Site::AttnProj),
            mlp: d.mask(layer, Site::MlpOut),
        }
    }
}

/// One transformer block, `resid` [N,C] in, `a.res3` [N,C] out:
/// res2 = resid + c_proj(attn(c_attn(ln_1(resid)))), res3 = res2 + c_proj(gelu(c_fc(ln_2(res2)))),
/// with `masks` on the attention probabilities and on both c_proj outputs.
fn block_forward(
    w: &BlockWeights,
    pk: Option<&PackedBlock>,
    a: &mut BlockActs,
    resid: &[f32],
    d: Dims,
    masks: Option<BlockMasks>,
) {
    let (n, nc) = (d.n, d.n * d.c);
    let rows = BlockRows {
        ln1: &mut a.ln1[..nc],
        ln1_mean: &mut a.ln1_mean[..n],
        ln1_rstd: &mut a.ln1_rstd[..n],
        atty: &mut a.atty[..nc],
        res2: &mut a.res2[..nc],
        ln2: &mut a.ln2[..nc],
        ln2_mean: &mut a.ln2_mean[..n],
        ln2_rstd: &mut a.ln2_rstd[..n],
        fch: &mut a.fch[..4 * nc],
        fch_gelu: &mut a.fch_gelu[..4 * nc],
        res3: &mut a.res3[..nc],
    };
    // att[B,NH,T,T] saved for the backward pass.
    let (att, probs) = (&mut a.att[..d.att()], masks.map(|m| m.probs));
    block_rows(w, pk, rows, &mut a.qkv[..3 * nc], 0, resid, n, d.c, masks, |atty, qkv| {
        attention_forward_dropout(atty, att, qkv, d.b, d.t, d.c, d.nh, probs)
    });
}

/// One block's buffers for the `n` rows a pass computes: views of a [`BlockActs`], or
/// generation's single new row ([`super::kv`]).
pub(super) struct BlockRows<'a> {
    pub ln1: &'a mut [f32],
    pub ln1_mean: &'a mut [f32],
    pub ln1_rstd: &'a mut [f32],
    pub atty: &'a mut [f32],
    pub res2: &'a mut [f32],
    pub ln2: &'a mut [f32],
    pub ln2_mean: &'a mut [f32],
    pub ln2_rstd: &'a mut [f32],
    pub fch: &'a mut [f32],
    pub fch_gelu: &'a mut [f32],
    pub res3: &'a mut [f32],
}

/// A block's steps, all row by row but `attend`: `resid` [n,C] in, `a.res3` [n,C] out. The
/// q|k|v of the `n` rows go to rows `first..first + n` of `qkv` [.., 3C]; `attend(atty, qkv)`
/// then writes the attention output [n,C] from the whole of `qkv` (a pass's own rows, or the
/// rows generation cached before them).
#[allow(clippy::too_many_arguments)]
pub(super) fn block_rows(
    w: &BlockWeights,
    pk: Option<&PackedBlock>,
    a: BlockRows,
    qkv: &mut [f32],
    first: usize,
    resid: &[f32],
    n: usize,
    c: usize,
    masks: Option<BlockMasks>,
    attend: impl FnOnce(&mut [f32], &[f32]),
) {
    // ln1[n,C], qkv[n,3C], atty[n,C], res2[n,C]
    layernorm_forward(a.ln1, a.ln1_mean, a.ln1_rstd, resid, w.ln1_w, w.ln1_b, n, c);
    let new_qkv = &mut qkv[first * 3 * c..(first + n) * 3 * c];
    linear_forward(new_qkv, a.ln1, w.qkv_w, pk.map(|k| &k.qkv.fwd), w.qkv_b, n, c, 3 * c);
    attend(a.atty, qkv);
    linear_forward(a.res2, a.atty, w.proj_w, pk.map(|k| &k.proj.fwd), w.proj_b, n, c, c);
    if let Some(m) = masks {
        m.proj.apply(a.res2, 0);
    }
    add_inplace(a.res2, resid);
    // ln2[n,C], fch[n,4C], fch_gelu[n,4C], res3[n,C]
    layernorm_forward(a.ln2, a.ln2_mean, a.ln2_rstd, a.res2, w.ln2_w, w.ln2_b, n, c);
    linear_forward(a.fch, a.ln2, w.fc_w, pk.map(|k| &k.fc.fwd), w.fc_b, n, c, 4 * c);
    // fch now holds GELU'(c_fc output): all the backward pass needs of it.
    gelu_forward_saving_grad(a.fch_gelu, a.fch);
    let fcproj = pk.map(|k| &k.fcproj.fwd);
    linear_forward(a.res3, a.fch_gelu, w.fcproj_w, fcproj, w.fcproj_b, n, 4 * c, c);
    if let Some(m) = masks {
        m.mlp.apply(a.res3, 0);
    }
    add_inplace(a.res3, a.res2);
}

/// The final LayerNorm and the tied output head on positions `first..N`: lnf = ln_f(last
/// residual), logits[.., V] = lnf · wteᵀ, then probabilities in place and, with targets (all N;
/// `first` must be 0), the mean loss. Every step is row by row, so a row gets the same bits
/// whatever `first` is; the rows before `first` are left as they were.
fn head_forward(
    layout: &ParamLayout,
    params: &[f32],
    packed: Option<&PackedWeights>,
    acts: &mut Activations,
    targets: Option<&[u32]>,
    d: Dims,
    first: usize,
) -> f32 {
    let (n, c, nc, v) = (d.n, d.c, d.n * d.c, layout.config.vocab);
    assert!(first < n && (targets.is_none() || first == 0), "head rows {first}..{n}");
    let (m, rc) = (n - first, first * c);
    let last = &residual_after(&acts.blocks, &acts.encoded, nc)[rc..];
    let (mean, rstd) = (&mut acts.lnf_mean[first..n], &mut acts.lnf_rstd[first..n]);
    let probs = &mut acts.probs[first * v..n * v];
    head_logits(layout, params, packed, last, &mut acts.lnf[rc..nc], mean, rstd, probs, m);
    match targets {
        Some(tg) => softmax_crossentropy_forward(probs, &mut acts.losses[..n], tg, n, v),
        None => {
            softmax_forward(probs, m, v);
            f32::NAN
        }
    }
}

/// The final LayerNorm of `m` rows of the last residual `resid` [m,C] into `lnf` (with its
/// `mean`, `rstd` [m]) and their tied-head logits lnf · wteᵀ into `logits` [m,V].
#[allow(clippy::too_many_arguments)]
pub(super) fn head_logits(
    layout: &ParamLayout,
    params: &[f32],
    packed: Option<&PackedWeights>,
    resid: &[f32],
    lnf: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    logits: &mut [f32],
    m: usize,
) {
    let (c, v) = (layout.config.embed, layout.config.vocab);
    let (lnf_w, lnf_b) = (&params[layout.lnf_w.clone()], &params[layout.lnf_b.clone()]);
    layernorm_forward(lnf, mean, rstd, resid, lnf_w, lnf_b, m, c);
    let (lnf, wte) = (Mat::rows(lnf, c), Mat::transposed(&params[layout.wte.clone()], c));
    gemm_prepacked(m, v, c, logits, v, lnf, wte, packed.map(|pw| &pw.head.fwd), false);
}

/// Overwrites `grads` with d(mean loss)/d(params) for the last [`forward`] call (which must
/// have had targets). A pure function of (params, inputs, targets): the same bits whichever
/// thread runs it.
pub fn backward(cfg: &ModelConfig, params: &[f32], acts: &mut Activations, grads: &mut [f32]) {
    let layout = ParamLayout::new(cfg);
    backward_with_layout(&layout, params, None, acts, grads)
}

/// The backward pass's scratch, sliced to the batch.
struct Scratch<'a> {
    /// dL/d(residual stream) [N,C], carried from block to block.
    d_res: &'a mut [f32],
    /// dL/d(a LayerNorm's output, or a linear layer's input) [N,C].
    d_ln: &'a mut [f32],
    /// dL/d(the MLP's hidden layer) [N,4C].
    d_big: &'a mut [f32],
    /// dL/d(q|k|v) [N,3C].
    d_qkv: &'a mut [f32],
    /// dL/d(one head's attention scores) [T,T].
    d_att: &'a mut [f32],
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
    let d = Dims::new(&cfg, acts.b, acts.t);
    let nc = d.n * d.c;
    assert!(acts.has_targets, "backward needs a forward pass with targets");
    assert_eq!(grads.len(), layout.num_params(), "gradient buffer has the wrong length");
    if let Some(pw) = packed {
        assert_eq!(pw.blocks.len(), cfg.layers, "packed weights were sized for another config");
    }
    // Linear weights are written (not accumulated) by their GEMM, and the tied `wte` first by
    // the output head's GEMM; only the small accumulated tensors need zeroing, which saves a
    // write of the whole buffer per micro-batch.
    for spec in layout.tensors.iter().filter(|spec| !spec.written_by_gemm) {
        grads[spec.range()].fill(0.0);
    }
    head_backward(layout, params, packed, acts, grads, d);
    let mut s = Scratch {
        d_res: &mut acts.d_res[..nc],
        d_ln: &mut acts.d_ln[..nc],
        d_big: &mut acts.d_big[..4 * nc],
        d_qkv: &mut acts.d_qkv[..3 * nc],
        d_att: &mut acts.d_att[..d.t * d.t],
    };
    for (l, p) in layout.blocks.iter().enumerate().rev() {
        let resid = residual_after(&acts.blocks[..l], &acts.encoded, nc);
        let pk = packed.map(|pw| &pw.blocks[l]);
        let masks = acts.dropout.map(|dr| BlockMasks::new(&dr, l));
        block_backward(&p.of(params), pk, &acts.blocks[l], resid, p.of_mut(grads), &mut s, d, masks);
    }
    let [dwte, dwpe] = split_mut(grads, [&layout.wte, &layout.wpe]);
    encoder_backward(dwte, dwpe, s.d_res, &acts.inputs[..d.n], d.b, d.t, d.c);
}

/// Backward through the loss, the tied head and ln_f: `acts.probs` becomes dlogits[N,V],
/// dwte[V,C] is written (overwrites), and `d_res` becomes dL/d(last residual)[N,C].
fn head_backward(
    layout: &ParamLayout,
    params: &[f32],
    packed: Option<&PackedWeights>,
    acts: &mut Activations,
    grads: &mut [f32],
    d: Dims,
) {
    let (n, c, nc, v) = (d.n, d.c, d.n * d.c, layout.config.vocab);
    crossentropy_softmax_backward(&mut acts.probs[..n * v], &acts.targets[..n], n, v, 1.0 / n as f32);
    let dlogits = &acts.probs[..n * v];
    let wte = &params[layout.wte.clone()];
    // dlnf[N,C] = dlogits · wte ; dwte = dlogitsᵀ · lnf
    let head_bwd = packed.map(|pw| &pw.head.bwd);
    gemm_prepacked(n, c, v, &mut acts.d_ln[..nc], c, Mat::rows(dlogits, v), Mat::rows(wte, c), head_bwd, false);
    let (dlogits_t, lnf) = (Mat::transposed(dlogits, v), Mat::rows(&acts.lnf[..nc], c));
    gemm(v, c, n, &mut grads[layout.wte.clone()], c, dlogits_t, lnf, false);

    let d_res = &mut acts.d_res[..nc];
    d_res.fill(0.0);
    let last = residual_after(&acts.blocks, &acts.encoded, nc);
    let [dw, db] = split_mut(grads, [&layout.lnf_w, &layout.lnf_b]);
    let (w, mean, rstd) = (&params[layout.lnf_w.clone()], &acts.lnf_mean[..n], &acts.lnf_rstd[..n]);
    layernorm_backward(d_res, dw, db, &acts.d_ln[..nc], last, w, mean, rstd, n, c);
}

/// Backward through one block (see [`block_forward`]): `s.d_res` goes from dL/d(res3) to
/// dL/d(resid); the block's weight gradients are written and its other gradients accumulated
/// into `g`.
#[allow(clippy::too_many_arguments)]
fn block_backward(
    w: &BlockWeights,
    pk: Option<&PackedBlock>,
    a: &BlockActs,
    resid: &[f32],
    g: BlockTensors<&mut [f32]>,
    s: &mut Scratch,
    d: Dims,
    masks: Option<BlockMasks>,
) {
    let (n, c, nc) = (d.n, d.c, d.n * d.c);
    // MLP half, from d_res = dL/d(res3): d_big[N,4C] (through GELU), d_ln[N,C], d_res += ...
    // With dropout, c_proj's output gradient is d_res through the mask, in d_ln (free here).
    let fcproj = pk.map(|k| &k.fcproj.bwd);
    let d_mlp: &[f32] = match masks {
        None => &*s.d_res,
        Some(m) => {
            m.mlp.apply_into(s.d_ln, s.d_res, 0);
            &*s.d_ln
        }
    };
    linear_backward(s.d_big, g.fcproj_w, g.fcproj_b, d_mlp, &a.fch_gelu[..4 * nc], w.fcproj_w, fcproj, n, 4 * c, c);
    gelu_backward_saved(s.d_big, &a.fch[..4 * nc]);
    linear_backward(s.d_ln, g.fc_w, g.fc_b, s.d_big, &a.ln2[..nc], w.fc_w, pk.map(|k| &k.fc.bwd), n, c, 4 * c);
    let (res2, mean2, rstd2) = (&a.res2[..nc], &a.ln2_mean[..n], &a.ln2_rstd[..n]);
    layernorm_backward(s.d_res, g.ln2_w, g.ln2_b, s.d_ln, res2, w.ln2_w, mean2, rstd2, n, c);
    // Attention half, from d_res = dL/d(res2): d_ln[N,C], d_qkv[N,3C], d_ln[N,C], d_res += ...
    // With dropout, c_proj's output gradient is d_res through the mask, in d_qkv (free here).
    let d_proj: &[f32] = match masks {
        None => &*s.d_res,
        Some(m) => {
            m.proj.apply_into(&mut s.d_qkv[..nc], s.d_res, 0);
            &s.d_qkv[..nc]
        }
    };
    let proj = pk.map(|k| &k.proj.bwd);
    linear_backward(s.d_ln, g.proj_w, g.proj_b, d_proj, &a.atty[..nc], w.proj_w, proj, n, c, c);
    let (qkv, att, probs) = (&a.qkv[..3 * nc], &a.att[..d.att()], masks.map(|m| m.probs));
    attention_backward_dropout(s.d_qkv, s.d_att, s.d_ln, qkv, att, d.b, d.t, c, d.nh, probs);
    linear_backward(s.d_ln, g.qkv_w, g.qkv_b, s.d_qkv, &a.ln1[..nc], w.qkv_w, pk.map(|k| &k.qkv.bwd), n, c, 3 * c);
    let (mean1, rstd1) = (&a.ln1_mean[..n], &a.ln1_rstd[..n]);
    layernorm_backward(s.d_res, g.ln1_w, g.ln1_b, s.d_ln, resid, w.ln1_w, mean1, rstd1, n, c);
}
