"""How far bcnp's RoPE model is from torch's float32 at long positions (Baichuan-7B / Baichuan2-7B widths).

    python tools/rope_vs_torch.py bcnp   # writes /tmp/rope/{w,ids,bcnp}.npz/.npy with bcnp (2 layers, 4096 tokens)
    python tools/rope_vs_torch.py torch  # in an environment with torch (pip install torch; not a bcnp dependency)

The torch side is the original's arithmetic written out (its RoPE table `1 / 10000 ** (arange(0, hd, 2) / hd)`,
its einsum/cos/sin cache, rotate_half, softmax over a finfo.min causal mask), not its remote code. Measured
2026-12-01, 2 threads: scaled logit error 1.7e-6 at position 0, 2.8e-6 at 511, 2.5e-6 at 2047, 2.7e-6 at 4095
(bcnp 49 s, torch 36 s); it does not grow with the position now that bcnp's table is torch's bit for bit.
"""
import math
import os
import sys
import time

import numpy as np

OUT, POSITIONS, T = "/tmp/rope", [0, 511, 2047, 4095], 4096


def run_bcnp():
    import dataclasses
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from bcnp.config import BAICHUAN2_7B
    from bcnp import Model
    from bcnp.weights import random_weights
    config = dataclasses.replace(BAICHUAN2_7B, num_hidden_layers=2, vocab_size=1024)
    w = random_weights(config, seed=0)          # a plain dict: lm_head as given, no NormHead on either side
    ids = np.random.default_rng(1).integers(0, config.vocab_size, T)
    os.makedirs(OUT, exist_ok=True)
    np.savez(f"{OUT}/w.npz", **w)
    np.save(f"{OUT}/ids.npy", ids)
    start = time.time()
    np.save(f"{OUT}/bcnp.npy", Model(config, w).logits(ids)[POSITIONS])
    print(f"bcnp: {time.time() - start:.0f} s")


def run_torch():
    import torch
    w = {k: torch.from_numpy(v) for k, v in np.load(f"{OUT}/w.npz").items()}
    ids = torch.from_numpy(np.load(f"{OUT}/ids.npy"))
    H, nh, layers, eps = 4096, 32, 2, 1e-6
    hd = H // nh

    def rms(x, g):
        return g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rotate_half(x):
        return torch.cat((-x[..., hd // 2:], x[..., : hd // 2]), -1)

    inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    emb = torch.cat([torch.einsum("i,j->ij", torch.arange(T, dtype=torch.float32), inv_freq)] * 2, -1)
    cos, sin = emb.cos()[None], emb.sin()[None]
    mask = torch.full((T, T), torch.finfo(torch.float32).min).triu(1)
    start = time.time()
    with torch.no_grad():
        x = w["model.embed_tokens.weight"][ids]
        for i in range(layers):
            p = f"model.layers.{i}."
            qkv = rms(x, w[p + "input_layernorm.weight"]) @ w[p + "self_attn.W_pack.weight"].T
            q, k, v = (qkv[:, j * H:(j + 1) * H].view(T, nh, hd).transpose(0, 1) for j in range(3))
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd) + mask, -1) @ v
            x = x + a.transpose(0, 1).reshape(T, H) @ w[p + "self_attn.o_proj.weight"].T
            h = rms(x, w[p + "post_attention_layernorm.weight"])
            mlp = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
            x = x + mlp @ w[p + "mlp.down_proj.weight"].T
        logits = (rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T)[POSITIONS].numpy()
    print(f"torch: {time.time() - start:.0f} s")
    ours = np.load(f"{OUT}/bcnp.npy")
    for row, position in enumerate(POSITIONS):
        error = np.abs(ours[row] - logits[row]).max() / max(1.0, np.abs(logits[row]).max())
        print(f"position {position}: scaled logit error {error:.2g}")


if __name__ == "__main__":
    {"bcnp": run_bcnp, "torch": run_torch}[sys.argv[1] if len(sys.argv) > 1 else "bcnp"]()
