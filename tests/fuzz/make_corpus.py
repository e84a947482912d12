#!/usr/bin/python3
"""Writes the fuzz targets' seed corpora (tests/fuzz/corpus/{safetensors,config}).

Small, hand-laid files: valid ones of every dtype and layout, and one of each kind of
defect the readers must refuse, so that fuzzing starts next to every check. Output is
deterministic; run it again after changing it and commit the result.
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def st(header, data=b"", raw=None):
    h = raw if raw is not None else json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((-len(h)) % 8)
    return struct.pack("<Q", len(h)) + h + data


def f32(*xs):
    return b"".join(struct.pack("<f", x) for x in xs)


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def safetensors_seeds():
    ab = {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2, 2], 8, 24)}
    data = f32(1, 2, 3, 4, 5, 6)
    seeds = {
        "good.safetensors": st(dict(ab, __metadata__={"format": "pt"}), data),
        "empty.safetensors": st({}),
        "metadata_only.safetensors": st({"__metadata__": {"format": "pt", "note": "x"}}),
        "null_metadata.safetensors": st({"__metadata__": None}),
        "dtypes.safetensors": st({
            "f64": entry("F64", [1], 0, 8), "i64": entry("I64", [1], 8, 16), "u64": entry("U64", [1], 16, 24),
            "f16": entry("F16", [2], 24, 28), "bf16": entry("BF16", [2], 28, 32), "i32": entry("I32", [1], 32, 36),
            "u8": entry("U8", [2], 36, 38), "bool": entry("BOOL", [1], 38, 39), "i8": entry("I8", [1], 39, 40),
            "scalar": entry("F32", [], 40, 44), "none": entry("F32", [0, 3], 44, 44),
            "rank5": entry("F32", [1, 1, 1, 1, 1], 44, 48)},
            struct.pack("<d", 0.5) + struct.pack("<q", -3) + struct.pack("<Q", 2**63 + 1)
            + b"\x00\x3c\x80\x3f" + b"\x80\x3f\x00\x40" + struct.pack("<i", 7) + b"\x01\x02" + b"\x01" + b"\xff"
            + f32(2.5) + f32(9)),
        "nonfinite.safetensors": st({"a": entry("F32", [2], 0, 8)}, f32(float("nan"), float("inf"))),
        "checkpoint.safetensors": st({
            "__metadata__": {"format": "ssmx.checkpoint", "format_version": "1", "step": "3", "optim.kind": "none"},
            "param/a": entry("F32", [2], 0, 8)}, f32(1, 2)),
        "duplicate.safetensors": st(None, data, raw=b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                                    b'"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}'),
        "hole.safetensors": st({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 12, 20)}, data[:20]),
        "trailing.safetensors": st(ab, data + b"tail"),
        "overlap.safetensors": st({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, data[:12]),
        "nul_padding.safetensors": struct.pack("<Q", 10) + b'{"x":1}\x00\x00\x00',
        "big_extent.safetensors": st(None, raw=b'{"a":{"dtype":"F32","shape":[0,9223372036854775808],'
                                     b'"data_offsets":[0,0]}}'),
        "overflow.safetensors": st(None, raw=b'{"a":{"dtype":"F32","shape":[1e400],"data_offsets":[0,4]}}'),
        "nested.safetensors": st(None, raw=b'{"__metadata__":{"x":' + b"[" * 20 + b"1" + b"]" * 20 + b"}}"),
        "bad_utf8.safetensors": st(None, raw=b'{"a\xff":{}}'),
        "short.safetensors": b"\x10\x00\x00",
    }
    return seeds


def read(fixture):
    with open(os.path.join(HERE, "..", "data", fixture, "config.json"), "rb") as f:
        return f.read()


def config_seeds():
    hf = json.load(open(os.path.join(HERE, "..", "data", "mamba_tiny", "config.json")))
    ss = json.load(open(os.path.join(HERE, "..", "data", "mamba_untied_ss", "config.json")))
    seeds = {
        "hf.json": json.dumps(hf, indent=2).encode(),
        "hf_untied.json": json.dumps(dict(hf, tie_word_embeddings=False), indent=2).encode(),
        "hf_auto_rank.json": json.dumps(dict(hf, time_step_rank="auto")).encode(),
        "state_spaces.json": json.dumps(ss, indent=2).encode(),
        "index.json": json.dumps({"metadata": {"total_size": 8}, "weight_map": {"a": "a.safetensors"}}).encode(),
        "index_missing.json": json.dumps({"weight_map": {"a": "a.safetensors", "b": "b.safetensors"}}).encode(),
        "duplicate.json": b'{"hidden_size": 16, "hidden_size": 32, "vocab_size": 32}',
        "overflow.json": b'{"hidden_size": 16, "layer_norm_epsilon": 1e400}',
        "nested.json": b'{"d_model": 16, "ssm_cfg": {"x": ' + b"[" * 30 + b"]" * 30 + b"}}",
        "eps_zero.json": json.dumps(dict(hf, layer_norm_epsilon=0)).encode(),
        "bad_utf8.json": b'{"hidden_size": 16, "name": "caf\xc3\x28"}',
        # Mamba-2, as the fixtures have them (Python's Infinity in time_step_limit), and the
        # other non-finite words.
        "hf_mamba2.json": read("mamba2_tiny"),
        "hf_mamba2_groups.json": read("mamba2_groups"),
        "state_spaces_mamba2.json": read("mamba2_ss"),
        "nonfinite.json": b'{"model_type": "mamba2", "hidden_size": 16, "time_step_limit": [-Infinity, NaN], "x": "Infinity"}',
    }
    return seeds


def write(dirname, seeds):
    out = os.path.join(HERE, "corpus", dirname)
    os.makedirs(out, exist_ok=True)
    for name, data in sorted(seeds.items()):
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    write("safetensors", safetensors_seeds())
    write("config", config_seeds())
