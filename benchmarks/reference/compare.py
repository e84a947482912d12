"""Cross-check ssmx's loss and gradients against the PyTorch reference, in float64.

    build/benchmarks/bench_throughput --dump DIR      # ssmx: parameters, tokens, grads
    /usr/bin/python3 benchmarks/reference/compare.py DIR [--tol 1e-10] [--out FILE]

Loads the parameters ssmx wrote (raw little-endian float64 + manifest.json), runs the
reference model of diagonal_ssm.py on the same tokens, and for every strategy in the dump
prints the relative loss error and the largest relative gradient error over parameters,
    max_p  max_i |g_ssmx - g_torch| / max_i |g_torch|,
plus the largest element-wise error relative to max(|g_torch|, 1e-3 * max|g_torch|).
Exits 1 when an error exceeds --tol. Also checks that the reference's chunked scan agrees
with a plain sequential loop over time (independent of ssmx).
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import diagonal_ssm as ref  # noqa: E402


def load(path, dtype, shape=None):
    with open(path, "rb") as f:
        data = f.read()
    t = torch.frombuffer(bytearray(data), dtype=dtype).clone()
    return t.view(*shape) if shape is not None else t


def sequential_layer(m, u):
    """The recurrence as written, one token at a time (for small T only)."""
    a = torch.exp(-ref.softplus(u @ m.W_a + m.b_a))
    beta = u @ m.W_b + m.b_b
    c = u @ m.W_c + m.b_c
    h = torch.zeros(u.shape[1], m.N, dtype=u.dtype)
    ys = []
    for t in range(u.shape[0]):
        h = a[t] * h + torch.outer(u[t], beta[t])
        ys.append(h @ c[t] + m.D * u[t])
    return torch.stack(ys)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dump_dir")
    p.add_argument("--tol", type=float, default=1e-10)
    p.add_argument("--out", help="also append a JSON line per strategy to this file")
    args = p.parse_args(argv)
    d = args.dump_dir
    with open(os.path.join(d, "manifest.json")) as f:
        man = json.load(f)
    assert man["dtype"] == "float64" and man["endian"] == "little" and man["tie_embeddings"]
    torch.set_default_dtype(torch.float64)
    model = ref.Model(man["P"], man["N"], man["K"], man["vocab"], torch.float64)
    params = dict(model.named_parameters())
    names = [q["name"] for q in man["parameters"]]
    if sorted(names) != sorted(params):
        sys.exit(f"parameter names differ: ssmx {sorted(names)} vs reference {sorted(params)}")
    with torch.no_grad():
        for q in man["parameters"]:
            params[q["name"]].copy_(load(os.path.join(d, q["file"]), torch.float64, q["shape"]))
    x = load(os.path.join(d, man["inputs"]), torch.int32).long()
    tgt = load(os.path.join(d, man["targets"]), torch.int32).long()
    x_gen, tgt_gen = ref.tokens(man["T"], man["vocab"])
    assert torch.equal(x, x_gen) and torch.equal(tgt, tgt_gen), "token generators differ"

    # The reference's chunked scan against the sequential recurrence (first layer).
    with torch.no_grad():
        blk = model.layers[0]
        u = blk.norm(model.embedding.weight[x])
        scan_err = ((blk.mixer(u) - sequential_layer(blk.mixer, u)).abs().max() /
                    sequential_layer(blk.mixer, u).abs().max()).item()

    model.zero_grad()
    loss = model(x, tgt)
    loss.backward()
    g_ref = {n: params[n].grad.detach().clone() for n in names}
    print(f"reference: P={man['P']} N={man['N']} K={man['K']} vocab={man['vocab']} T={man['T']} float64, "
          f"loss={loss.item():.17g}; chunked vs sequential scan: {scan_err:.2e}")

    out = open(args.out, "a") if args.out else None
    worst = 0.0
    print(f"{'strategy':<24} {'loss rel err':>13} {'max rel grad err':>17} {'elementwise':>12}  worst parameter")
    for s in man["strategies"]:
        loss_err = abs(s["loss"] - loss.item()) / abs(loss.item())
        max_rel, max_elem, worst_p = 0.0, 0.0, ""
        for q in man["parameters"]:
            n = q["name"]
            g = load(os.path.join(d, s["grads"][n]), torch.float64, q["shape"])
            r = g_ref[n]
            scale = r.abs().max().item()
            diff = (g - r).abs()
            rel = diff.max().item() / scale if scale > 0 else diff.max().item()
            elem = (diff / torch.clamp(r.abs(), min=1e-3 * scale if scale > 0 else 1.0)).max().item()
            if rel > max_rel:
                max_rel, worst_p = rel, n
            max_elem = max(max_elem, elem)
        worst = max(worst, max_rel, loss_err)
        print(f"{s['name']:<24} {loss_err:13.2e} {max_rel:17.2e} {max_elem:12.2e}  {worst_p}")
        if out:
            out.write(json.dumps({"name": "gradient_check", "strategy": s["name"], "options": s["options"],
                                  "T": man["T"], "P": man["P"], "N": man["N"], "K": man["K"], "vocab": man["vocab"],
                                  "dtype": "float64", "loss_rel_err": loss_err, "max_rel_grad_err": max_rel,
                                  "max_elementwise_rel_err": max_elem, "worst_parameter": worst_p,
                                  "reference_scan_err": scan_err, "tol": args.tol}) + "\n")
    ok = worst <= args.tol and scan_err <= args.tol
    print(f"{'PASS' if ok else 'FAIL'}: largest relative error {worst:.2e} (tolerance {args.tol:.0e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
