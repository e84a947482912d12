"""PyTorch reference of a Mamba-2 language model, written for speed.

    embedding -> K blocks  y = y + Mamba2(RMSNorm(y))  -> RMSNorm -> tied head
              -> cross-entropy summed over tokens (targets of -1 ignored)

the model ssmx's Mamba-2 layer is to be measured against (the semantics of Hugging Face's
Mamba2ForCausalLM and mamba_ssm's Mamba2, checked against the independent float64
reference tests/reference/mamba2_reference.py by --selftest). With u the normalised block
input [T, D], E = expand * D, H = E / P heads of P = headdim channels, G groups, N states:

    [z; xBC; dt] = u in_proj^T                    in_proj.weight [2E + 2GN + H, D]
    [x; B; C] = SiLU(causal depthwise conv1d(xBC)) conv1d.weight [E + 2GN, 1, W], conv1d.bias
    dt     = softplus(dt + dt_bias)               dt_bias [H]
    h_t[h] = exp(dt_t[h] A[h]) h_{t-1}[h] + dt_t[h] x_t[h] (x) B_t[g(h)],  A = -exp(A_log) [H]
    y_t[h] = h_t[h] C_t[g(h)] + D[h] x_t[h]       D [H]; head h reads group g(h) = h // (H/G)
    out    = GroupRMSNorm(y (.) SiLU(z)) out_proj^T   norm.weight [E], per group of E/G channels
                                                  out_proj.weight [D, E]

Parameter names are the Hugging Face checkpoint's without the "backbone." prefix:
embedding.weight, layers.{k}.norm.weight, layers.{k}.mixer.{in_proj.weight, conv1d.weight,
conv1d.bias, dt_bias, A_log, D, norm.weight, out_proj.weight}, norm_f.weight (and
lm_head.weight for an untied head, used only to check the untied fixture). Initialisation
follows mamba_ssm's Mamba2 (uniform(+-1/sqrt(fan_in)) projections and convolution, dt
log-uniform in [1e-3, 1e-1], A = -uniform(1, 16), D = 1, norm weights 1).

The SSM is the chunked SSD algorithm (Mamba-2 paper, section 6), batched over all chunks of
L tokens (--chunk, default 64; T is padded with dt = 0, i.e. decay 1 and no input):

    log-decays a = dt A per head, cum = cumsum_l(a) within each chunk,
    intra-chunk: y_diag = (exp(segsum(a)) (.) C B^T) (dt x)    segsum[l, s] = cum[l] - cum[s]
                 for s < l (masked to -inf on and above the diagonal before exp, so every
                 exponent is <= 0; the diagonal's 1 added as a constant), one [L, L] matrix
                 per chunk and head
    chunk states from zero: S[c] = (exp(sum_{k>l} a_k) (.) dt x)^T B     [H, P, N]
    state passing: s[c+1] = exp(cum[c, L-1]) s[c] + S[c]  (ChunkStates: an in-place loop over
                 the chunks with its own backward, one autograd node whatever T)
    inter-chunk: y_off[l] = exp(cum[l]) C_l s[c]    (s[c]: the state entering chunk c)

Everything else is autograd over matrix products and elementwise ops, float32. Only the
association of products and sums differs from the sequential recurrence (checked by
--selftest: chunked vs sequential forward to 1e-5 in float32 and 1e-12 in float64, loss and
every gradient to 1e-10 in float64, and loss and gradients of the fixtures
tests/data/mamba2_{tiny,groups} to 1e-10).

Benchmark model (defaults, mirroring mamba.py's D = 256, expand 2, W = 4, K = 4, vocab 256
with Mamba-2's own shape): N = 64 states, headdim 64 (H = 8 heads), G = 1 group, chunk 64.

Tokens shared with the C++ benchmarks: x_t = (7t + 3) mod vocab, target_t = x_{t+1}.

Timing (float32, --threads 2 by default):
    OMP_WAIT_POLICY=passive /usr/bin/python3 benchmarks/reference/mamba2.py --T 1K,4K,16K
prints JSON lines {"name":"pytorch_mamba2_throughput", "T", "tokens_per_s", ...}.
Correctness: /usr/bin/python3 benchmarks/reference/mamba2.py --selftest
"""
import argparse
import json
import math
import os
import resource
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mamba import (blas_in_use, counts, read_safetensors, rms_norm, softplus,  # noqa: E402
                   time_training_step, tokens)

NORM_EPS = 1e-5
DEFAULT_CHUNK = 64


# ---- the chunked SSD ------------------------------------------------------------------------


class ChunkStates(torch.autograd.Function):
    """State passing between chunks: S [nc, H, P, N] (each chunk's end state from a zero
    start), d [nc, H] (each chunk's total decay), h0 [H, P, N] -> (starts [nc, H, P, N], the
    state entering each chunk, and the final state [H, P, N]):
        starts[0] = h0,  starts[c+1] = d[c] starts[c] + S[c],  final = starts[nc].
    A loop of in-place multiply-adds; the backward is the same loop in reverse."""

    @staticmethod
    def forward(ctx, S, d, h0):
        starts = torch.empty_like(S)
        s = h0
        for c in range(S.shape[0]):
            starts[c] = s
            s = torch.addcmul(S[c], d[c, :, None, None], s)
        ctx.save_for_backward(d, starts)
        return starts, s

    @staticmethod
    def backward(ctx, g_starts, g_final):
        d, starts = ctx.saved_tensors
        dS = torch.empty_like(starts)
        dd = torch.empty_like(d)
        lam = g_final.clone()  # dL/d(state after chunk c)
        for c in reversed(range(starts.shape[0])):
            dS[c] = lam
            dd[c] = (lam * starts[c]).sum((-2, -1))
            lam = torch.addcmul(g_starts[c], d[c, :, None, None], lam)  # dL/d starts[c]
        return dS, dd, lam


def ssd_chunked(x, dt, A, B, C, chunk=DEFAULT_CHUNK, h0=None):
    """y (without the D term) and the final state by the chunked SSD form: x [T, H, P],
    dt [T, H], A [H], B, C [T, G, N], h0 [H, P, N] or None -> (y [T, H, P], [H, P, N])."""
    T, H, P = x.shape
    G, N = B.shape[1:]
    R, L = H // G, chunk
    pad = (-T) % L
    nc = (T + pad) // L
    xdt = F.pad(x * dt.unsqueeze(-1), (0, 0, 0, 0, 0, pad)).view(nc, L, H, P).permute(0, 2, 1, 3)  # [c,h,l,p]
    Bc = F.pad(B, (0, 0, 0, 0, 0, pad)).view(nc, L, G, N).permute(0, 2, 1, 3)  # [c, g, l, n]
    Cc = F.pad(C, (0, 0, 0, 0, 0, pad)).view(nc, L, G, N).permute(0, 2, 1, 3)
    a = F.pad(dt * A, (0, 0, 0, pad)).view(nc, L, H).transpose(1, 2)  # [c, h, l] log-decays
    cum = torch.cumsum(a, dim=-1)  # from the chunk start to l, inclusive
    strict = torch.ones(L, L, dtype=torch.bool, device=x.device).tril(-1)
    # exp(cum[l] - cum[s]) for s < l, and the diagonal's decay 1 added as a constant: through
    # cum - cum its gradient would be two equal and opposite terms, cancelling to rounding
    # noise that swamps the small true gradient of strong decays
    decay = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~strict, -math.inf).exp()  # [c, h, l, s]
    decay = decay + torch.eye(L, dtype=x.dtype, device=x.device)
    CB = torch.matmul(Cc, Bc.transpose(-1, -2))  # [c, g, l, s]
    M = (decay.view(nc, G, R, L, L) * CB.unsqueeze(2)).view(nc, H, L, L)
    y = torch.matmul(M, xdt)  # [c, h, l, p]: within the chunk
    # each chunk's end state from a zero start, the R heads of a group in one product; the
    # decay to the chunk end is exp(sum_{k>l} a_k), an exclusive reverse cumulative sum
    to_end = F.pad(torch.flip(torch.cumsum(torch.flip(a, [-1]), dim=-1)[..., :-1], [-1]), (0, 1)).exp()
    w = xdt * to_end.unsqueeze(-1)  # [c, h, l, p]
    w = w.reshape(nc, G, R, L, P).permute(0, 1, 2, 4, 3).reshape(nc, G, R * P, L)
    S = torch.matmul(w, Bc).view(nc, H, P, N)
    s0 = x.new_zeros(H, P, N) if h0 is None else h0
    starts, final = ChunkStates.apply(S, cum[:, :, -1].exp(), s0)
    # what the state entering each chunk adds: exp(cum[l]) C_l starts[c]
    y_off = torch.matmul(Cc, starts.view(nc, G, R * P, N).transpose(-1, -2))  # [c, g, l, r*p]
    y_off = y_off.view(nc, G, L, R, P).permute(0, 1, 3, 2, 4).reshape(nc, H, L, P)
    y = torch.addcmul(y, y_off, cum.exp().unsqueeze(-1))
    return y.permute(0, 2, 1, 3).reshape(nc * L, H, P)[:T], final


def ssd_sequential(x, dt, A, B, C, chunk=None, h0=None):
    """The recurrence as written, one token at a time, through autograd (small T only)."""
    T, H, P = x.shape
    G, N = B.shape[1:]
    Bh, Ch = B.repeat_interleave(H // G, dim=1), C.repeat_interleave(H // G, dim=1)  # [T, H, N]
    h = x.new_zeros(H, P, N) if h0 is None else h0
    ys = []
    for t in range(T):
        h = torch.exp(dt[t] * A)[:, None, None] * h + (dt[t, :, None] * x[t]).unsqueeze(-1) * Bh[t, :, None, :]
        ys.append(torch.matmul(h, Ch[t].unsqueeze(-1)).squeeze(-1))
    return torch.stack(ys), h


SCANS = {"chunked": ssd_chunked, "sequential": ssd_sequential}


# ---- the model ------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, d, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, dtype=dtype))

    def forward(self, x):
        return rms_norm(x, self.weight)


class Mamba2(nn.Module):
    """The Mamba-2 mixer; submodule names give the checkpoint names."""

    def __init__(self, D, N, headdim, groups, expand, W, dtype, scan="chunked", chunk=DEFAULT_CHUNK,
                 conv="shift"):
        super().__init__()
        E = expand * D
        H = E // headdim
        assert H * headdim == E and H % groups == 0, "d_inner must split into heads, heads into groups"
        self.D_model, self.N, self.P, self.G, self.E, self.H, self.W = D, N, headdim, groups, E, H, W
        self.conv_dim = E + 2 * groups * N
        self.scan, self.chunk, self.conv = SCANS[scan], chunk, conv
        self.in_proj = nn.Linear(D, 2 * E + 2 * groups * N + H, bias=False, dtype=dtype)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, W, groups=self.conv_dim, padding=W - 1, dtype=dtype)
        self.dt_bias = nn.Parameter(torch.zeros(H, dtype=dtype))
        self.A_log = nn.Parameter(torch.zeros(H, dtype=dtype))
        self.D = nn.Parameter(torch.ones(H, dtype=dtype))
        self.norm = RMSNorm(E, dtype)
        self.out_proj = nn.Linear(E, D, bias=False, dtype=dtype)

    def init_(self, gen):
        """mamba_ssm's Mamba2 init: uniform(+-1/sqrt(fan_in)) projections and convolution
        (PyTorch's defaults), dt_bias softplus^-1 of dt log-uniform in [1e-3, 1e-1] (floor
        1e-4), A = -uniform(1, 16), D = 1, norm weight 1."""
        def uniform(p, bound):
            p.copy_(torch.empty(p.shape, dtype=torch.float64).uniform_(-bound, bound, generator=gen))

        with torch.no_grad():
            uniform(self.in_proj.weight, 1 / math.sqrt(self.D_model))
            uniform(self.conv1d.weight, 1 / math.sqrt(self.W))
            uniform(self.conv1d.bias, 1 / math.sqrt(self.W))
            uniform(self.out_proj.weight, 1 / math.sqrt(self.E))
            lo, hi = math.log(1e-3), math.log(1e-1)
            dt = torch.exp(torch.empty(self.H, dtype=torch.float64).uniform_(lo, hi, generator=gen)).clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.A_log.copy_(torch.log(torch.empty(self.H, dtype=torch.float64).uniform_(1, 16, generator=gen)))
            self.D.fill_(1.0)
            self.norm.weight.fill_(1.0)

    def causal_conv(self, x):  # x [T, conv_dim] -> [T, conv_dim]
        T, W = x.shape[0], self.W
        if self.conv == "torch":
            return F.conv1d(x.t().unsqueeze(0), self.conv1d.weight, self.conv1d.bias, padding=W - 1,
                            groups=self.conv_dim)[0, :, :T].t()
        xp = F.pad(x, (0, 0, W - 1, 0))  # out_t = bias + sum_j w_j x_{t-(W-1)+j}
        out = torch.addcmul(self.conv1d.bias, xp[:T], self.conv1d.weight[:, 0, 0])
        for j in range(1, W):
            out = torch.addcmul(out, xp[j:j + T], self.conv1d.weight[:, 0, j])
        return out

    def forward(self, u):  # u [T, D] -> [T, D]
        E, H, P, G, N = self.E, self.H, self.P, self.G, self.N
        T = u.shape[0]
        z, xBC, dt = F.linear(u, self.in_proj.weight).split([E, self.conv_dim, H], dim=-1)
        xBC = F.silu(self.causal_conv(xBC))
        x, B, C = xBC.split([E, G * N, G * N], dim=-1)
        dt = softplus(dt + self.dt_bias)
        A = -torch.exp(self.A_log)
        y, _ = self.scan(x.reshape(T, H, P), dt, A, B.reshape(T, G, N), C.reshape(T, G, N), chunk=self.chunk)
        y = torch.addcmul(y.reshape(T, E), x, self.D.repeat_interleave(P))
        g = (y * F.silu(z)).view(T, G, E // G)  # gated RMSNorm, per group
        g = g * torch.rsqrt((g * g).mean(-1, keepdim=True) + NORM_EPS)
        return F.linear(g.view(T, E) * self.norm.weight, self.out_proj.weight)


class Block(nn.Module):
    def __init__(self, D, mixer, dtype):
        super().__init__()
        self.norm = RMSNorm(D, dtype)
        self.mixer = mixer

    def forward(self, y):
        return y + self.mixer(self.norm(y))


class Embedding(nn.Module):
    def __init__(self, vocab, D, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab, D, dtype=dtype))


class Model(nn.Module):
    """K Mamba-2 blocks, RMSNorm, a tied head (or lm_head.weight [vocab, D] when tie=False)."""

    def __init__(self, D=256, N=64, headdim=64, groups=1, expand=2, W=4, K=4, vocab=256, dtype=torch.float32,
                 tie=True, **mixer_options):
        super().__init__()
        self.D = D
        self.embedding = Embedding(vocab, D, dtype)
        self.layers = nn.ModuleList([Block(D, Mamba2(D, N, headdim, groups, expand, W, dtype, **mixer_options), dtype)
                                     for _ in range(K)])
        self.norm_f = RMSNorm(D, dtype)
        self.lm_head = None if tie else Embedding(vocab, D, dtype)

    def init_(self, seed=0):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # embeddings ~ N(0, 1/D), as ssmx
            for e in (self.embedding, self.lm_head):
                if e is not None:
                    e.weight.copy_(torch.randn(e.weight.shape, generator=gen, dtype=torch.float64) / math.sqrt(self.D))
        for b in self.layers:
            b.mixer.init_(gen)
        return self

    def logits(self, inputs):
        y = self.embedding.weight[inputs]
        for b in self.layers:
            y = b(y)
        head = self.embedding if self.lm_head is None else self.lm_head
        return rms_norm(y, self.norm_f.weight) @ head.weight.t()

    def forward(self, inputs, targets):
        """Summed cross-entropy of one sequence (inputs, targets: [T] int64)."""
        return F.cross_entropy(self.logits(inputs), targets, ignore_index=-1, reduction="sum")


# ---- benchmark --------------------------------------------------------------------------------


def bench(args):
    if args.compile and not hasattr(torch, "compile"):
        sys.exit(f"--compile needs torch.compile (PyTorch >= 2.0); this is torch {torch.__version__}")
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    blas = blas_in_use(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, BLAS_INFO={blas['torch_blas_info']}, "
          f"loaded BLAS: {blas['blas']} {blas['blas_libraries']}", file=sys.stderr, flush=True)
    out = open(args.out, "w") if args.out else None
    model = Model(args.D, args.N, args.headdim, args.groups, args.expand, args.W, args.K, args.vocab, torch.float32,
                  chunk=args.chunk, conv=args.conv).init_(args.seed).to(dev)
    step = torch.compile(model) if args.compile else model
    heads = args.expand * args.D // args.headdim

    for T in args.T:
        x, tgt = tokens(T, args.vocab)
        x, tgt = x.to(dev), tgt.to(dev)
        try:
            best, loss = time_training_step(model, step, x, tgt, args.warmup + args.repeats, dev)
        except torch.cuda.OutOfMemoryError:
            line = {"name": "pytorch_mamba2_throughput", "kind": "oom", "T": T, "device": str(dev),
                    "compile": args.compile}
            print(json.dumps(line), flush=True)
            if out:
                out.write(json.dumps(line) + "\n")
            break
        line = {
            "name": "pytorch_mamba2_throughput", "model": "mamba2", "T": T, "batch": 1, "D": args.D, "N": args.N,
            "headdim": args.headdim, "heads": heads, "groups": args.groups, "expand": args.expand, "W": args.W,
            "K": args.K, "vocab": args.vocab, "dtype": "float32", "scan": "chunked", "scan_chunk": args.chunk,
            "conv": args.conv, "threads": torch.get_num_threads(), "torch": torch.__version__, "blas": blas["blas"],
            "blas_threads": blas.get("blas_threads"), "blas_libraries": blas["blas_libraries"],
            "torch_blas_info": blas["torch_blas_info"],
            "device": torch.cuda.get_device_name(dev) if cuda else "cpu", "compile": args.compile,
            "seconds": best, "tokens_per_s": T / best, "us_per_token": 1e6 * best / T, "loss": float(loss),
            # the process's peak so far: with T ascending, the peak of the largest T
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        if cuda:
            line["peak_device_bytes"] = torch.cuda.max_memory_allocated(dev)
        s = json.dumps(line)
        print(s, flush=True)
        if out:
            out.write(s + "\n")
            out.flush()


# ---- self-test ------------------------------------------------------------------------------


def _rel_err(a, b):
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def _loss_and_grads(model, batches):
    model.zero_grad(set_to_none=True)
    loss = sum(model(x, t) for x, t in batches)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _report(ok, what, err, where=""):
    print(f"{'ok  ' if ok else 'FAIL'} {what:<52} largest relative error {err:.1e}{where}", flush=True)
    return ok


def _compare(name, ref, got, tol):
    (l0, g0), (l1, g1) = ref, got
    worst, worst_p = abs(l1 - l0) / abs(l0), "loss"
    for n in g0:
        e = _rel_err(g1[n], g0[n])
        if e > worst:
            worst, worst_p = e, n
    return _report(worst <= tol, name, worst, f" ({worst_p})")


def _scan_inputs(gen, dtype, T, H, P, G, N, strong):
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    dt = F.softplus(randn(T, H) + (3.0 if strong else -1.0))  # strong: log-decays -3..-60 per token
    A = -torch.exp(randn(H) * 0.5) * (4.0 if strong else 1.0)
    ins = (randn(T, H, P), dt, A, randn(T, G, N), randn(T, G, N), randn(H, P, N))
    return [t.to(dtype) for t in ins]


def check_scans(seed):
    """ssd_chunked against ssd_sequential on random inputs: forward (outputs and final state)
    to 1e-12 in float64 and 1e-5 in float32, every input gradient to 1e-10 in float64."""
    ok = True
    gen = torch.Generator().manual_seed(seed)
    T, H, P, N = 45, 4, 4, 4
    for G in (1, 2):
        for strong in (False, True):
            for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
                ins = _scan_inputs(gen, dtype, T, H, P, G, N, strong)
                x, dt, A, B, C, h0 = ins
                y0, s0 = ssd_sequential(x, dt, A, B, C, h0=h0)
                worst = 0.0
                for L in (1, 4, 7, 8, 16, 45, 64):
                    y1, s1 = ssd_chunked(x, dt, A, B, C, L, h0)
                    worst = max(worst, _rel_err(y1, y0), _rel_err(s1, s0))
                what = (f"chunked vs sequential forward, {str(dtype)[6:]}, G={G}"
                        + (", strong decay" if strong else ""))
                ok &= _report(worst <= tol, what, worst)
            # gradients of every input, float64, through a random cotangent of y and the final state
            ins = [t.requires_grad_(True) for t in _scan_inputs(gen, torch.float64, T, H, P, G, N, strong)]
            gy, gs = torch.randn(T, H, P, generator=gen, dtype=torch.float64), torch.randn(H, P, N, generator=gen,
                                                                                           dtype=torch.float64)

            def grads(f, L=None):
                y, s = f(*ins[:5], L, ins[5])
                return torch.autograd.grad((y * gy).sum() + (s * gs).sum(), ins)
            g0 = grads(ssd_sequential)
            worst = 0.0
            for L in (1, 5, 8, 64):
                worst = max([worst] + [_rel_err(a, b) for a, b in zip(grads(ssd_chunked, L), g0)])
            ok &= _report(worst <= 1e-10, f"chunked vs sequential input gradients, G={G}"
                          + (", strong decay" if strong else ""), worst)
    S = torch.randn(5, 3, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    d = torch.rand(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    gc = torch.autograd.gradcheck(ChunkStates.apply, (S, d, h0))
    print(f"{'ok  ' if gc else 'FAIL'} ChunkStates backward: torch.autograd.gradcheck", flush=True)
    return ok and gc


def check_fixture(directory, tol):
    """Loss and gradients of a Hugging Face-layout fixture written by
    tests/reference/mamba2_reference.py (an independent sequential model; ssmx's tests read
    the same files), recomputed in float64 from its float32 weights by the chunked SSD."""
    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)
    weights = read_safetensors(os.path.join(directory, "model.safetensors"))
    ref = read_safetensors(os.path.join(directory, "reference.safetensors"))
    D, K = cfg["hidden_size"], cfg["num_hidden_layers"]
    if cfg["layer_norm_epsilon"] != NORM_EPS or list(cfg["time_step_limit"]) != [0.0, math.inf]:
        print(f"FAIL fixture {directory}: expected eps {NORM_EPS} and no time_step_limit")
        return False
    tie = cfg["tie_word_embeddings"]
    model = Model(D, cfg["state_size"], cfg["head_dim"], cfg["n_groups"], cfg["expand"], cfg["conv_kernel"], K,
                  cfg["vocab_size"], torch.float64, tie=tie, chunk=4)
    params = dict(model.named_parameters())

    def ours(name):
        name = name[len("backbone."):] if name.startswith("backbone.") else name
        return "embedding.weight" if name == "embeddings.weight" else name

    with torch.no_grad():
        for name, w in weights.items():
            params[ours(name)].copy_(w.to(torch.float64))
    ids, tgt = ref["input_ids"].long(), ref["targets"].long()
    got = _loss_and_grads(model, list(zip(ids, tgt)))
    want = (ref["loss"].item(), {ours(n[len("grad."):]): g for n, g in ref.items() if n.startswith("grad.")})
    if sorted(want[1]) != sorted(got[1]):
        print(f"FAIL fixture parameter names differ: {sorted(want[1])} vs {sorted(got[1])}")
        return False
    return _compare(f"fixture {os.path.basename(os.path.normpath(directory))} (chunk 4, G={cfg['n_groups']})",
                    want, got, tol)


def selftest(args):
    """The chunked SSD against the sequential recurrence (random inputs, then a tiny model's
    loss and every gradient, chunk lengths that do and do not divide T, one and two groups,
    default and strong decays), and against the float64 reference fixtures."""
    torch.set_num_threads(args.threads)
    tol = 1e-10
    ok = check_scans(args.seed)
    T = 45
    for groups in (1, 2):
        shape = dict(D=8, N=4, headdim=4, groups=groups, expand=2, W=4, K=2, vocab=16)
        x, tgt = tokens(T, shape["vocab"])
        tgt[7] = tgt[-1] = -1  # ignored positions
        for strong in (False, True):
            def run(scan, chunk, dtype=torch.float64):
                m = Model(**shape, dtype=dtype, scan=scan, chunk=chunk or 1,
                          conv="torch" if scan == "sequential" else "shift").init_(args.seed)
                if strong:  # dt near 5: log-decays -5..-80 per token
                    with torch.no_grad():
                        for b in m.layers:
                            b.mixer.dt_bias.fill_(5.0)
                return m
            ref = _loss_and_grads(run("sequential", None), [(x, tgt)])
            for chunk in (1, 4, 7, 16, 45, 64):
                ok &= _compare(f"model chunk {chunk}, G={groups}" + (", strong decay" if strong else ""), ref,
                               _loss_and_grads(run("chunked", chunk), [(x, tgt)]), tol)
            with torch.no_grad():  # float32 forward against the float64 sequential one
                want = run("sequential", None).logits(x)
                got = run("chunked", 16, torch.float32).logits(x).double()
            err = _rel_err(got, want)
            ok &= _report(err <= 1e-5, f"model float32 chunked logits, G={groups}"
                          + (", strong decay" if strong else ""), err)
    data = args.fixture or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "data")
    found = False
    for name in ("mamba2_tiny", "mamba2_groups"):
        if os.path.isdir(os.path.join(data, name)):
            found = True
            ok &= check_fixture(os.path.join(data, name), tol)
    if args.fixture and not found:
        print(f"FAIL no mamba2_tiny or mamba2_groups fixture under {data}")
        ok = False
    print("PASS" if ok else "FAIL", flush=True)
    return 0 if ok else 1


def main(argv=None):
    p = argparse.ArgumentParser(description="PyTorch reference of a Mamba-2 model: forward+backward timing")
    p.add_argument("--T", type=counts, default=counts("1K,4K,16K"))
    p.add_argument("--D", type=int, default=256)
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--groups", type=int, default=1)
    p.add_argument("--expand", type=int, default=2)
    p.add_argument("--W", type=int, default=4)
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="SSD chunk length of the reference (not ssmx's)")
    p.add_argument("--conv", choices=["shift", "torch"], default="shift",
                   help="causal conv1d as W shifted multiply-adds, or torch's conv1d")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="timed steps per T; the fastest is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, or cuda")
    p.add_argument("--compile", action="store_true", help="time torch.compile(model) instead of eager")
    p.add_argument("--out")
    p.add_argument("--selftest", action="store_true",
                   help="check the chunked SSD against the sequential recurrence and the fixtures")
    p.add_argument("--fixture", help="with --selftest: the directory holding mamba2_tiny and mamba2_groups "
                                     "(default: tests/data beside this script)")
    args = p.parse_args(argv)
    if args.selftest:
        return selftest(args)
    bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
