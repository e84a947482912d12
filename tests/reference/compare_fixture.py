#!/usr/bin/env python3
"""Compare a freshly generated Mamba fixture directory with the one checked in.

Weights and configs are drawn from a seeded generator, so they must match byte for byte.
The reference outputs (reference.safetensors: logits, loss, gradients in float64) go
through the BLAS PyTorch was linked against; OpenBLAS and the reference BLAS round the
last bits differently, so those tensors are compared element-wise with a tolerance of
1e-12 relative to the tensor's largest magnitude. Names, dtypes and shapes must agree
exactly everywhere.

usage: compare_fixture.py GENERATED CHECKED_IN [--rtol R]
"""
import argparse
import array
import json
import os
import struct
import sys

FORMATS = {"F64": "d", "F32": "f"}


def read_safetensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    header.pop("__metadata__", None)
    data = blob[8 + n:]
    out = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        out[name] = (entry["dtype"], tuple(entry["shape"]), data[begin:end])
    return out


def compare_reference(gen, ref, rtol):
    a, b = read_safetensors(gen), read_safetensors(ref)
    problems = []
    if sorted(a) != sorted(b):
        problems.append(f"tensor names differ: {sorted(set(a) ^ set(b))}")
        return problems, 0.0
    worst = 0.0
    for name in sorted(a):
        (da, sa, ba), (db, sb, bb) = a[name], b[name]
        if da != db or sa != sb:
            problems.append(f"{name}: {da}{list(sa)} vs {db}{list(sb)}")
            continue
        if ba == bb:
            continue
        if da not in FORMATS:
            problems.append(f"{name}: {da} bytes differ (compared exactly)")
            continue
        xa, xb = array.array(FORMATS[da]), array.array(FORMATS[da])
        xa.frombytes(ba)
        xb.frombytes(bb)
        scale = max(1e-300, max(abs(v) for v in xb))
        err = max(abs(p - q) for p, q in zip(xa, xb)) / scale
        worst = max(worst, err)
        if not err <= rtol:
            problems.append(f"{name}: max |diff| / max |ref| = {err:.3e} > {rtol:.1e}")
    return problems, worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("generated")
    parser.add_argument("checked_in")
    parser.add_argument("--rtol", type=float, default=1e-12)
    args = parser.parse_args()

    names_gen = sorted(os.listdir(args.generated))
    names_ref = sorted(os.listdir(args.checked_in))
    problems = []
    if names_gen != names_ref:
        problems.append(f"files differ: generated {names_gen}, checked in {names_ref}")
    worst = 0.0
    for name in sorted(set(names_gen) & set(names_ref)):
        gen = os.path.join(args.generated, name)
        ref = os.path.join(args.checked_in, name)
        if name == "reference.safetensors":
            found, err = compare_reference(gen, ref, args.rtol)
            problems += [f"{name}: {p}" for p in found]
            worst = max(worst, err)
        else:
            with open(gen, "rb") as f, open(ref, "rb") as g:
                if f.read() != g.read():
                    problems.append(f"{name}: bytes differ (weights and configs must match exactly)")
    if problems:
        print(f"fixture {args.checked_in} does not match {args.generated}:")
        for p in problems:
            print("  " + p)
        return 1
    print(f"fixture {args.checked_in} matches (reference outputs within {worst:.2e} relative)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
