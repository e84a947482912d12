#!/usr/bin/python3
"""Independent PyTorch (CPU) reference for the Mamba-2 language model.

What it computes
----------------
The forward pass, summed cross-entropy loss and parameter gradients, in float64, of a
Mamba-2 causal LM with the semantics of Hugging Face transformers' ``Mamba2ForCausalLM``
(``Mamba2Mixer.torch_forward``) and state-spaces ``mamba_ssm.modules.mamba2.Mamba2``
(``rmsnorm=True, norm_before_gate=False, D_has_hdim=False, bias=False, conv_bias=True``),
no cache, initial SSM/conv state zero, tied or untied LM head:

    h = E[tokens]                                    backbone.embeddings.weight [V, D]
    for each layer i:                                (state-spaces: backbone.embedding.weight)
        h = h + mixer_i(rmsnorm(h) * norm_i.weight)  backbone.layers.i.norm.weight [D]
    logits = (rmsnorm(h) * norm_f.weight) @ H^T      backbone.norm_f.weight [D]
        H = E (tied; no lm_head.weight is stored), or lm_head.weight [V, D] (untied)
    loss = SUM_{t: target[t] != -1} cross_entropy(logits[t], target[t])

    rmsnorm(x) = x * rsqrt(mean(x^2, -1) + eps)

    mixer(u), u: [T, D], with E = expand * D (d_inner), P = head_dim, H = E / P heads,
    G = n_groups, N = state_size, W = conv_kernel, conv_dim = E + 2 G N:
        z, xBC, dt = split(u @ in_proj^T, [E, conv_dim, H])      in_proj.weight [2E + 2GN + H, D]
        xc[t,c] = conv1d.bias[c]
                  + sum_{j<W} conv1d.weight[c,0,j] * xBC[t-(W-1)+j, c]   (xBC = 0 before t = 0)
        x, B, C = split(silu(xc), [E, G N, G N]);  x -> [H, P], B, C -> [G, N]
        head h reads group g(h) = h // (H / G)            (HF: B.repeat_interleave(H / G))
        dt = softplus(dt + dt_bias)                                     dt_bias [H]
             clamped to [lo, hi] when time_step_limit = (lo, hi) != (0, inf)
        A = -exp(A_log)                                                 A_log [H]
        s_t[h] = exp(dt[t,h] A[h]) s_{t-1}[h] + dt[t,h] x[t,h] (x) B[t,g(h)],  s_{-1} = 0,
                 s_t[h] of shape [P, N]
        y[t,h,:] = s_t[h] C[t,g(h)] + D[h] x[t,h,:]                      D [H]
                 (D multiplies the conv output x, before the dt scaling)
        g = y * silu(z)                                                 (over d_inner = E)
        g = g * rsqrt(mean(g^2 over its group of E/G channels) + eps) * norm.weight   [E]
        out = g @ out_proj^T                                            out_proj.weight [D, E]

The gated RMSNorm is normalised per group of E / G channels, as mamba_ssm
(``RMSNormGated(group_size=d_ssm // ngroups)``) and the fused kernels do it. Hugging Face's
slow path (``MambaRMSNormGated``) takes the mean over all of d_inner instead; the two agree
exactly when G = 1 and differ when G > 1. ``gated_rmsnorm(..., per_group=False)`` is the
HF variant; it is used only by the self-check that both agree for G = 1 (and that they do
differ for G = 2). The fixtures are the per-group model. The norm's eps is the config's
layer_norm_epsilon (mamba_ssm hard-codes 1e-5, which is what the fixtures use).

Two older transformers versions differ in their slow path, and the fixtures avoid both:
some tiled B and C with ``B.repeat(1, 1, H / G, 1)`` (head h reading group h mod G; here,
as in mamba_ssm and current HF, h // (H / G): the two agree only for G = 1), and some
clamped dt at time_step_min (1e-3) instead of time_step_limit (every dt in the fixtures is
above 0.012, so that clamp would not change them).

Targets are used as given (no internal shift; -1 = ignored position), as in
mamba_reference.py. Like the Mamba-1 reference, the model has no packed-document
(sequence start) mask and starts from a zero state; the scans themselves accept an optional
initial state and return the final one, which the self-check compares between the two.

The SSM is evaluated by a sequential recurrence (``ssd_sequential``, one token at a time);
an independent chunked SSD form (``ssd_chunked``: intra-chunk quadratic form with
segment-sum decays, inter-chunk state passing, chunk lengths that do not divide T) is used
only to check it. Safetensors I/O, the shifted-sum causal convolution, rmsnorm and the
summed CE are the ones of mamba_reference.py (imported).

Fixtures (``make_fixture``), each a directory with config.json, model.safetensors (float32
weights) and reference.safetensors (float64 reference outputs: input_ids I64 [B, T],
targets I64 [B, T] (-1 = ignored), logits F64 [B, T, V], loss F64 [1], and grad.<param
name> F64 for every stored parameter, d(loss)/d(param) computed in float64 from the float32
weights cast to double), with D = 16, head_dim 4, expand 2 (E = 32, H = 8), N = 4, W = 4,
2 layers, B = 2 sequences of T = 13 tokens (no chunk length of interest divides 13):

    tests/data/mamba2_tiny/    Hugging Face layout (Mamba2ForCausalLM config.json), tied, G = 1, V = 32
    tests/data/mamba2_groups/  Hugging Face layout, untied (lm_head.weight [V, D]), G = 2, V = 32
    tests/data/mamba2_ss/      state-spaces/mamba layout (d_model, n_layer, ssm_cfg {layer:
                               "Mamba2", ...}, backbone.embedding.weight), tied, G = 1:
                               vocab_size 29 padded to pad_vocab_size_multiple 8, V = 32

The Hugging Face config.json writes time_step_limit as ``[0.0, Infinity]`` (Python's json
spelling of float('inf'), as save_pretrained writes it); flat lists are kept on one line.

Before writing anything it runs self-checks (and aborts if one fails), for every fixture:
  * sequential recurrence vs. chunked SSD on random inputs (G = 1 and 2, a nonzero initial
    state, chunk lengths 1, 4, 5, 8, 13, 16; outputs and final states) and in the full
    model (chunk 4, 5, 16, with torch's conv1d): max abs diff <= 1e-12;
  * explicit shifted-sum causal conv vs. torch.nn.functional.conv1d;
  * hand-written summed CE vs. torch.nn.functional.cross_entropy;
  * gated RMSNorm per group vs. over all of d_inner: equal for G = 1 (random inputs and the
    model's logits), different for G = 2;
  * autograd float64 gradients vs. central finite differences (4-point stencil) on one
    random entry of every parameter plus a few more, and along random directions;
  * safetensors round trip of every written file.

How to run (PyTorch 1.13 from Debian, i.e. /usr/bin/python3; CPU only)
---------------------------------------------------------------------
    /usr/bin/python3 tests/reference/mamba2_reference.py            # writes tests/data/mamba2_*
    /usr/bin/python3 tests/reference/mamba2_reference.py --out DIR  # writes DIR/mamba2_*
    /usr/bin/python3 tests/reference/mamba2_reference.py --check-only
    /usr/bin/python3 tests/reference/compare_fixture.py DIR/mamba2_tiny tests/data/mamba2_tiny

Output is deterministic (fixed seeds, single thread, fixed JSON layout): running it twice
gives byte-identical files.
"""

import argparse
import json
import math
import os
import sys
from collections import OrderedDict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mamba_reference as m1  # noqa: E402  (safetensors I/O, conv, rmsnorm, summed CE)

save_safetensors, load_safetensors = m1.save_safetensors, m1.load_safetensors
causal_conv_shift, causal_conv_torch = m1.causal_conv_shift, m1.causal_conv_torch
rmsnorm, summed_ce = m1.rmsnorm, m1.summed_ce

# ---------------------------------------------------------------------------
# Fixture configuration
# ---------------------------------------------------------------------------

TINY = OrderedDict(
    vocab_size=32,
    hidden_size=16,
    num_hidden_layers=2,
    state_size=4,
    head_dim=4,
    expand=2,
    n_groups=1,
    conv_kernel=4,
    layer_norm_epsilon=1e-5,
    chunk_size=256,  # written to config.json only; the math does not depend on it
)
GROUPS = OrderedDict(TINY, n_groups=2, tie=False)
SS = OrderedDict(TINY, layout="ss", ss_vocab_size=29, ss_pad=8)
FIXTURES = [("mamba2_tiny", TINY, 0), ("mamba2_groups", GROUPS, 10), ("mamba2_ss", SS, 20)]
BATCH = 2
SEQ = 13
SEED = 20240917
NO_LIMIT = (0.0, math.inf)


def derived(cfg):
    E = cfg["expand"] * cfg["hidden_size"]
    P, G, N = cfg["head_dim"], cfg["n_groups"], cfg["state_size"]
    H = E // P
    assert H * P == E and H % G == 0, "d_inner must split into heads, heads into groups"
    return dict(V=cfg["vocab_size"], D=cfg["hidden_size"], K=cfg["num_hidden_layers"], N=N, E=E, P=P,
                H=H, G=G, W=cfg["conv_kernel"], conv_dim=E + 2 * G * N, proj=2 * E + 2 * G * N + H,
                eps=cfg["layer_norm_epsilon"], limit=tuple(cfg.get("time_step_limit", NO_LIMIT)),
                tie=cfg.get("tie", True), layout=cfg.get("layout", "hf"))


def embedding_name(cfg):
    return "backbone.embedding.weight" if cfg.get("layout", "hf") == "ss" else "backbone.embeddings.weight"


def hf_config(cfg, torch_dtype):
    """HF-style config.json content (transformers' Mamba2Config fields)."""
    d = derived(cfg)
    return OrderedDict([
        ("architectures", ["Mamba2ForCausalLM"]),
        ("model_type", "mamba2"),
        ("vocab_size", d["V"]),
        ("hidden_size", d["D"]),
        ("num_hidden_layers", d["K"]),
        ("state_size", d["N"]),
        ("head_dim", d["P"]),
        ("num_heads", d["H"]),
        ("n_groups", d["G"]),
        ("expand", cfg["expand"]),
        ("conv_kernel", d["W"]),
        ("chunk_size", cfg["chunk_size"]),
        ("layer_norm_epsilon", d["eps"]),
        ("use_bias", False),
        ("use_conv_bias", True),
        ("hidden_act", "silu"),
        ("rms_norm", True),
        ("tie_word_embeddings", d["tie"]),
        ("residual_in_fp32", True),
        ("initializer_range", 0.1),
        ("time_step_rank", math.ceil(d["D"] / 16)),  # "auto"; Mamba-2 has no dt_proj
        ("time_step_min", 0.001),
        ("time_step_max", 0.1),
        ("time_step_floor", 0.0001),
        ("time_step_limit", [float(v) for v in d["limit"]]),
        ("rescale_prenorm_residual", False),
        ("use_cache", True),
        ("pad_token_id", 1),
        ("bos_token_id", 0),
        ("eos_token_id", 2),
        ("torch_dtype", torch_dtype),
    ])


def ss_config(cfg):
    """state-spaces/mamba config.json content (mamba_ssm's MambaConfig, a Mamba2 ssm_cfg)."""
    d = derived(cfg)
    assert d["eps"] == 1e-5 and d["limit"] == NO_LIMIT  # the layout has neither field: defaults
    return OrderedDict([
        ("d_model", d["D"]),
        ("d_intermediate", 0),
        ("n_layer", d["K"]),
        ("vocab_size", cfg["ss_vocab_size"]),
        ("ssm_cfg", OrderedDict([("layer", "Mamba2"), ("d_state", d["N"]), ("d_conv", d["W"]),
                                 ("expand", cfg["expand"]), ("headdim", d["P"]), ("ngroups", d["G"])])),
        ("attn_layer_idx", []),
        ("attn_cfg", OrderedDict()),
        ("rms_norm", True),
        ("residual_in_fp32", True),
        ("fused_add_norm", True),
        ("pad_vocab_size_multiple", cfg["ss_pad"]),
        ("tie_embeddings", d["tie"]),
    ])


MIXER_TENSORS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                 "out_proj.weight")


def param_names(cfg):
    names = [embedding_name(cfg)]
    for i in range(cfg["num_hidden_layers"]):
        p = "backbone.layers.%d." % i
        names.append(p + "norm.weight")
        names += [p + "mixer." + s for s in MIXER_TENSORS]
    names.append("backbone.norm_f.weight")
    if not cfg.get("tie", True):
        names.append("lm_head.weight")
    return names


# ---------------------------------------------------------------------------
# Initialisation (Mamba-2-style, then perturbed away from special values)
# ---------------------------------------------------------------------------

def init_params(cfg, seed=SEED):
    """Returns an OrderedDict name -> float32 tensor.

    Projections and the convolution uniform(+-1/sqrt(fan_in)); dt_bias = softplus^-1(dt)
    with dt log-uniform in [5e-2, 1] and A = -uniform(1, 4) per head (mamba_ssm draws dt
    in [1e-3, 1e-1] and A in [1, 16]: larger steps here, so that the state carries a
    visible share of the output over T = 13, and per-step decays exp(dt A) from 0.95 to
    0.02); norms and D 1 + N(0, 0.1).
    """
    d = derived(cfg)
    V, D, K, E, H, W = d["V"], d["D"], d["K"], d["E"], d["H"], d["W"]
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    def uniform(shape, bound):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2.0 - 1.0) * bound

    p = OrderedDict()
    p[embedding_name(cfg)] = normal((V, D), 0.5)
    for i in range(K):
        pre = "backbone.layers.%d." % i
        p[pre + "norm.weight"] = 1.0 + normal((D,), 0.1)
        m = pre + "mixer."
        p[m + "in_proj.weight"] = uniform((d["proj"], D), 1.0 / math.sqrt(D))
        p[m + "conv1d.weight"] = uniform((d["conv_dim"], 1, W), 1.0 / math.sqrt(W))
        p[m + "conv1d.bias"] = uniform((d["conv_dim"],), 0.2)
        lo, hi = math.log(5e-2), math.log(1.0)
        dt = torch.exp(torch.rand(H, generator=g, dtype=torch.float64) * (hi - lo) + lo)
        p[m + "dt_bias"] = dt + torch.log(-torch.expm1(-dt))  # softplus^{-1}(dt)
        p[m + "A_log"] = torch.log(1.0 + 3.0 * torch.rand(H, generator=g, dtype=torch.float64))
        p[m + "D"] = 1.0 + normal((H,), 0.1)
        p[m + "norm.weight"] = 1.0 + normal((E,), 0.1)
        p[m + "out_proj.weight"] = uniform((D, E), 1.0 / math.sqrt(E))
    p["backbone.norm_f.weight"] = 1.0 + normal((D,), 0.1)
    if not d["tie"]:
        p["lm_head.weight"] = normal((V, D), 0.5)  # nn.Linear(D, V).weight
    assert list(p.keys()) == param_names(cfg)
    return OrderedDict((k, v.to(torch.float32).contiguous()) for k, v in p.items())


def make_batch(cfg, seed=SEED + 1):
    d = derived(cfg)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, d["V"], (BATCH, SEQ + 1), generator=g, dtype=torch.int64)
    input_ids = ids[:, :SEQ].contiguous()
    targets = ids[:, 1:].clone()
    # a few ignored positions (incl. the first of the first and the last of the second sequence)
    mask = torch.rand(BATCH, SEQ, generator=g) < 0.15
    mask[1, SEQ - 1] = True
    mask[0, 0] = True
    targets[mask] = -1
    return input_ids, targets.contiguous()


# ---------------------------------------------------------------------------
# The SSM: sequential recurrence and chunked SSD
# ---------------------------------------------------------------------------

def ssd_sequential(x, dt, A, B, C, D, h0=None):
    """x [Bsz, T, H, P]; dt [Bsz, T, H]; A, D [H]; B, C [Bsz, T, G, N]; h0 [Bsz, H, P, N]
    or None (zero) -> (y [Bsz, T, H, P], final state [Bsz, H, P, N]). One token at a time."""
    Bsz, T, H, P = x.shape
    G, N = B.shape[2:]
    Bh = B.repeat_interleave(H // G, dim=2)  # [Bsz, T, H, N]: head h reads group h // (H / G)
    Ch = C.repeat_interleave(H // G, dim=2)
    s = x.new_zeros(Bsz, H, P, N) if h0 is None else h0
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t] * A)                                  # [Bsz, H]
        u = (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]  # [Bsz, H, P, N]
        s = decay[:, :, None, None] * s + u
        ys.append((s * Ch[:, t, :, None, :]).sum(-1))                     # [Bsz, H, P]
    y = torch.stack(ys, dim=1)
    return y + D[:, None] * x, s


def segsum(a):
    """a [..., L] -> [..., L, L] with out[..., i, j] = sum_{j<k<=i} a[..., k] for i >= j and
    -inf above the diagonal; formed as masked cumulative sums over the segment (no
    difference of prefix sums)."""
    L = a.shape[-1]
    rep = a[..., :, None].expand(*a.shape, L)                            # [..., k, j] = a[k]
    strict = torch.ones(L, L, dtype=torch.bool).tril(-1)                 # k > j
    seg = torch.cumsum(rep.masked_fill(~strict, 0.0), dim=-2)           # [..., i, j]
    return seg.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), -math.inf)


def ssd_chunked(x, dt, A, B, C, D, chunk, h0=None):
    """The same as ssd_sequential by the chunked SSD form (Mamba-2 paper, listing 1):
    in-chunk outputs as a masked quadratic form, chunk-end states, states passed between
    chunks by a segment-sum over chunks, then their contribution to each chunk's outputs.
    T is padded to a multiple of `chunk` with dt = 0 (decay 1, no input)."""
    Bsz, T, H, P = x.shape
    G, N = B.shape[2:]
    L = chunk
    pad = (-T) % L
    nc = (T + pad) // L

    def chunks(t):  # [Bsz, T, ...] -> [Bsz, nc, L, ...]
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(Bsz, nc, L, *t.shape[2:])

    xdt = chunks(x * dt[..., None])                                      # [b, c, l, h, p]
    Bc = chunks(B.repeat_interleave(H // G, dim=2))                      # [b, c, l, h, n]
    Cc = chunks(C.repeat_interleave(H // G, dim=2))
    a = chunks(dt * A).permute(0, 3, 1, 2)                               # [b, h, c, l]
    seg = segsum(a)                                                      # [b, h, c, l, s]
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cc, Bc, torch.exp(seg), xdt)
    to_end = torch.exp(seg[..., L - 1, :])                               # [b, h, c, l]: l -> chunk end
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, to_end, xdt)   # chunk-end states from 0
    s0 = x.new_zeros(Bsz, H, P, N) if h0 is None else h0
    states = torch.cat([s0[:, None], states], dim=1)                     # [b, c+1, h, p, n]
    chunk_a = a.sum(-1)                                                  # [b, h, c]
    across = torch.exp(segsum(F.pad(chunk_a, (1, 0))))                   # [b, h, c+1, c+1]
    starts = torch.einsum("bhzc,bchpn->bzhpn", across, states)           # state entering chunk z
    from_start = torch.exp(torch.cumsum(a, dim=-1))                      # [b, h, c, l]
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, starts[:, :-1], from_start)
    y = (y_diag + y_off).reshape(Bsz, nc * L, H, P)[:, :T]
    return y + D[:, None] * x, starts[:, -1]


def chunked(chunk):
    return lambda x, dt, A, B, C, D, h0=None: ssd_chunked(x, dt, A, B, C, D, chunk, h0)


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

def gated_rmsnorm(y, z, w, G, eps, per_group=True):
    """g = y * silu(z), normalised per group of E / G channels (mamba_ssm, per_group=True)
    or over all E channels (Hugging Face's MambaRMSNormGated, per_group=False), times w."""
    g = y * F.silu(z)
    if not per_group:
        return g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps) * w
    shape = g.shape
    gg = g.reshape(*shape[:-1], G, shape[-1] // G)
    gg = gg * torch.rsqrt(gg.pow(2).mean(-1, keepdim=True) + eps)
    return gg.reshape(shape) * w


def mixer(u, p, pre, d, scan=ssd_sequential, conv=causal_conv_shift, per_group=True):
    E, H, P, G, N = d["E"], d["H"], d["P"], d["G"], d["N"]
    Bsz, T = u.shape[:2]
    z, xBC, dt = torch.split(u @ p[pre + "in_proj.weight"].t(), [E, d["conv_dim"], H], dim=-1)
    xBC = F.silu(conv(xBC, p[pre + "conv1d.weight"], p[pre + "conv1d.bias"]))
    x, B, C = torch.split(xBC, [E, G * N, G * N], dim=-1)
    dt = F.softplus(dt + p[pre + "dt_bias"])
    if d["limit"] != NO_LIMIT:
        dt = dt.clamp(d["limit"][0], d["limit"][1])
    A = -torch.exp(p[pre + "A_log"])
    y, _ = scan(x.reshape(Bsz, T, H, P), dt, A, B.reshape(Bsz, T, G, N), C.reshape(Bsz, T, G, N), p[pre + "D"])
    g = gated_rmsnorm(y.reshape(Bsz, T, E), z, p[pre + "norm.weight"], G, d["eps"], per_group=per_group)
    return g @ p[pre + "out_proj.weight"].t()


def forward(p, input_ids, cfg, scan=ssd_sequential, conv=causal_conv_shift, per_group=True):
    """Returns logits [B, T, V]."""
    d = derived(cfg)
    emb = p[embedding_name(cfg)]
    h = emb[input_ids]
    for i in range(d["K"]):
        pre = "backbone.layers.%d." % i
        h = h + mixer(rmsnorm(h, p[pre + "norm.weight"], d["eps"]), p, pre + "mixer.", d,
                      scan=scan, conv=conv, per_group=per_group)
    h = rmsnorm(h, p["backbone.norm_f.weight"], d["eps"])
    head = emb if d["tie"] else p["lm_head.weight"]
    return h @ head.t()


def loss_and_grads(p32, input_ids, targets, cfg):
    """float64 logits, loss and d(loss)/d(param) from float32 weights."""
    p = OrderedDict((k, v.to(torch.float64).clone().requires_grad_(True)) for k, v in p32.items())
    logits = forward(p, input_ids, cfg)
    loss = summed_ce(logits, targets)
    grads = torch.autograd.grad(loss, list(p.values()))
    return (logits.detach(), loss.detach(),
            OrderedDict((k, g.detach()) for k, g in zip(p.keys(), grads)))


# ---------------------------------------------------------------------------
# Self-checks
# ---------------------------------------------------------------------------

SCAN_CHUNKS = (1, 4, 5, 8, 13, 16)
MODEL_CHUNKS = (4, 5, 16)


def self_check(p32, input_ids, targets, cfg, n_fd=28, seed=SEED + 2, verbose=True):
    d = derived(cfg)
    p64 = OrderedDict((k, v.to(torch.float64)) for k, v in p32.items())
    res = OrderedDict()
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    # 1. SSM: sequential recurrence vs chunked SSD, on random inputs (one and two groups, a
    #    nonzero initial state, mild and strong decays) and inside the model
    Bsz, T, H, P, N = BATCH, SEQ, d["H"], d["P"], d["N"]
    worst_y = worst_s = 0.0
    for G in (1, 2):
        for scale in (1.0, 4.0):
            x = randn(Bsz, T, H, P)
            dt = F.softplus(randn(Bsz, T, H)) * scale
            A = -torch.exp(randn(H) * 0.5)
            Bm, Cm, Dv, h0 = randn(Bsz, T, G, N), randn(Bsz, T, G, N), randn(H), randn(Bsz, H, P, N)
            y1, s1 = ssd_sequential(x, dt, A, Bm, Cm, Dv, h0)
            for L in SCAN_CHUNKS:
                y2, s2 = ssd_chunked(x, dt, A, Bm, Cm, Dv, L, h0)
                worst_y = max(worst_y, (y1 - y2).abs().max().item())
                worst_s = max(worst_s, (s1 - s2).abs().max().item())
    res["scan_random_y_maxabs"] = worst_y
    res["scan_random_state_maxabs"] = worst_s
    l1 = forward(p64, input_ids, cfg)
    res["model_two_impl_logits_maxabs"] = max(
        (l1 - forward(p64, input_ids, cfg, scan=chunked(L), conv=causal_conv_torch)).abs().max().item()
        for L in MODEL_CHUNKS)

    # 2. conv: shifted sum vs torch conv1d
    xc = randn(Bsz, T, d["conv_dim"])
    w, b = randn(d["conv_dim"], 1, d["W"]), randn(d["conv_dim"])
    res["conv_maxabs"] = (causal_conv_shift(xc, w, b) - causal_conv_torch(xc, w, b)).abs().max().item()

    # 3. loss vs torch cross_entropy
    ce_ref = F.cross_entropy(l1.reshape(-1, d["V"]), targets.reshape(-1), ignore_index=-1, reduction="sum")
    res["loss_vs_torch_ce_absdiff"] = (summed_ce(l1, targets) - ce_ref).abs().item()

    # 4. gated RMSNorm per group vs over all of d_inner: equal for one group, not for two
    yv, zv, wv = randn(Bsz, T, d["E"]), randn(Bsz, T, d["E"]), randn(d["E"])
    res["norm_g1_random_maxabs"] = (gated_rmsnorm(yv, zv, wv, 1, d["eps"])
                                    - gated_rmsnorm(yv, zv, wv, 1, d["eps"], per_group=False)).abs().max().item()
    res["norm_g2_random_maxabs"] = (gated_rmsnorm(yv, zv, wv, 2, d["eps"])
                                    - gated_rmsnorm(yv, zv, wv, 2, d["eps"], per_group=False)).abs().max().item()
    res["norm_whole_vs_group_logits_maxabs"] = (l1 - forward(p64, input_ids, cfg, per_group=False)).abs().max().item()

    # 5. autograd vs central finite differences (4-point stencil, O(h^4) truncation):
    #    one random entry of every parameter tensor plus a few more random entries,
    #    and the directional derivative along random directions in all parameters.
    _, loss, grads = loss_and_grads(p32, input_ids, targets, cfg)
    names = list(p64.keys())

    def loss_at(q):
        return summed_ce(forward(q, input_ids, cfg), targets).item()

    def stencil(f, h):
        return (8.0 * (f(h) - f(-h)) - (f(2 * h) - f(-2 * h))) / (12.0 * h)

    picks = [(n, int(torch.randint(0, p64[n].numel(), (1,), generator=g))) for n in names]
    for _ in range(n_fd - len(names)):
        n = names[int(torch.randint(0, len(names), (1,), generator=g))]
        picks.append((n, int(torch.randint(0, p64[n].numel(), (1,), generator=g))))
    worst_rel = worst_abs = worst_mixed = 0.0
    rows = []
    for name, idx in picks:
        def f(eps, name=name, idx=idx):
            q = OrderedDict((kk, vv.clone()) for kk, vv in p64.items())
            q[name].view(-1)[idx] += eps
            return loss_at(q)
        fd = stencil(f, 1e-3)
        ad = grads[name].view(-1)[idx].item()
        err = abs(fd - ad)
        worst_rel = max(worst_rel, err / max(abs(fd), abs(ad), 1e-300))
        worst_abs = max(worst_abs, err)
        # loss ~ 1e2, so each loss value carries ~1e-13 absolute rounding error,
        # i.e. ~1e-10 absolute noise in fd: allow 1e-6 relative + 1e-9 absolute.
        worst_mixed = max(worst_mixed, err / (1e-6 * abs(ad) + 1e-9))
        rows.append((name, idx, ad, fd, err / max(abs(fd), abs(ad), 1e-300)))
    res["fd_entries"] = float(len(picks))
    res["fd_max_rel_err"] = worst_rel
    res["fd_max_abs_err"] = worst_abs
    res["fd_max_err_over_tol"] = worst_mixed
    worst_dir = 0.0
    for _ in range(3):
        dirs = OrderedDict((k, randn(*v.shape)) for k, v in p64.items())
        ad = sum((grads[k] * dirs[k]).sum().item() for k in names)

        def fdir(eps):
            return loss_at(OrderedDict((k, p64[k] + eps * dirs[k]) for k in names))
        fd = stencil(fdir, 1e-4)
        rel = abs(fd - ad) / max(abs(fd), abs(ad))
        worst_dir = max(worst_dir, rel)
        rows.append(("<random direction>", -1, ad, fd, rel))
    res["fd_direction_max_rel_err"] = worst_dir
    res["loss"] = loss.item()

    if verbose:
        for name, idx, ad, fd, rel in rows:
            print("  fd %-42s [%4d] autograd=% .12e fd=% .12e rel=%.2e" % (name, idx, ad, fd, rel))
        for k, v in res.items():
            print("  %-34s %.15g" % (k, v) if k in ("loss", "fd_entries") else "  %-34s %.3e" % (k, v))

    whole_ok = (res["norm_whole_vs_group_logits_maxabs"] <= 1e-15 if d["G"] == 1
                else res["norm_whole_vs_group_logits_maxabs"] > 1e-6)
    ok = (res["scan_random_y_maxabs"] <= 1e-12 and res["scan_random_state_maxabs"] <= 1e-12
          and res["model_two_impl_logits_maxabs"] <= 1e-12 and res["conv_maxabs"] <= 1e-12
          and res["loss_vs_torch_ce_absdiff"] <= 1e-10
          and res["norm_g1_random_maxabs"] <= 1e-15 and res["norm_g2_random_maxabs"] > 1e-6 and whole_ok
          and res["fd_max_err_over_tol"] <= 1.0 and res["fd_direction_max_rel_err"] <= 1e-8)
    return ok, res


# ---------------------------------------------------------------------------
# Fixture
# ---------------------------------------------------------------------------

def config_text(obj, indent=0):
    """json.dump(obj, indent=2) with flat lists on one line, so that time_step_limit reads
    [0.0, Infinity] (json's spelling of float('inf'))."""
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        pad = "  " * (indent + 1)
        items = [pad + json.dumps(k) + ": " + config_text(v, indent + 1) for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
    assert not (isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj))
    return json.dumps(obj)


def write_config(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(config_text(content) + "\n")
    with open(path, encoding="utf-8") as f:  # round trip (Infinity included)
        assert json.load(f, object_pairs_hook=OrderedDict) == content


def write_reference(path, p32, input_ids, targets, cfg, description):
    """reference.safetensors: inputs, float64 logits, loss and gradients."""
    logits, loss, grads = loss_and_grads(p32, input_ids, targets, cfg)
    return m1.save_reference(path, input_ids, targets, logits, loss, grads, description,
                             "tests/reference/mamba2_reference.py")


def describe(cfg):
    d = derived(cfg)
    layout = ("state-spaces mamba_ssm Mamba2 (MambaLMHeadModel)" if d["layout"] == "ss"
              else "Mamba2ForCausalLM")
    head = ("tied head (logits = h @ embedding^T)" if d["tie"]
            else "untied head (logits = h @ lm_head.weight^T, lm_head.weight [V, D])")
    return ("float64 reference of %s, sequential recurrence, %s, n_groups %d, gated RMSNorm per group "
            "of d_inner / n_groups channels, from float32 weights; loss = sum of CE over targets != -1 "
            "(targets used as given, no shift); grad.X = d(loss)/dX; initial state zero"
            % (layout, head, d["G"]))


def make_one(out_dir, name, cfg, offset, check=True, write=True, verbose=False):
    """One checkpoint (HF or state-spaces layout) and its float64 reference."""
    p32 = init_params(cfg, seed=SEED + offset)
    input_ids, targets = make_batch(cfg, seed=SEED + offset + 1)
    if check:
        if verbose:
            print("self-check %s:" % name)
        ok, res = self_check(p32, input_ids, targets, cfg, n_fd=len(p32) + 4, seed=SEED + offset + 2,
                             verbose=verbose)
        print("self-check %s: %s (sequential vs chunked %.1e, fd max err / tol %.3e, direction %.3e, "
              "norm whole vs group %.1e)"
              % (name, "OK" if ok else "FAILED",
                 max(res["scan_random_y_maxabs"], res["scan_random_state_maxabs"],
                     res["model_two_impl_logits_maxabs"]),
                 res["fd_max_err_over_tol"], res["fd_direction_max_rel_err"],
                 res["norm_whole_vs_group_logits_maxabs"]))
        if not ok:
            print("SELF-CHECK FAILED (%s)" % name, file=sys.stderr)
            sys.exit(1)
    if not write:
        return
    d = derived(cfg)
    out = os.path.join(out_dir, name)
    if d["layout"] == "ss":
        write_config(os.path.join(out, "config.json"), ss_config(cfg))
    else:
        write_config(os.path.join(out, "config.json"), hf_config(cfg, "float32"))
    save_safetensors(os.path.join(out, "model.safetensors"), p32, {"format": "pt"})
    back, _ = load_safetensors(os.path.join(out, "model.safetensors"))
    assert list(back.keys()) == list(p32.keys()) and all(torch.equal(back[k], p32[k]) for k in p32)
    logits, loss = write_reference(os.path.join(out, "reference.safetensors"), p32, input_ids, targets, cfg,
                                   describe(cfg))
    print("wrote %s (%s layout, G = %d, %s, loss = %.15g, %d valid targets, logits %s)"
          % (out, d["layout"], d["G"], "tied" if d["tie"] else "untied", loss.item(),
             int((targets != -1).sum()), tuple(logits.shape)))


def make_fixture(out_dir=None, check=True, write=True):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if out_dir is None:
        here = os.path.dirname(os.path.abspath(__file__))
        out_dir = os.path.join(os.path.dirname(here), "data")
    for i, (name, cfg, offset) in enumerate(FIXTURES):
        make_one(out_dir, name, cfg, offset, check=check, write=write, verbose=(i == 0))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="output data dir (default: tests/data)")
    ap.add_argument("--check-only", action="store_true", help="run self-checks, write nothing")
    ap.add_argument("--no-check", action="store_true", help="skip self-checks")
    a = ap.parse_args(argv)
    make_fixture(a.out, check=not a.no_check, write=not a.check_only)


if __name__ == "__main__":
    main()
