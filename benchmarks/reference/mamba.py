"""PyTorch reference of the ssmx Mamba-1 language model, written for speed.

    embedding -> K blocks  y = y + Mamba(RMSNorm(y))  -> RMSNorm -> tied head
              -> cross-entropy summed over tokens (targets of -1 ignored)

the model of ssmx::nn::Model<nn::Mamba<float, D, N, Expand, W, R>, K> (include/ssmx/nn/
{mamba,norm,model}.hpp). With u the normalised block input [T, D] and E = Expand * D:

    [x; z] = u in_proj^T                          in_proj.weight   [2E, D]
    x      = SiLU(causal depthwise conv1d(x))     conv1d.weight [E, 1, W], conv1d.bias [E]
    [d; B; C] = x x_proj^T                        x_proj.weight    [R + 2N, E]
    delta  = softplus(d dt_proj^T + dt_bias)      dt_proj.weight [E, R], dt_proj.bias [E]
    h_t    = exp(delta_t (x) A) (.) h_{t-1} + (delta_t (.) x_t) (x) B_t,   A = -exp(A_log) [E, N]
    y_t    = h_t C_t + D (.) x_t                  D [E]
    out    = (y (.) SiLU(z)) out_proj^T           out_proj.weight  [D, E]

Parameter names are ssmx's (embedding.weight, layers.{k}.norm.weight, layers.{k}.mixer.
{in_proj.weight, conv1d.weight, conv1d.bias, x_proj.weight, dt_proj.weight, dt_proj.bias,
A_log, D, out_proj.weight}, norm_f.weight): the public Mamba checkpoints' names and shapes
without the "backbone." prefix. Initialisation follows ssmx's scheme (not its random stream).

The selective scan (SelectiveScan) is an autograd Function with its own backward, as
mamba_ssm's selective_scan_fn: it saves only its inputs and recomputes the states, so no
[T, E, N] tensor outlives a tile. Time is cut into tiles of `tile` tokens (the state carried
between tiles) and each tile into chunks of L tokens:

    in-chunk states from a zero start, every chunk of the tile at once:
        hloc[c, l] = a[c, l] hloc[c, l-1] + b[c, l]           (a loop over l < L)
    cumulative decays from the log-decays log a = delta A, exactly:
        P[c, l] = exp(A cumsum_l(delta)[c, l])                exponent <= 0
    chunk starts by a short loop over the tile's chunks:
        H[c+1] = P[c, L-1] H[c] + hloc[c, L-1]
    h[c, l] = hloc[c, l] + P[c, l] H[c]

The backward pass runs the adjoint delta_t = g_t (x) C_t + a_{t+1} delta_{t+1} the same
way in reverse (suffix decays exp(A (cum[L-1] - cum[l])), exponent <= 0), then every
parameter cotangent is a contraction over the tile. Only the association of products and
sums differs from the sequential recurrence (checked to 1e-10 in float64 by --selftest).
Padding rows (the last chunk of a tile) have delta = 0, so a = 1 and b = 0 there.

Why not the masked [L, L] (SSD) form: Mamba-1's decay is per (channel, state), so the
intra-chunk decay matrix is [L, L, E, N] per chunk, L times the work and memory of the
states themselves; measured slower at every L tried (see --scan masked).

Tokens shared with the C++ benchmarks: x_t = (7t + 3) mod vocab, target_t = x_{t+1}.

Timing (float32, --threads 2 by default):
    OMP_WAIT_POLICY=passive /usr/bin/python3 benchmarks/reference/mamba.py --T 1K,4K,16K
prints JSON lines {"name":"pytorch_mamba_throughput", "T", "tokens_per_s", ...}.
Correctness: /usr/bin/python3 benchmarks/reference/mamba.py --selftest
"""
import argparse
import ctypes
import json
import math
import os
import re
import resource
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

NORM_EPS = 1e-5
DEFAULT_CHUNK = 16
DEFAULT_TILE = 512


def tokens(T, vocab):
    """The shared token stream: inputs x_t = (7t + 3) mod vocab, targets x_{t+1}."""
    t = torch.arange(T, dtype=torch.int64)
    return (7 * t + 3) % vocab, (7 * (t + 1) + 3) % vocab


def rms_norm(x, w, eps=NORM_EPS):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def softplus(x):
    # log(1 + e^x) without torch's threshold at 20; its gradient is exactly sigmoid(x),
    # as in ssmx's functor.
    return torch.logaddexp(x, torch.zeros_like(x))


# ---- the selective scan ---------------------------------------------------------------------


def _pad_rows(t, m):
    return t if t.shape[0] == m else F.pad(t, (0, 0) * (t.dim() - 1) + (0, m - t.shape[0]))


def _tile_states(x, dt, A, B, h0, L):
    """States of one tile: x, dt [n, E], B [n, N], h0 [E, N] -> (a, h, h_end, cum), where
    a, h are [m, E, N] (m = n rounded up to L; padding rows have a = 1, b = 0) and cum is
    the in-chunk cumulative delta, [m / L, L, E]."""
    n, E = x.shape
    N = A.shape[1]
    m = -(-n // L) * L
    nc = m // L
    dt_p = _pad_rows(dt, m)
    a = (dt_p.unsqueeze(-1) * A).exp_()
    h = _pad_rows(dt * x, m).unsqueeze(-1) * _pad_rows(B, m).unsqueeze(1)  # b_t, then h_t in place
    hc, ac = h.view(nc, L, E, N), a.view(nc, L, E, N)
    for l in range(1, L):  # every chunk of the tile at once, from a zero state
        hc[:, l].addcmul_(ac[:, l], hc[:, l - 1])
    cum = torch.cumsum(dt_p.view(nc, L, E), dim=1)
    P = (cum.unsqueeze(-1) * A).exp_()  # decay from the chunk start to l, exponent <= 0
    starts = torch.empty(nc, E, N, dtype=x.dtype, device=x.device)
    s = h0
    for c in range(nc):
        starts[c] = s
        s = torch.addcmul(hc[c, L - 1], P[c, L - 1], s)
    hc.addcmul_(P, starts.unsqueeze(1))
    return a, h, s, cum


class SelectiveScan(torch.autograd.Function):
    """y = scan(x, delta, A, B, C, D) from h_0 = 0: x, delta [T, E]; A [E, N]; B, C [T, N];
    D [E] -> y [T, E]. Saves its inputs and the state at each tile start; recomputes the
    rest in backward, one tile at a time."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, chunk, tile):
        T, E = x.shape
        N = A.shape[1]
        y = torch.empty_like(x)
        h = x.new_zeros(E, N)
        starts = []
        for t0 in range(0, T, tile):
            t1 = min(T, t0 + tile)
            starts.append(h)
            _, hs, h, _ = _tile_states(x[t0:t1], dt[t0:t1], A, B[t0:t1], h, chunk)
            y[t0:t1] = torch.bmm(hs[: t1 - t0], C[t0:t1].unsqueeze(-1)).squeeze(-1)
        y.addcmul_(x, D)
        ctx.save_for_backward(x, dt, A, B, C, D, torch.stack(starts))
        ctx.chunk, ctx.tile = chunk, tile
        return y

    @staticmethod
    def backward(ctx, gy):
        x, dt, A, B, C, D, starts = ctx.saved_tensors
        L, tile = ctx.chunk, ctx.tile
        T, E = x.shape
        N = A.shape[1]
        gy = gy.contiguous()
        dx = gy * D
        dD = (gy * x).sum(0)
        ddt, dB, dC = torch.empty_like(dt), torch.empty_like(B), torch.empty_like(C)
        dA = torch.zeros_like(A)
        carry = x.new_zeros(E, N)  # a_{t+1} delta_{t+1} for the tile's last token
        for i in reversed(range(len(starts))):
            t0 = i * tile
            t1 = min(T, t0 + tile)
            n = t1 - t0
            a, h, _, cum = _tile_states(x[t0:t1], dt[t0:t1], A, B[t0:t1], starts[i], L)
            m = h.shape[0]
            nc = m // L
            g = _pad_rows(gy[t0:t1], m)
            dC[t0:t1] = torch.bmm(g.unsqueeze(1), h).squeeze(1)[:n]
            adj = g.unsqueeze(-1) * _pad_rows(C[t0:t1], m).unsqueeze(1)  # g_t (x) C_t, then delta_t
            jc, ac = adj.view(nc, L, E, N), a.view(nc, L, E, N)
            for l in range(L - 2, -1, -1):
                jc[:, l].addcmul_(ac[:, l + 1], jc[:, l + 1])
            Q = ((cum[:, L - 1 :] - cum).unsqueeze(-1) * A).exp_()  # decay from l to the chunk end
            ends = torch.empty(nc, E, N, dtype=x.dtype, device=x.device)
            for c in reversed(range(nc)):
                ends[c] = carry
                carry = ac[c, 0] * torch.addcmul(jc[c, 0], Q[c, 0], carry)
            jc.addcmul_(Q, ends.unsqueeze(1))
            bx = dt[t0:t1] * x[t0:t1]
            dbx = torch.bmm(adj[:n], B[t0:t1].unsqueeze(-1)).squeeze(-1)  # dL/d(delta x)
            dB[t0:t1] = torch.bmm(bx.unsqueeze(1), adj[:n]).squeeze(1)
            # dL/d(log a_t) = delta_t a_t h_{t-1}
            w = adj.mul_(a)
            w[1:].mul_(h[:-1])
            w[0].mul_(starts[i])
            del a, h, Q
            dA += (w[:n] * dt[t0:t1].unsqueeze(-1)).sum(0)
            ddt[t0:t1] = (w[:n] * A).sum(-1) + dbx * x[t0:t1]
            dx[t0:t1] += dbx * dt[t0:t1]
        return dx, ddt, dA, dB, dC, dD, None, None


def selective_scan(x, dt, A, B, C, D, chunk=DEFAULT_CHUNK, tile=DEFAULT_TILE):
    return SelectiveScan.apply(x.contiguous(), dt.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
                               D, chunk, tile)


def sequential_scan(x, dt, A, B, C, D, chunk=None, tile=None):
    """The recurrence as written, one token at a time, through autograd (small T only)."""
    h = x.new_zeros(A.shape)
    ys = []
    for t in range(x.shape[0]):
        h = torch.exp(dt[t].unsqueeze(-1) * A) * h + torch.outer(dt[t] * x[t], B[t])
        ys.append(h @ C[t])
    return torch.stack(ys) + D * x


def masked_scan(x, dt, A, B, C, D, chunk=DEFAULT_CHUNK, tile=None):
    """The SSD-style masked form, for comparison only: y = sum_s M[t, s] (delta x)_s with an
    [L, L, E, N] decay per chunk, states carried between chunks (through autograd)."""
    T, E = x.shape
    N, L = A.shape[1], chunk
    pad = (-T) % L
    nc = (T + pad) // L
    dt_c = F.pad(dt, (0, 0, 0, pad)).view(nc, L, E)
    bx = F.pad(dt * x, (0, 0, 0, pad)).view(nc, L, E)
    B_c, C_c = F.pad(B, (0, 0, 0, pad)).view(nc, L, N), F.pad(C, (0, 0, 0, pad)).view(nc, L, N)
    cum = torch.cumsum(dt_c, dim=1).unsqueeze(-1) * A  # [nc, L, E, N], log of the decay from the chunk start
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril().view(1, L, L, 1, 1)
    diff = cum.unsqueeze(2) - cum.unsqueeze(1)  # [nc, t, s, E, N]
    decay = torch.exp(torch.where(causal, diff, torch.full_like(diff, -math.inf)))
    y = torch.einsum("ctsen,ctn,csn,cse->cte", decay, C_c, B_c, bx)
    to_end = torch.exp(cum[:, -1:] - cum) * (bx.unsqueeze(-1) * B_c.unsqueeze(2))  # [nc, L, E, N]
    chunk_state, chunk_decay = to_end.sum(1), torch.exp(cum[:, -1])
    h = x.new_zeros(E, N)
    starts = []
    for c in range(nc):
        starts.append(h)
        h = chunk_decay[c] * h + chunk_state[c]
    y = y + torch.einsum("cten,ctn,cen->cte", torch.exp(cum), C_c, torch.stack(starts))
    return y.reshape(nc * L, E)[:T] + D * x


SCANS = {"chunked": selective_scan, "sequential": sequential_scan, "masked": masked_scan}


# ---- the model ------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, d, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, dtype=dtype))

    def forward(self, x):
        return rms_norm(x, self.weight)


class Mamba(nn.Module):
    """ssmx::nn::Mamba<T, D, N, Expand, W, R>; submodule names give the checkpoint names."""

    def __init__(self, D, N, expand, W, R, dtype, scan="chunked", chunk=DEFAULT_CHUNK, tile=DEFAULT_TILE,
                 conv="shift"):
        super().__init__()
        E = expand * D
        self.D_model, self.N, self.E, self.W, self.R = D, N, E, W, R
        self.scan, self.chunk, self.tile, self.conv = SCANS[scan], chunk, tile, conv
        self.in_proj = nn.Linear(D, 2 * E, bias=False, dtype=dtype)
        self.conv1d = nn.Conv1d(E, E, W, groups=E, padding=W - 1, dtype=dtype)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False, dtype=dtype)
        self.dt_proj = nn.Linear(R, E, bias=True, dtype=dtype)
        self.A_log = nn.Parameter(torch.zeros(E, N, dtype=dtype))
        self.D = nn.Parameter(torch.ones(E, dtype=dtype))
        self.out_proj = nn.Linear(E, D, bias=False, dtype=dtype)

    def init_(self, gen):
        """ssmx's Mamba::init: uniform(+-1/sqrt(fan_in)) projections and convolution,
        dt_proj.weight uniform(+-R^-1/2), Delta's bias softplus^-1 of Delta log-uniform in
        [1e-3, 1e-1], A = -(1..N) per channel, D = 1."""
        def uniform(p, bound):
            p.copy_(torch.empty(p.shape, dtype=torch.float64).uniform_(-bound, bound, generator=gen))

        with torch.no_grad():
            uniform(self.in_proj.weight, 1 / math.sqrt(self.D_model))
            uniform(self.conv1d.weight, 1 / math.sqrt(self.W))
            uniform(self.conv1d.bias, 1 / math.sqrt(self.W))
            uniform(self.x_proj.weight, 1 / math.sqrt(self.E))
            uniform(self.dt_proj.weight, 1 / math.sqrt(self.R))
            uniform(self.out_proj.weight, 1 / math.sqrt(self.E))
            lo, hi = math.log(1e-3), math.log(1e-1)
            dt = torch.exp(torch.empty(self.E, dtype=torch.float64).uniform_(lo, hi, generator=gen)).clamp(min=1e-4)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.A_log.copy_(torch.log(torch.arange(1, self.N + 1, dtype=torch.float64)).expand(self.E, self.N))
            self.D.fill_(1.0)

    def causal_conv(self, x):  # x [T, E] -> [T, E]
        T, W = x.shape[0], self.W
        if self.conv == "torch":
            return F.conv1d(x.t().unsqueeze(0), self.conv1d.weight, self.conv1d.bias, padding=W - 1,
                            groups=self.E)[0, :, :T].t()
        xp = F.pad(x, (0, 0, W - 1, 0))  # out_t = bias + sum_j w_j x_{t-(W-1)+j}
        out = torch.addcmul(self.conv1d.bias, xp[:T], self.conv1d.weight[:, 0, 0])
        for j in range(1, W):
            out = torch.addcmul(out, xp[j:j + T], self.conv1d.weight[:, 0, j])
        return out

    def forward(self, u):  # u [T, D] -> [T, D]
        E, N, R = self.E, self.N, self.R
        x, z = F.linear(u, self.in_proj.weight).split([E, E], dim=-1)
        x = F.silu(self.causal_conv(x))
        d, B, C = F.linear(x, self.x_proj.weight).split([R, N, N], dim=-1)
        dt = softplus(F.linear(d, self.dt_proj.weight, self.dt_proj.bias))
        A = -torch.exp(self.A_log)
        y = self.scan(x, dt, A, B, C, self.D, chunk=self.chunk, tile=self.tile)
        return F.linear(y * F.silu(z), self.out_proj.weight)


    def step(self, u, conv, h):
        """One token per sequence: u [B, D]; conv [B, E, W-1] (the last W-1 inputs of the
        convolution) and h [B, E, N] are updated in place. mamba_ssm's step, in eager PyTorch."""
        E, N, R, W = self.E, self.N, self.R, self.W
        x, z = F.linear(u, self.in_proj.weight).split([E, E], dim=-1)
        window = torch.cat([conv, x.unsqueeze(-1)], dim=-1)  # [B, E, W]
        conv.copy_(window[:, :, 1:])
        x = F.silu(torch.einsum("bew,ew->be", window, self.conv1d.weight[:, 0, :]) + self.conv1d.bias)
        d, Bm, C = F.linear(x, self.x_proj.weight).split([R, N, N], dim=-1)
        dt = softplus(F.linear(d, self.dt_proj.weight, self.dt_proj.bias))
        A = -torch.exp(self.A_log)
        h.mul_(torch.exp(dt.unsqueeze(-1) * A)).add_((dt * x).unsqueeze(-1) * Bm.unsqueeze(1))
        y = torch.bmm(h, C.unsqueeze(-1)).squeeze(-1) + self.D * x
        return F.linear(y * F.silu(z), self.out_proj.weight)


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
    """ssmx::nn::Model<Mamba<dtype, D, N, expand, W, R>, K> with a tied head."""

    def __init__(self, D=256, N=16, expand=2, W=4, R=16, K=4, vocab=256, dtype=torch.float32, **mixer_options):
        super().__init__()
        self.D = D
        self.embedding = Embedding(vocab, D, dtype)
        self.layers = nn.ModuleList([Block(D, Mamba(D, N, expand, W, R, dtype, **mixer_options), dtype)
                                     for _ in range(K)])
        self.norm_f = RMSNorm(D, dtype)

    def init_(self, seed=0):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # embeddings ~ N(0, 1/D), as ssmx
            w = self.embedding.weight
            w.copy_(torch.randn(w.shape, generator=gen, dtype=torch.float64) / math.sqrt(self.D))
        for b in self.layers:
            b.mixer.init_(gen)
        return self

    def logits(self, inputs):
        y = self.embedding.weight[inputs]
        for b in self.layers:
            y = b(y)
        return rms_norm(y, self.norm_f.weight) @ self.embedding.weight.t()

    def forward(self, inputs, targets):
        """Summed cross-entropy of one sequence (inputs, targets: [T] int64)."""
        return F.cross_entropy(self.logits(inputs), targets, ignore_index=-1, reduction="sum")

    def decode_state(self, B):
        m = self.layers[0].mixer
        w = self.embedding.weight
        return [(w.new_zeros(B, m.E, m.W - 1), w.new_zeros(B, m.E, m.N)) for _ in self.layers]

    def step(self, tokens, states):
        """Logits [B, vocab] of the next token from one token per sequence (tokens [B])."""
        y = self.embedding.weight[tokens]
        for b, (conv, h) in zip(self.layers, states):
            y = y + b.mixer.step(b.norm(y), conv, h)
        return rms_norm(y, self.norm_f.weight) @ self.embedding.weight.t()


# ---- which BLAS -------------------------------------------------------------------------------


def blas_in_use(threads=None):
    """The BLAS library mapped into this process after a matrix product (PyTorch from Debian
    reports BLAS_INFO=generic and calls whatever libblas.so.3 resolves to), and its thread
    count; OpenBLAS's own pool is set to `threads`."""
    a = torch.ones(64, 64)
    (a @ a).sum().item()
    libs = []
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1]
            if re.search(r"(blas|mkl)[^/]*\.so", os.path.basename(path)) and path not in libs:
                libs.append(path)
    info = {"blas_libraries": libs, "torch_blas_info": "?"}
    for part in torch.__config__.show().replace(",", "\n").split("\n"):
        if "BLAS_INFO=" in part and "LAPACK" not in part:
            info["torch_blas_info"] = part.split("=", 1)[1].strip()
    openblas = next((p for p in libs if "libopenblas" in p), None)
    if openblas:
        lib = ctypes.CDLL(openblas)
        if threads:
            lib.openblas_set_num_threads(int(threads))
        info["blas"] = "openblas"
        info["blas_threads"] = lib.openblas_get_num_threads()
    elif any("/blas/libblas" in p for p in libs):
        info["blas"] = "reference"  # netlib: a crippled baseline; apt-get install libopenblas0-pthread
    else:
        info["blas"] = os.path.basename(libs[0]) if libs else "none"
    return info


# ---- benchmark --------------------------------------------------------------------------------


def time_training_step(model, step, x, tgt, runs, dev):
    """The best of `runs` timed forward + backward passes (seconds) and the last loss;
    CUDA work is synchronised around each, and the device's peak memory counted from here."""
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    best, loss = math.inf, None
    for _ in range(runs):
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        loss = step(x, tgt)
        loss.backward()
        if cuda:
            torch.cuda.synchronize(dev)
        best = min(best, time.perf_counter() - t0)
    return best, loss


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
    model = Model(args.D, args.N, args.expand, args.W, args.R, args.K, args.vocab, torch.float32, scan=args.scan,
                  chunk=args.chunk, tile=args.tile, conv=args.conv).init_(args.seed).to(dev)
    step = torch.compile(model) if args.compile else model

    for T in args.T:
        x, tgt = tokens(T, args.vocab)
        x, tgt = x.to(dev), tgt.to(dev)
        try:
            best, loss = time_training_step(model, step, x, tgt, args.warmup + args.repeats, dev)
        except torch.cuda.OutOfMemoryError:
            line = {"name": "pytorch_mamba_throughput", "kind": "oom", "T": T, "device": str(dev),
                    "compile": args.compile}
            print(json.dumps(line), flush=True)
            if out:
                out.write(json.dumps(line) + "\n")
            break
        line = {
            "name": "pytorch_mamba_throughput", "model": "mamba", "T": T, "batch": 1, "D": args.D, "N": args.N,
            "expand": args.expand, "W": args.W, "R": args.R, "K": args.K, "vocab": args.vocab, "dtype": "float32",
            "scan": args.scan, "scan_chunk": args.chunk, "scan_tile": args.tile, "conv": args.conv,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "blas": blas["blas"],
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


def bench_generate(args):
    """Tokens/s of the recurrent step for each --batch: every sequence steps through the
    shared token stream, --prompt tokens untimed, then --gen-tokens timed (the first a
    warm-up), as bench_generate does."""
    torch.set_num_threads(args.threads)
    blas = blas_in_use(args.threads)
    out = open(args.out, "w") if args.out else None
    model = Model(args.D, args.N, args.expand, args.W, args.R, args.K, args.vocab, torch.float32).init_(args.seed)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    x, _ = tokens(args.prompt + args.gen_tokens, args.vocab)
    with torch.no_grad():
        for B in args.batch:
            states = model.decode_state(B)
            for t in range(args.prompt + 1):
                model.step(x[t].expand(B), states)
            t0 = time.perf_counter()
            for t in range(args.prompt + 1, args.prompt + args.gen_tokens):
                model.step(x[t].expand(B), states)
            s = time.perf_counter() - t0
            steps = args.gen_tokens - 1
            line = {"name": "pytorch_mamba_generate", "batch": B, "prompt": args.prompt, "tokens": args.gen_tokens,
                    "D": args.D, "N": args.N, "expand": args.expand, "W": args.W, "R": args.R, "K": args.K,
                    "vocab": args.vocab, "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "blas": blas["blas"], "blas_threads": blas.get("blas_threads"), "seconds": s,
                    "tokens_per_s": B * steps / s, "ms_per_step": 1e3 * s / steps, "weight_bytes": weight_bytes,
                    "weight_gb_per_s": weight_bytes * steps / s / 1e9,
                    "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
            print(json.dumps(line), flush=True)
            if out:
                out.write(json.dumps(line) + "\n")
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


def _compare(name, ref, got, tol):
    (l0, g0), (l1, g1) = ref, got
    worst, worst_p = abs(l1 - l0) / abs(l0), "loss"
    for n in g0:
        e = _rel_err(g1[n], g0[n])
        if e > worst:
            worst, worst_p = e, n
    ok = worst <= tol
    print(f"{'ok  ' if ok else 'FAIL'} {name:<44} largest relative error {worst:.1e} ({worst_p})", flush=True)
    return ok


def read_safetensors(path):
    """name -> tensor for the F32/F64/I64/I32 tensors of a .safetensors file."""
    dtypes = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32}
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        data = bytearray(raw[8 + n + b:8 + n + e])
        out[name] = torch.frombuffer(data, dtype=dtypes[info["dtype"]]).view(info["shape"]).clone() \
            if e > b else torch.zeros(info["shape"], dtype=dtypes[info["dtype"]])
    return out


def check_fixture(directory, tol):
    """Loss and gradients of the Hugging Face-layout fixture written by
    tests/reference/mamba_reference.py (an independent slow-path model; ssmx's tests read
    the same files), recomputed in float64 from its float32 weights by the chunked scan."""
    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)
    weights = read_safetensors(os.path.join(directory, "model.safetensors"))
    ref = read_safetensors(os.path.join(directory, "reference.safetensors"))
    D, K = cfg["hidden_size"], cfg["num_hidden_layers"]
    ok = cfg["tie_word_embeddings"] and cfg["layer_norm_epsilon"] == NORM_EPS
    ok = ok and cfg["intermediate_size"] == cfg["expand"] * D
    if not ok:
        print(f"FAIL fixture {directory}: expected a tied head and eps {NORM_EPS}")
        return False
    model = Model(D, cfg["state_size"], cfg["expand"], cfg["conv_kernel"], cfg["time_step_rank"], K,
                  cfg["vocab_size"], torch.float64, chunk=4, tile=12)
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
    return _compare(f"fixture {os.path.basename(os.path.normpath(directory))} (chunk 4, tile 12)", want, got, tol)


def selftest(args):
    """The chunked scan against the sequential recurrence in float64 on a tiny model: loss
    and every gradient, for chunk/tile lengths that do and do not divide T; once with the
    default initialisation and once with strong decays (products of a underflow)."""
    torch.set_num_threads(args.threads)
    tol = 1e-10
    T, shape = 45, dict(D=8, N=4, expand=2, W=4, R=2, K=2, vocab=16, dtype=torch.float64)
    x, tgt = tokens(T, shape["vocab"])
    tgt[7] = tgt[-1] = -1  # ignored positions
    cases = [("chunked", 1, 7), ("chunked", 4, 12), ("chunked", 5, 13), ("chunked", 8, 45), ("chunked", 16, 512),
             ("chunked", 64, 64), ("masked", 4, None), ("masked", 7, None)]
    ok = True
    for strong in (False, True):
        models = {}
        for scan, chunk, tile in [("sequential", None, None)] + cases:
            m = Model(**shape, scan=scan, chunk=chunk or 1, tile=tile or 1, conv="torch" if scan == "sequential"
                      else "shift").init_(args.seed)
            if strong:  # Delta near 5: log a = -5..-20 per token
                with torch.no_grad():
                    for b in m.layers:
                        b.mixer.dt_proj.bias.fill_(5.0)
            models[(scan, chunk, tile)] = _loss_and_grads(m, [(x, tgt)])
        ref = models[("sequential", None, None)]
        for (scan, chunk, tile), got in models.items():
            if scan != "sequential":
                what = f"{scan} chunk {chunk}" + (f" tile {tile}" if tile else "") + (", strong decay" if strong else "")
                ok &= _compare(what, ref, got, tol)
    # The recurrent step against the parallel forward's logits at every position.
    m = Model(**shape).init_(args.seed)
    xs = torch.stack([x, (x * 3 + 1) % shape["vocab"]])  # two sequences
    with torch.no_grad():
        want = torch.stack([m.logits(xs[0]), m.logits(xs[1])], dim=1)  # [T, 2, V]
        states = m.decode_state(2)
        got = torch.stack([m.step(xs[:, t], states) for t in range(T)])
    err = _rel_err(got, want)
    print(f"{'ok  ' if err <= tol else 'FAIL'} recurrent step vs parallel logits: max rel err {err:.2e}")
    ok &= err <= tol
    fixture = args.fixture or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "data",
                                           "mamba_tiny")
    if os.path.isdir(fixture):
        ok &= check_fixture(fixture, tol)
    elif args.fixture:
        print(f"FAIL fixture directory {fixture} not found")
        ok = False
    print("PASS" if ok else "FAIL", flush=True)
    return 0 if ok else 1


def counts(s):
    out = []
    for v in s.split(","):
        v = v.strip()
        mult = {"K": 1024, "k": 1024, "M": 1 << 20, "m": 1 << 20}.get(v[-1:], 1)
        out.append(int(v[:-1] if mult > 1 else v) * mult)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="PyTorch reference of ssmx's Mamba model: forward+backward timing")
    p.add_argument("--T", type=counts, default=counts("1K,4K,16K"))
    p.add_argument("--D", type=int, default=256)
    p.add_argument("--N", type=int, default=16)
    p.add_argument("--expand", type=int, default=2)
    p.add_argument("--W", type=int, default=4)
    p.add_argument("--R", type=int, default=16)
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--scan", choices=["chunked", "masked"], default="chunked")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="scan chunk of the reference (not ssmx's)")
    p.add_argument("--tile", type=int, default=DEFAULT_TILE, help="tokens whose states exist at once (chunked scan)")
    p.add_argument("--conv", choices=["shift", "torch"], default="shift",
                   help="causal conv1d as W shifted multiply-adds, or torch's conv1d")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="timed steps per T; the fastest is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, or cuda")
    p.add_argument("--compile", action="store_true", help="time torch.compile(model) instead of eager")
    p.add_argument("--out")
    p.add_argument("--generate", action="store_true", help="time the recurrent step (generation) instead")
    p.add_argument("--batch", type=counts, default=counts("1,8"), help="with --generate: sequences stepped together")
    p.add_argument("--prompt", type=int, default=64, help="with --generate: untimed tokens stepped first")
    p.add_argument("--gen-tokens", type=int, default=128, help="with --generate: timed tokens (the first a warm-up)")
    p.add_argument("--selftest", action="store_true",
                   help="check the chunked scan against the sequential recurrence (float64) and the fixture")
    p.add_argument("--fixture", help="with --selftest: the tests/data/mamba_tiny directory (default: found "
                                     "beside this script)")
    args = p.parse_args(argv)
    if args.selftest:
        return selftest(args)
    if args.generate:
        bench_generate(args)
        return 0
    bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
