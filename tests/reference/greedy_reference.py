#!/usr/bin/python3
"""Greedy continuation of a Mamba or Mamba-2 checkpoint by the independent PyTorch reference.

Loads a checkpoint directory written by mamba_reference.py or mamba2_reference.py (Hugging
Face or state-spaces layout: config.json, model.safetensors) with that module's own
safetensors reader and model, and continues a prompt greedily: at every step the whole
sequence so far runs through ``forward`` with the sequential scan (the recurrence one
token at a time) in float64, and the most probable next token (the lowest id on a tie) is
appended. Prints the continuation's ids, separated by spaces, on one line, as
``generate --ids`` does; the smallest gap between the two most probable logits goes to
stderr (a tie within float32 rounding would make the comparison meaningless).

usage: greedy_reference.py CHECKPOINT_DIR --prompt-ids 1,2,3 --max-tokens 24
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mamba_reference as ref  # noqa: E402
import mamba2_reference as ref2  # noqa: E402


def mamba2_config_of(c, tensors):
    """mamba2_reference's cfg dict for a Mamba-2 config.json `c`, or None for a Mamba-1 one."""
    if c.get("model_type") == "mamba2":  # Hugging Face Mamba2ForCausalLM
        return dict(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_hidden_layers=c["num_hidden_layers"],
                    state_size=c["state_size"], head_dim=c["head_dim"], expand=c["expand"], n_groups=c["n_groups"],
                    conv_kernel=c["conv_kernel"], layer_norm_epsilon=c["layer_norm_epsilon"],
                    time_step_limit=tuple(c.get("time_step_limit", ref2.NO_LIMIT)),
                    tie=c.get("tie_word_embeddings", True), layout="hf")
    s = c.get("ssm_cfg", {})
    if s.get("layer") != "Mamba2":
        return None
    return dict(vocab_size=tensors["backbone.embedding.weight"].shape[0], hidden_size=c["d_model"],
                num_hidden_layers=c["n_layer"], state_size=s["d_state"], head_dim=s["headdim"], expand=s["expand"],
                n_groups=s.get("ngroups", 1), conv_kernel=s.get("d_conv", 4), layer_norm_epsilon=1e-5,
                time_step_limit=tuple(s.get("dt_limit", ref2.NO_LIMIT)), tie=c.get("tie_embeddings", True), layout="ss")


def config_of(directory, tensors):
    """The reference's cfg dict for the checkpoint in `directory`."""
    with open(os.path.join(directory, "config.json")) as f:
        c = json.load(f)
    if "hidden_size" in c:  # Hugging Face MambaForCausalLM
        cfg = dict(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                   num_hidden_layers=c["num_hidden_layers"], state_size=c["state_size"], expand=c["expand"],
                   conv_kernel=c["conv_kernel"], time_step_rank=c["time_step_rank"],
                   layer_norm_epsilon=c["layer_norm_epsilon"], tie=c.get("tie_word_embeddings", True), layout="hf")
    else:  # state-spaces/mamba: the vocabulary padded, as the embedding is stored
        s = c["ssm_cfg"]
        cfg = dict(vocab_size=tensors["backbone.embedding.weight"].shape[0], hidden_size=c["d_model"],
                   num_hidden_layers=c["n_layer"], state_size=s["d_state"], expand=s["expand"],
                   conv_kernel=s["d_conv"], time_step_rank=s["dt_rank"], layer_norm_epsilon=1e-5,
                   tie=c.get("tie_embeddings", True), layout="ss")
    return cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--prompt-ids", required=True)
    ap.add_argument("--max-tokens", type=int, default=24)
    a = ap.parse_args()
    torch.set_num_threads(1)
    tensors, _ = ref.load_safetensors(os.path.join(a.checkpoint, "model.safetensors"))
    with open(os.path.join(a.checkpoint, "config.json")) as f:
        cfg2 = mamba2_config_of(json.load(f), tensors)
    if cfg2 is not None:
        cfg, forward = cfg2, (lambda p, x, cfg: ref2.forward(p, x, cfg, scan=ref2.ssd_sequential))
    else:
        cfg = config_of(a.checkpoint, tensors)
        forward = (lambda p, x, cfg: ref.forward(p, x, cfg, scan=ref.scan_sequential))
    p = {k: v.to(torch.float64) for k, v in tensors.items()}
    ids = [int(x) for x in a.prompt_ids.split(",")]
    out, gap = [], float("inf")
    with torch.no_grad():
        for _ in range(a.max_tokens):
            logits = forward(p, torch.tensor([ids], dtype=torch.int64), cfg)[0, -1]
            top = torch.topk(logits, 2)
            gap = min(gap, float(top.values[0] - top.values[1]))
            best = int(torch.nonzero(logits == logits.max())[0])  # the lowest id among equal maxima
            ids.append(best)
            out.append(best)
    print(" ".join(str(t) for t in out))
    print("smallest gap between the two most probable logits: %.3e" % gap, file=sys.stderr)


if __name__ == "__main__":
    main()
