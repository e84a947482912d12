"""PyTorch reference of the ssmx DiagonalSSM language model (the same math, the same names).

    embedding -> K blocks  y = y + DiagonalSSM(RMSNorm(y))  -> RMSNorm -> tied head
              -> cross-entropy summed over tokens (targets of -1 ignored)

    rms_norm(x) = x * rsqrt(mean(x^2, -1) + 1e-5) * w
    a_t = exp(-softplus(u_t W_a + b_a))         in (0,1)^N, shared by the P channels
    beta_t = u_t W_b + b_b,  c_t = u_t W_c + b_c   in R^N
    h_t = a_t (.) h_{t-1} + u_t (x) beta_t        in R^{P x N}, h_0 = 0
    y_t = h_t c_t + D (.) u_t                     in R^P

as in include/ssmx/nn/{diagonal_ssm,norm,model}.hpp. Parameter names follow ssmx
(embedding.weight, layers.{k}.norm.weight, layers.{k}.mixer.{W_a,b_a,W_b,b_b,W_c,b_c,D},
norm_f.weight); shapes too (W_* are [P, N]).

The scan. A loop over time is far too slow in Python for long T, so the recurrence is
evaluated chunk by chunk (chunks of L tokens, default 64), as in Mamba-2's SSD form, with
log a = -softplus(z) known exactly:

    A_t = sum_{j <= t in chunk} log a_j                 (cumulative, per chunk)
    h_t = exp(A_t) h_start + sum_{s <= t} exp(A_t - A_s) u_s (x) beta_s
    y_t = sum_s M[t, s] u_s  +  (c_t exp(A_t)) . h_start  +  D u_t,
    M[t, s] = sum_n c_t[n] exp(A_t[n] - A_s[n]) beta_s[n]   (s <= t, else 0)

and the state is carried between chunks by a short Python loop over T / L chunks. The
exponents A_t - A_s are <= 0 (no overflow; tiny terms underflow to 0 as the true products
do). Only the association of sums and products differs from the sequential scan: exact to
rounding (about 1e-15 relative in float64). The per-channel state h (T x P x N) is never
materialised: cost O(T L (N + P) + T P N).

Tokens shared with the C++ benchmarks: x_t = (7t + 3) mod vocab, target_t = x_{t+1}.

Timing (float32, --threads 2 by default):
    /usr/bin/python3 benchmarks/reference/diagonal_ssm.py --T 1024,4096 [--out FILE]
prints JSON lines {"name":"pytorch_throughput", "T", "tokens_per_s", ...}.
"""
import argparse
import json
import math
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

NORM_EPS = 1e-5


def tokens(T, vocab):
    """The shared token stream: inputs x_t = (7t + 3) mod vocab, targets x_{t+1}."""
    t = torch.arange(T, dtype=torch.int64)
    return (7 * t + 3) % vocab, (7 * (t + 1) + 3) % vocab


def rms_norm(x, w, eps=NORM_EPS):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def softplus(x):
    # log(1 + e^x) without a threshold (torch's F.softplus switches to x above 20);
    # logaddexp's gradient is exactly sigmoid(x), as in ssmx's functor.
    return torch.logaddexp(x, torch.zeros_like(x))


class RMSNorm(nn.Module):
    def __init__(self, d, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, dtype=dtype))

    def forward(self, x):
        return rms_norm(x, self.weight)


class DiagonalSSM(nn.Module):
    def __init__(self, P, N, dtype, chunk=64):
        super().__init__()
        self.P, self.N, self.chunk = P, N, chunk
        z = lambda *s: nn.Parameter(torch.zeros(*s, dtype=dtype))
        self.W_a, self.b_a = z(P, N), z(N)
        self.W_b, self.b_b = z(P, N), z(N)
        self.W_c, self.b_c = z(P, N), z(N)
        self.D = z(P)

    def init_(self, gen):
        """ssmx's initialisation scheme (not its random stream): W ~ N(0, 1/P) (W_a x 0.1),
        decay rates log-uniform in [1e-3, 1], b_b = b_c = 0, D = 1."""
        std = 1.0 / math.sqrt(self.P)
        with torch.no_grad():
            for w, s in ((self.W_a, 0.1), (self.W_b, 1.0), (self.W_c, 1.0)):
                w.copy_(torch.randn(w.shape, generator=gen, dtype=torch.float64) * std * s)
            rate = torch.exp(torch.empty(self.N, dtype=torch.float64).uniform_(math.log(1e-3), 0.0, generator=gen))
            self.b_a.copy_(torch.log(torch.expm1(rate)))
            self.b_b.zero_()
            self.b_c.zero_()
            self.D.fill_(1.0)

    def forward(self, u):  # u: [T, P] -> [T, P]
        T, P = u.shape
        L = self.chunk
        log_a = -softplus(u @ self.W_a + self.b_a)  # [T, N]
        beta = u @ self.W_b + self.b_b
        c = u @ self.W_c + self.b_c
        pad = (-T) % L
        if pad:  # trailing tokens with a = 1, beta = 0: no effect on the real ones
            log_a = F.pad(log_a, (0, 0, 0, pad))
            beta = F.pad(beta, (0, 0, 0, pad))
            c = F.pad(c, (0, 0, 0, pad))
            u_p = F.pad(u, (0, 0, 0, pad))
        else:
            u_p = u
        C = (T + pad) // L
        A = torch.cumsum(log_a.view(C, L, -1), dim=1)  # [C, L, N]
        beta, c, u_c = beta.view(C, L, -1), c.view(C, L, -1), u_p.view(C, L, P)
        # Intra-chunk: M[c, t, s] = sum_n c_t exp(A_t - A_s) beta_s, s <= t.
        diff = A.unsqueeze(2) - A.unsqueeze(1)  # [C, t, s, N]
        causal = torch.ones(L, L, dtype=torch.bool, device=u.device).tril().view(1, L, L, 1)
        decay = torch.exp(torch.where(causal, diff, torch.full_like(diff, -math.inf)))
        M = (c.unsqueeze(2) * decay * beta.unsqueeze(1)).sum(-1)  # [C, L, L]
        y = torch.bmm(M, u_c)  # [C, L, P]
        # Inter-chunk: the state at each chunk start, carried by a loop over chunks.
        to_end = torch.exp(A[:, -1:, :] - A) * beta  # [C, L, N]
        chunk_state = torch.bmm(u_c.transpose(1, 2), to_end)  # [C, P, N], state added by each chunk
        chunk_decay = torch.exp(A[:, -1, :])  # [C, N]
        starts = []
        h = torch.zeros(P, self.N, dtype=u.dtype, device=u.device)
        for i in range(C):
            starts.append(h)
            h = chunk_decay[i] * h + chunk_state[i]
        h_start = torch.stack(starts)  # [C, P, N]
        y = y + torch.bmm(c * torch.exp(A), h_start.transpose(1, 2))
        return y.reshape(C * L, P)[:T] + self.D * u


class Block(nn.Module):
    def __init__(self, P, N, dtype, chunk):
        super().__init__()
        self.norm = RMSNorm(P, dtype)
        self.mixer = DiagonalSSM(P, N, dtype, chunk)

    def forward(self, y):
        return y + self.mixer(self.norm(y))


class Embedding(nn.Module):
    def __init__(self, vocab, P, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab, P, dtype=dtype))


class Model(nn.Module):
    """ssmx::nn::Model<DiagonalSSM<dtype, P, N>, K> with a tied head."""

    def __init__(self, P, N, K, vocab, dtype=torch.float64, chunk=64):
        super().__init__()
        self.embedding = Embedding(vocab, P, dtype)
        self.layers = nn.ModuleList([Block(P, N, dtype, chunk) for _ in range(K)])
        self.norm_f = RMSNorm(P, dtype)

    def init_(self, seed=0):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.embedding.weight.copy_(torch.randn(self.embedding.weight.shape, generator=gen, dtype=torch.float64))
        for b in self.layers:
            b.mixer.init_(gen)
        return self

    def forward(self, inputs, targets):
        """Summed cross-entropy of one sequence (inputs, targets: [T] int64)."""
        y = self.embedding.weight[inputs]
        for b in self.layers:
            y = b(y)
        logits = rms_norm(y, self.norm_f.weight) @ self.embedding.weight.t()
        return F.cross_entropy(logits, targets, ignore_index=-1, reduction="sum")


def bench(args):
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    out = open(args.out, "w") if args.out else None
    model = Model(args.P, args.N, args.K, args.vocab, torch.float32, args.chunk).init_(args.seed).to(dev)
    step = torch.compile(model) if args.compile else model

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    for T in args.T:
        x, tgt = tokens(T, args.vocab)
        x, tgt = x.to(dev), tgt.to(dev)
        best = math.inf
        loss = None
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            for _ in range(args.warmup + args.repeats):
                model.zero_grad(set_to_none=True)
                sync()
                t0 = time.perf_counter()
                loss = step(x, tgt)
                loss.backward()
                sync()
                best = min(best, time.perf_counter() - t0)
        except torch.cuda.OutOfMemoryError:
            line = {"name": "pytorch_throughput", "kind": "oom", "T": T, "device": str(dev), "compile": args.compile}
            print(json.dumps(line), flush=True)
            if out:
                out.write(json.dumps(line) + "\n")
            break
        line = {
            "name": "pytorch_throughput", "T": T, "batch": 1, "P": args.P, "N": args.N, "K": args.K,
            "vocab": args.vocab, "dtype": "float32", "scan_chunk": args.chunk, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
            "compile": args.compile, "seconds": best, "tokens_per_s": T / best,
            "us_per_token": 1e6 * best / T, "loss": float(loss),
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        if cuda:
            line["peak_device_bytes"] = torch.cuda.max_memory_allocated(dev)
        s = json.dumps(line)
        print(s, flush=True)
        if out:
            out.write(s + "\n")
            out.flush()


def counts(s):
    out = []
    for v in s.split(","):
        v = v.strip()
        mult = {"K": 1024, "k": 1024, "M": 1 << 20, "m": 1 << 20}.get(v[-1:], 1)
        out.append(int(v[:-1] if mult > 1 else v) * mult)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="PyTorch reference of ssmx's DiagonalSSM model: forward+backward timing")
    p.add_argument("--T", type=counts, default=counts("1K,4K,16K"))
    p.add_argument("--P", type=int, default=256)
    p.add_argument("--N", type=int, default=16)
    p.add_argument("--K", type=int, default=8)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--chunk", type=int, default=64, help="scan chunk of the reference (not ssmx's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="timed steps per T; the fastest is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU benchmark (benchmarks/run_gpu.sh)")
    p.add_argument("--compile", action="store_true", help="time torch.compile(model) instead of eager")
    p.add_argument("--out")
    bench(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
