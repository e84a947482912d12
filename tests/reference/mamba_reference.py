#!/usr/bin/python3
"""Independent PyTorch (CPU) reference for the Mamba-1 language model.

What it computes
----------------
The forward pass, summed cross-entropy loss and parameter gradients of a
Mamba-1 causal LM with the semantics of Hugging Face transformers'
``MambaForCausalLM`` "slow path" (``MambaMixer.slow_forward``), no cache,
initial SSM/conv state zero, ``use_bias=False``, ``use_conv_bias=True``,
tied or untied LM head:

    h = E[tokens]                                    backbone.embeddings.weight [V, D]
    for each layer i:
        h = h + mixer_i(rmsnorm(h) * norm_i.weight)  backbone.layers.i.norm.weight [D]
    logits = (rmsnorm(h) * norm_f.weight) @ H^T      backbone.norm_f.weight [D]
        H = E (tied), or lm_head.weight [V, D] (untied: nn.Linear(D, V).weight, as
        both MambaForCausalLM and mamba_ssm's MambaLMHeadModel store it)
    loss = SUM_{t: target[t] != -1} cross_entropy(logits[t], target[t])

    rmsnorm(x) = x * rsqrt(mean(x^2, -1) + eps)

    mixer(u), u: [T, D]:
        x, z = split(u @ in_proj^T, [E, E])          in_proj.weight [2E, D]
        xc[t,e] = conv1d.bias[e]
                  + sum_{j<W} conv1d.weight[e,0,j] * x[t-(W-1)+j, e]   (x = 0 before t = 0)
        x = silu(xc)
        dt_raw, B, C = split(x @ x_proj^T, [R, N, N])                   x_proj.weight [R+2N, E]
        dt = softplus(dt_raw @ dt_proj^T + dt_proj.bias)                dt_proj.weight [E, R]
        A = -exp(A_log)                                                 A_log [E, N]
        s_t[e,n] = exp(dt[t,e] A[e,n]) s_{t-1}[e,n] + dt[t,e] x[t,e] B[t,n],  s_{-1} = 0
        y[t,e] = sum_n s_t[e,n] C[t,n] + D[e] x[t,e]                     D [E]
        out = (y * silu(z)) @ out_proj^T                                out_proj.weight [D, E]

Targets are used as given (no internal shift; -1 = ignored position).

The module also contains hand-written safetensors read/write helpers (the
``safetensors`` package is not required) and ``make_fixture``, which writes
the tiny test fixture used by the C++ tests:

    tests/data/mamba_tiny/config.json            HF-style MambaConfig
    tests/data/mamba_tiny/model.safetensors      float32 weights
    tests/data/mamba_tiny/reference.safetensors  float64 reference outputs:
        input_ids  I64 [B, T]
        targets    I64 [B, T]      (-1 = ignored)
        logits     F64 [B, T, V]
        loss       F64 [1]         (summed CE over non-ignored positions)
        grad.<param name>  F64, same shape as the parameter
                   d(loss)/d(param), computed in float64 from the float32
                   weights cast to double
    tests/data/mamba_tiny_bf16/config.json       same config, torch_dtype bfloat16
    tests/data/mamba_tiny_bf16/model.safetensors the float32 weights rounded
                                                 (nearest-even) to BF16

and three untied checkpoints, each with config.json, model.safetensors and
reference.safetensors as above (grad.lm_head.weight is [V, D], as stored):

    tests/data/mamba_untied/         HF layout, V = 32, D = 16
    tests/data/mamba_untied_square/  HF layout, V = D = 16 (a head loaded the
                                     wrong way round would still fit)
    tests/data/mamba_untied_ss/      state-spaces/mamba layout (d_model, n_layer,
                                     ssm_cfg, backbone.embedding.weight), V = D = 16:
                                     vocab_size 13 padded to pad_vocab_size_multiple 8

Before writing anything it runs self-checks (and aborts if one fails):
  * sequential scan loop vs. an independent closed-form (segment-sum /
    cumulative-decay) scan, and both full models: max abs diff <= 1e-12;
  * explicit shifted-sum causal conv vs. torch.nn.functional.conv1d;
  * hand-written summed CE vs. torch.nn.functional.cross_entropy;
  * autograd float64 gradients vs. central finite differences on random
    parameter entries (max relative error printed);
  * safetensors round trip of every written file.

How to run (PyTorch 1.13 from Debian, i.e. /usr/bin/python3; CPU only)
---------------------------------------------------------------------
    /usr/bin/python3 tests/reference/mamba_reference.py            # writes tests/data/...
    /usr/bin/python3 tests/reference/mamba_reference.py --out DIR  # writes DIR/mamba_tiny{,_bf16}
    /usr/bin/python3 tests/reference/mamba_reference.py --check-only

Output is deterministic (fixed seed, single thread, fixed JSON layout):
running it twice gives byte-identical files.
"""

import argparse
import json
import math
import os
import struct
import sys
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------
# Fixture configuration
# ---------------------------------------------------------------------------

TINY = OrderedDict(
    vocab_size=32,
    hidden_size=16,
    num_hidden_layers=2,
    state_size=4,
    expand=2,
    conv_kernel=4,
    time_step_rank=2,
    layer_norm_epsilon=1e-5,
)
# Untied heads; "layout" says which config.json and embedding name to write.
UNTIED = OrderedDict(TINY, tie=False, layout="hf")
UNTIED_SQUARE = OrderedDict(TINY, vocab_size=16, tie=False, layout="hf")
UNTIED_SS = OrderedDict(TINY, vocab_size=16, tie=False, layout="ss", ss_vocab_size=13, ss_pad=8)
BATCH = 2
SEQ = 24
SEED = 20240611


def derived(cfg):
    E = cfg["expand"] * cfg["hidden_size"]
    return dict(V=cfg["vocab_size"], D=cfg["hidden_size"], K=cfg["num_hidden_layers"],
                N=cfg["state_size"], E=E, W=cfg["conv_kernel"], R=cfg["time_step_rank"],
                eps=cfg["layer_norm_epsilon"], tie=cfg.get("tie", True),
                layout=cfg.get("layout", "hf"))


def embedding_name(cfg):
    return "backbone.embedding.weight" if cfg.get("layout", "hf") == "ss" else "backbone.embeddings.weight"


def hf_config(cfg, torch_dtype):
    """HF-style config.json content (MambaConfig fields)."""
    d = derived(cfg)
    return OrderedDict([
        ("architectures", ["MambaForCausalLM"]),
        ("model_type", "mamba"),
        ("vocab_size", d["V"]),
        ("hidden_size", d["D"]),
        ("num_hidden_layers", d["K"]),
        ("state_size", d["N"]),
        ("expand", cfg["expand"]),
        ("intermediate_size", d["E"]),
        ("conv_kernel", d["W"]),
        ("time_step_rank", d["R"]),
        ("layer_norm_epsilon", d["eps"]),
        ("use_bias", False),
        ("use_conv_bias", True),
        ("hidden_act", "silu"),
        ("tie_word_embeddings", d["tie"]),
        ("residual_in_fp32", True),
        ("initializer_range", 0.1),
        ("time_step_scale", 1.0),
        ("time_step_min", 0.001),
        ("time_step_max", 0.1),
        ("time_step_init_scheme", "random"),
        ("time_step_floor", 0.0001),
        ("rescale_prenorm_residual", False),
        ("use_mambapy", False),
        ("use_cache", True),
        ("pad_token_id", 0),
        ("bos_token_id", 0),
        ("eos_token_id", 0),
        ("torch_dtype", torch_dtype),
    ])


def ss_config(cfg):
    """state-spaces/mamba config.json content (mamba_ssm's MambaConfig fields)."""
    d = derived(cfg)
    assert d["eps"] == 1e-5  # the layout has no epsilon field: mamba_ssm's default
    return OrderedDict([
        ("d_model", d["D"]),
        ("d_intermediate", 0),
        ("n_layer", d["K"]),
        ("vocab_size", cfg["ss_vocab_size"]),
        ("ssm_cfg", OrderedDict([("layer", "Mamba1"), ("d_state", d["N"]), ("d_conv", d["W"]),
                                 ("expand", cfg["expand"]), ("dt_rank", d["R"])])),
        ("attn_layer_idx", []),
        ("attn_cfg", OrderedDict()),
        ("rms_norm", True),
        ("residual_in_fp32", True),
        ("fused_add_norm", True),
        ("pad_vocab_size_multiple", cfg["ss_pad"]),
        ("tie_embeddings", d["tie"]),
    ])


def param_names(K, cfg=TINY):
    names = [embedding_name(cfg)]
    for i in range(K):
        p = "backbone.layers.%d." % i
        names.append(p + "norm.weight")
        for s in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight",
                  "dt_proj.weight", "dt_proj.bias", "A_log", "D", "out_proj.weight"):
            names.append(p + "mixer." + s)
    names.append("backbone.norm_f.weight")
    if not cfg.get("tie", True):
        names.append("lm_head.weight")
    return names


# ---------------------------------------------------------------------------
# Initialisation (Mamba-style, then perturbed away from special values)
# ---------------------------------------------------------------------------

def init_params(cfg, seed=SEED):
    """Returns an OrderedDict name -> float32 tensor."""
    d = derived(cfg)
    V, D, K, N, E, W, R = d["V"], d["D"], d["K"], d["N"], d["E"], d["W"], d["R"]
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
        p[m + "in_proj.weight"] = uniform((2 * E, D), 1.0 / math.sqrt(D))
        p[m + "conv1d.weight"] = uniform((E, 1, W), 1.0 / math.sqrt(W))
        p[m + "conv1d.bias"] = uniform((E,), 0.2)
        p[m + "x_proj.weight"] = uniform((R + 2 * N, E), 1.0 / math.sqrt(E))
        p[m + "dt_proj.weight"] = uniform((E, R), R ** -0.5)
        lo, hi = math.log(1e-3), math.log(1e-1)
        dt = torch.exp(torch.rand(E, generator=g, dtype=torch.float64) * (hi - lo) + lo)
        p[m + "dt_proj.bias"] = dt + torch.log(-torch.expm1(-dt))  # softplus^{-1}(dt)
        A = torch.arange(1, N + 1, dtype=torch.float64).repeat(E, 1)
        p[m + "A_log"] = torch.log(A) + normal((E, N), 0.05)
        p[m + "D"] = 1.0 + normal((E,), 0.1)
        p[m + "out_proj.weight"] = uniform((D, E), 1.0 / math.sqrt(E))
    p["backbone.norm_f.weight"] = 1.0 + normal((D,), 0.1)
    if not d["tie"]:
        p["lm_head.weight"] = normal((V, D), 0.5)  # nn.Linear(D, V).weight
    assert list(p.keys()) == param_names(K, cfg)
    return OrderedDict((k, v.to(torch.float32).contiguous()) for k, v in p.items())


def make_batch(cfg, seed=SEED + 1):
    d = derived(cfg)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, d["V"], (BATCH, SEQ + 1), generator=g, dtype=torch.int64)
    input_ids = ids[:, :SEQ].contiguous()
    targets = ids[:, 1:].clone()
    # a few ignored positions (incl. the last one of the second sequence)
    mask = torch.rand(BATCH, SEQ, generator=g) < 0.15
    mask[1, SEQ - 1] = True
    mask[0, 0] = True
    targets[mask] = -1
    return input_ids, targets.contiguous()


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

def rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def causal_conv_shift(x, w, b):
    """x [B, T, E], w [E, 1, W], b [E] -> [B, T, E]; explicit shifted sum."""
    Bsz, T, E = x.shape
    W = w.shape[-1]
    xp = torch.cat([x.new_zeros(Bsz, W - 1, E), x], dim=1)
    out = b.expand(Bsz, T, E).clone()
    for j in range(W):
        out = out + w[:, 0, j] * xp[:, j:j + T, :]
    return out


def causal_conv_torch(x, w, b):
    """Same via torch conv1d (HF style: pad W-1 both sides, keep first T)."""
    T = x.shape[1]
    y = F.conv1d(x.transpose(1, 2), w, b, padding=w.shape[-1] - 1, groups=w.shape[0])
    return y[..., :T].transpose(1, 2)


def scan_sequential(x, dt, A, B, C, D):
    """x, dt [Bsz, T, E]; A [E, N]; B, C [Bsz, T, N]; D [E] -> y [Bsz, T, E]."""
    Bsz, T, E = x.shape
    N = A.shape[1]
    s = x.new_zeros(Bsz, E, N)
    ys = []
    for t in range(T):
        dA = torch.exp(dt[:, t, :, None] * A)                        # [Bsz, E, N]
        dBu = (dt[:, t, :] * x[:, t, :])[:, :, None] * B[:, t, None, :]
        s = dA * s + dBu
        ys.append((s * C[:, t, None, :]).sum(-1))
    y = torch.stack(ys, dim=1)
    return y + x * D


def scan_closed_form(x, dt, A, B, C, D):
    """Independent closed form: s_t = sum_{k<=t} exp(sum_{k<j<=t} dt_j A) dt_k x_k B_k.

    The decay exponents are formed as masked cumulative sums over the segment
    (k, t] (no difference of prefix sums), then everything is one einsum.
    """
    Bsz, T, E = x.shape
    a = dt[..., None] * A                                            # [Bsz, T, E, N]
    # seg[b, t, k, e, n] = sum_{j=k+1..t} a[b, j, e, n] for k <= t
    a_rep = a[:, None, :, :, :].expand(Bsz, T, T, *a.shape[2:])       # [b, k, j, e, n]
    jj = torch.arange(T)
    strict = (jj[None, :] > jj[:, None])                             # [k, j]: j > k
    masked = torch.where(strict[None, :, :, None, None], a_rep, torch.zeros((), dtype=a.dtype))
    seg = torch.cumsum(masked, dim=2)                                # [b, k, t, e, n]
    causal = (jj[None, :] >= jj[:, None])                            # [k, t]: t >= k
    L = torch.where(causal[None, :, :, None, None], torch.exp(seg),
                    torch.zeros((), dtype=a.dtype))                  # [b, k, t, e, n]
    u = dt * x                                                       # [b, k, e]
    y = torch.einsum("bkten,bke,bkn,btn->bte", L, u, B, C)
    return y + x * D


def mixer(u, p, pre, d, scan=scan_sequential, conv=causal_conv_shift):
    E, N, R = d["E"], d["N"], d["R"]
    xz = u @ p[pre + "in_proj.weight"].t()
    x, z = xz[..., :E], xz[..., E:]
    x = F.silu(conv(x, p[pre + "conv1d.weight"], p[pre + "conv1d.bias"]))
    dbc = x @ p[pre + "x_proj.weight"].t()
    dt_raw, B, C = dbc[..., :R], dbc[..., R:R + N], dbc[..., R + N:]
    dt = F.softplus(dt_raw @ p[pre + "dt_proj.weight"].t() + p[pre + "dt_proj.bias"])
    A = -torch.exp(p[pre + "A_log"])
    y = scan(x, dt, A, B, C, p[pre + "D"])
    return (y * F.silu(z)) @ p[pre + "out_proj.weight"].t()


def forward(p, input_ids, cfg, scan=scan_sequential, conv=causal_conv_shift):
    """Returns logits [B, T, V]."""
    d = derived(cfg)
    emb = p[embedding_name(cfg)]
    h = emb[input_ids]
    for i in range(d["K"]):
        pre = "backbone.layers.%d." % i
        h = h + mixer(rmsnorm(h, p[pre + "norm.weight"], d["eps"]), p, pre + "mixer.", d,
                      scan=scan, conv=conv)
    h = rmsnorm(h, p["backbone.norm_f.weight"], d["eps"])
    head = emb if d["tie"] else p["lm_head.weight"]
    return h @ head.t()


def summed_ce(logits, targets):
    """Sum over positions with target != -1 of -log softmax(logits)[target]."""
    valid = targets != -1
    lg = logits[valid]
    tg = targets[valid]
    lse = torch.logsumexp(lg, dim=-1)
    return (lse - lg.gather(-1, tg[:, None])[:, 0]).sum()


def loss_and_grads(p32, input_ids, targets, cfg):
    """float64 logits, loss and d(loss)/d(param) from float32 weights."""
    p = OrderedDict((k, v.to(torch.float64).clone().requires_grad_(True)) for k, v in p32.items())
    logits = forward(p, input_ids, cfg)
    loss = summed_ce(logits, targets)
    grads = torch.autograd.grad(loss, list(p.values()))
    return (logits.detach(), loss.detach(),
            OrderedDict((k, g.detach()) for k, g in zip(p.keys(), grads)))


# ---------------------------------------------------------------------------
# safetensors (hand-written)
# ---------------------------------------------------------------------------

_NP_OF = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
          "I16": "<i2", "I8": "i1", "U8": "u1", "BF16": "<u2"}
_DT_OF_TORCH = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
                torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8"}


def _tensor_bytes(t):
    t = t.detach().contiguous().cpu()
    dt = _DT_OF_TORCH[t.dtype]
    if dt == "BF16":
        a = t.view(torch.int16).numpy().view(np.uint16)
    else:
        a = t.numpy()
    return dt, np.ascontiguousarray(a.astype(_NP_OF[dt], copy=False)).tobytes()


def save_safetensors(path, tensors, metadata=None):
    """tensors: ordered mapping name -> torch tensor. Written in the given order."""
    header = OrderedDict()
    if metadata:
        header["__metadata__"] = OrderedDict((str(k), str(v)) for k, v in metadata.items())
    blobs = []
    off = 0
    for name, t in tensors.items():
        dt, b = _tensor_bytes(t)
        header[name] = OrderedDict([("dtype", dt), ("shape", list(t.shape)),
                                    ("data_offsets", [off, off + len(b)])])
        blobs.append(b)
        off += len(b)
    hj = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hj += b" " * ((-len(hj)) % 8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)


def load_safetensors(path):
    """Returns (OrderedDict name -> torch tensor, metadata dict). BF16 -> torch.bfloat16."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n].decode("utf-8"), object_pairs_hook=OrderedDict)
    meta = header.pop("__metadata__", {})
    data = raw[8 + n:]
    out = OrderedDict()
    for name, info in header.items():
        b, e = info["data_offsets"]
        a = np.frombuffer(data[b:e], dtype=_NP_OF[info["dtype"]]).reshape(info["shape"]).copy()
        if info["dtype"] == "BF16":
            t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(a.astype(a.dtype.newbyteorder("=")))
        out[name] = t
    return out, meta


# ---------------------------------------------------------------------------
# Self-checks
# ---------------------------------------------------------------------------

def self_check(p32, input_ids, targets, cfg, n_fd=28, seed=SEED + 2, verbose=True):
    d = derived(cfg)
    p64 = OrderedDict((k, v.to(torch.float64)) for k, v in p32.items())
    res = {}

    # 1. scan: sequential loop vs closed form, on random inputs and inside the model
    g = torch.Generator().manual_seed(seed)
    Bsz, T, E, N = BATCH, SEQ, d["E"], d["N"]
    x = torch.randn(Bsz, T, E, generator=g, dtype=torch.float64)
    dt = F.softplus(torch.randn(Bsz, T, E, generator=g, dtype=torch.float64))
    A = -torch.exp(torch.randn(E, N, generator=g, dtype=torch.float64) * 0.5)
    Bm = torch.randn(Bsz, T, N, generator=g, dtype=torch.float64)
    Cm = torch.randn(Bsz, T, N, generator=g, dtype=torch.float64)
    Dv = torch.randn(E, generator=g, dtype=torch.float64)
    y1 = scan_sequential(x, dt, A, Bm, Cm, Dv)
    y2 = scan_closed_form(x, dt, A, Bm, Cm, Dv)
    res["scan_random_maxabs"] = (y1 - y2).abs().max().item()
    l1 = forward(p64, input_ids, cfg, scan=scan_sequential)
    l2 = forward(p64, input_ids, cfg, scan=scan_closed_form, conv=causal_conv_torch)
    res["model_two_impl_logits_maxabs"] = (l1 - l2).abs().max().item()

    # 2. conv: shifted sum vs torch conv1d
    w = torch.randn(E, 1, d["W"], generator=g, dtype=torch.float64)
    b = torch.randn(E, generator=g, dtype=torch.float64)
    res["conv_maxabs"] = (causal_conv_shift(x, w, b) - causal_conv_torch(x, w, b)).abs().max().item()

    # 3. loss vs torch cross_entropy
    ce_ref = F.cross_entropy(l1.reshape(-1, d["V"]), targets.reshape(-1), ignore_index=-1,
                             reduction="sum")
    res["loss_vs_torch_ce_absdiff"] = (summed_ce(l1, targets) - ce_ref).abs().item()

    # 4. autograd vs central finite differences (4-point stencil, O(h^4) truncation):
    #    one random entry of every parameter tensor plus a few more random entries,
    #    and the directional derivative along random directions in all parameters.
    _, loss, grads = loss_and_grads(p32, input_ids, targets, cfg)
    names = list(p64.keys())

    def loss_at(q):
        return summed_ce(forward(q, input_ids, cfg), targets).item()

    def stencil(f, h):
        return (8.0 * (f(h) - f(-h)) - (f(2 * h) - f(-2 * h))) / (12.0 * h)

    h = 1e-3
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
        fd = stencil(f, h)
        ad = grads[name].view(-1)[idx].item()
        err = abs(fd - ad)
        rel = err / max(abs(fd), abs(ad), 1e-300)
        worst_rel = max(worst_rel, rel)
        worst_abs = max(worst_abs, err)
        # loss ~ 3e2, so each loss value carries ~1e-13 absolute rounding error,
        # i.e. ~1e-10 absolute noise in fd: allow 1e-6 relative + 1e-9 absolute.
        worst_mixed = max(worst_mixed, err / (1e-6 * abs(ad) + 1e-9))
        rows.append((name, idx, ad, fd, rel))
    res["fd_entries"] = float(len(picks))
    res["fd_max_rel_err"] = worst_rel
    res["fd_max_abs_err"] = worst_abs
    res["fd_max_err_over_tol"] = worst_mixed
    worst_dir = 0.0
    for _ in range(3):
        dirs = OrderedDict((k, torch.randn(v.shape, generator=g, dtype=torch.float64))
                           for k, v in p64.items())
        ad = sum((grads[k] * dirs[k]).sum().item() for k in names)
        def fdir(eps):
            return loss_at(OrderedDict((k, p64[k] + eps * dirs[k]) for k in names))
        fd = stencil(fdir, 1e-4)
        worst_dir = max(worst_dir, abs(fd - ad) / max(abs(fd), abs(ad)))
        rows.append(("<random direction>", -1, ad, fd, abs(fd - ad) / max(abs(fd), abs(ad))))
    res["fd_direction_max_rel_err"] = worst_dir
    res["loss"] = loss.item()

    if verbose:
        for name, idx, ad, fd, rel in rows:
            print("  fd %-42s [%4d] autograd=% .12e fd=% .12e rel=%.2e" % (name, idx, ad, fd, rel))
        for k, v in res.items():
            print("  %-32s %.15g" % (k, v) if k in ("loss", "fd_entries") else "  %-32s %.3e" % (k, v))

    ok = (res["scan_random_maxabs"] <= 1e-12 and res["model_two_impl_logits_maxabs"] <= 1e-12
          and res["conv_maxabs"] <= 1e-12 and res["loss_vs_torch_ce_absdiff"] <= 1e-10
          and res["fd_max_err_over_tol"] <= 1.0 and res["fd_direction_max_rel_err"] <= 1e-8)
    return ok, res


# ---------------------------------------------------------------------------
# Fixture
# ---------------------------------------------------------------------------

def _write_config(path, cfg, torch_dtype):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(hf_config(cfg, torch_dtype), f, indent=2)
        f.write("\n")


def _write_ss_config(path, cfg):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(ss_config(cfg), f, indent=2)
        f.write("\n")


def write_reference(path, p32, input_ids, targets, cfg, description):
    """reference.safetensors: inputs, float64 logits, loss and gradients."""
    logits, loss, grads = loss_and_grads(p32, input_ids, targets, cfg)
    return save_reference(path, input_ids, targets, logits, loss, grads, description,
                          "tests/reference/mamba_reference.py")


def save_reference(path, input_ids, targets, logits, loss, grads, description, generator):
    """Writes reference.safetensors (input_ids, targets, logits, loss, grad.<name>) and reads
    it back to check it; returns (logits, loss)."""
    ref = OrderedDict()
    ref["input_ids"] = input_ids
    ref["targets"] = targets
    ref["logits"] = logits
    ref["loss"] = loss.reshape(1)
    for k, g in grads.items():
        ref["grad." + k] = g
    ref_meta = OrderedDict([
        ("format", "pt"),
        ("description", description),
        ("generator", generator),
    ])
    save_safetensors(path, ref, ref_meta)
    rback, _ = load_safetensors(path)
    assert list(rback.keys()) == list(ref.keys()) and all(torch.equal(rback[k], ref[k]) for k in ref)
    return logits, loss


def make_untied_fixture(out_dir, name, cfg, check=True, write=True):
    """An untied checkpoint (HF or state-spaces layout) and its float64 reference."""
    p32 = init_params(cfg, seed=SEED + 10)
    input_ids, targets = make_batch(cfg, seed=SEED + 11)
    if check:
        ok, res = self_check(p32, input_ids, targets, cfg, n_fd=len(p32) + 2, verbose=False)
        print("self-check %s: fd max err / tol %.3e, direction %.3e" %
              (name, res["fd_max_err_over_tol"], res["fd_direction_max_rel_err"]))
        if not ok:
            print("SELF-CHECK FAILED (%s)" % name, file=sys.stderr)
            sys.exit(1)
    if not write:
        return
    d = derived(cfg)
    out = os.path.join(out_dir, name)
    if d["layout"] == "ss":
        _write_ss_config(os.path.join(out, "config.json"), cfg)
    else:
        _write_config(os.path.join(out, "config.json"), cfg, "float32")
    save_safetensors(os.path.join(out, "model.safetensors"), p32, {"format": "pt"})
    back, _ = load_safetensors(os.path.join(out, "model.safetensors"))
    assert list(back.keys()) == list(p32.keys()) and all(torch.equal(back[k], p32[k]) for k in p32)
    _, loss = write_reference(
        os.path.join(out, "reference.safetensors"), p32, input_ids, targets, cfg,
        "float64 reference of MambaForCausalLM slow path with an untied head "
        "(logits = h @ lm_head.weight^T, lm_head.weight [V, D]) from float32 weights; "
        "loss = sum of CE over targets != -1; grad.X = d(loss)/dX; initial state zero")
    print("wrote %s (%s layout, V = %d, D = %d, loss = %.15g)" % (out, d["layout"], d["V"], d["D"], loss.item()))


def make_fixture(out_dir=None, cfg=TINY, check=True, write=True):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if out_dir is None:
        here = os.path.dirname(os.path.abspath(__file__))
        out_dir = os.path.join(os.path.dirname(here), "data")
    d = derived(cfg)
    p32 = init_params(cfg)
    input_ids, targets = make_batch(cfg)

    if check:
        print("self-check:")
        ok, _ = self_check(p32, input_ids, targets, cfg)
        if not ok:
            print("SELF-CHECK FAILED", file=sys.stderr)
            sys.exit(1)
        print("self-check OK")
    untied = [("mamba_untied", UNTIED), ("mamba_untied_square", UNTIED_SQUARE), ("mamba_untied_ss", UNTIED_SS)]
    if not write:
        for name, c in untied:
            make_untied_fixture(out_dir, name, c, check=check, write=False)
        return

    logits, loss, grads = loss_and_grads(p32, input_ids, targets, cfg)

    tiny = os.path.join(out_dir, "mamba_tiny")
    bf = os.path.join(out_dir, "mamba_tiny_bf16")
    meta = {"format": "pt"}
    _write_config(os.path.join(tiny, "config.json"), cfg, "float32")
    save_safetensors(os.path.join(tiny, "model.safetensors"), p32, meta)
    p16 = OrderedDict((k, v.to(torch.bfloat16)) for k, v in p32.items())
    _write_config(os.path.join(bf, "config.json"), cfg, "bfloat16")
    save_safetensors(os.path.join(bf, "model.safetensors"), p16, meta)

    ref = OrderedDict()
    ref["input_ids"] = input_ids
    ref["targets"] = targets
    ref["logits"] = logits
    ref["loss"] = loss.reshape(1)
    for k, g in grads.items():
        ref["grad." + k] = g
    ref_meta = OrderedDict([
        ("format", "pt"),
        ("description", "float64 reference of MambaForCausalLM slow path from float32 weights; "
                        "loss = sum of CE over targets != -1 (targets used as given, no shift); "
                        "grad.X = d(loss)/dX; initial state zero"),
        ("generator", "tests/reference/mamba_reference.py"),
    ])
    save_safetensors(os.path.join(tiny, "reference.safetensors"), ref, ref_meta)

    # round-trip checks
    back, _ = load_safetensors(os.path.join(tiny, "model.safetensors"))
    assert list(back.keys()) == list(p32.keys())
    assert all(torch.equal(back[k], p32[k]) for k in p32)
    back16, _ = load_safetensors(os.path.join(bf, "model.safetensors"))
    assert all(back16[k].dtype == torch.bfloat16 and torch.equal(back16[k], p16[k]) for k in p16)
    rback, _ = load_safetensors(os.path.join(tiny, "reference.safetensors"))
    assert all(torch.equal(rback[k], ref[k]) for k in ref)
    print("wrote %s (loss = %.15g, %d valid targets, logits %s)"
          % (out_dir, loss.item(), int((targets != -1).sum()), tuple(logits.shape)))

    for name, c in untied:
        make_untied_fixture(out_dir, name, c, check=check)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="output data dir (default: tests/data)")
    ap.add_argument("--check-only", action="store_true", help="run self-checks, write nothing")
    ap.add_argument("--no-check", action="store_true", help="skip self-checks")
    a = ap.parse_args(argv)
    make_fixture(a.out, check=not a.no_check, write=not a.check_only)


if __name__ == "__main__":
    main()
