"""Draw the figures of docs/architecture.md from bcnp's own functions.

    pip install matplotlib      # for this script only; bcnp does not depend on it
    python tools/make_figures.py [--out docs]

Writes
  alibi.png               the 40 ALiBi slopes of Baichuan-13B and how each head's bias fades out older keys
                          (bcnp.forward.alibi_slopes, bcnp.forward.attention_bias)
  quantization_error.png  the error of int8 (Q8_0) and int4 (Q4_0) on Gaussian weights, next to float16's and
                          bfloat16's rounding (bcnp.quant.quantize / dequantize)
  memory.png              memory for Baichuan-13B's weights at each precision and for a full KV cache
                          (bcnp.inspect.inspect_model)
  norm_head.png           Baichuan2's NormHead on the tiny Baichuan2-13B fixture: lm_head's row norms as stored,
                          and the next-token distribution with and without it (bcnp.weights.norm_head, Model.logits)
The data are deterministic (seeded); the PNGs carry no timestamp, so rerunning changes nothing unless the code did.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bcnp.config import BAICHUAN_13B                              # noqa: E402
from bcnp.forward import alibi_slopes, attention_bias             # noqa: E402
from bcnp.inspect import inspect_model                            # noqa: E402
from bcnp.quant import dequantize, quantize                       # noqa: E402
from bcnp.weights import norm_head                                # noqa: E402

DPI = 100
SAVE = dict(dpi=DPI, metadata={"Software": None}, bbox_inches="tight")


def pyplot():
    try:
        import matplotlib
    except ImportError:
        sys.exit("error: tools/make_figures.py needs matplotlib: pip install matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt


# --- data ------------------------------------------------------------------------------------------------------

def alibi_data(config=BAICHUAN_13B, keys=None):
    """Slopes (nh,) and the bias of the newest query over all earlier keys: (nh, keys), distance 0 first."""
    keys = config.max_position if keys is None else keys
    slopes = np.array(alibi_slopes(config.num_attention_heads))
    positions = np.arange(keys)
    bias = attention_bias(np, config, positions[-1:], positions)[:, 0, ::-1]     # (nh, keys), newest key first
    return slopes, bias


def bfloat16_round(x):
    """float32 -> bfloat16 -> float32, round to nearest even (FORMATS.md)."""
    u = x.astype(np.float32).view(np.uint32)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)


def quantization_data(rows=256, cols=5120, std=0.02, seed=0):
    """Errors (x^ - x) / std of each format on Gaussian N(0, std^2) weights of a 13B-wide matrix."""
    w = (std * np.random.default_rng(seed).standard_normal((rows, cols))).astype(np.float32)
    errors = {"bfloat16": bfloat16_round(w) - w, "float16": w.astype(np.float16).astype(np.float32) - w}
    for bits in (8, 4):
        q, s = quantize(w, bits)
        errors[f"int{bits}"] = dequantize(q, s, bits) - w
    return {name: e / std for name, e in errors.items()}


# --- figures ---------------------------------------------------------------------------------------------------

def alibi_figure(plt, path):
    slopes, bias = alibi_data()
    nh, keys = bias.shape
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1, 1.4]})
    heads = np.arange(nh)
    left.bar(heads[:32], slopes[:32], color="tab:blue", label="heads 0-31: $2^{-0.25(h+1)}$")
    left.bar(heads[32:], slopes[32:], color="tab:orange", label="heads 32-39: 64-head slopes $2^{-0.125(2k+1)}$")
    left.set_yscale("log", base=2)
    left.set_xlabel("head h")
    left.set_ylabel("slope (log scale)")
    left.set_title("ALiBi slopes, 40 heads = 32 + 8")
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=1, frameon=False)

    # exp(bias) is the factor by which softmax weights a key d tokens back, relative to the current token.
    distance = np.arange(keys)
    image = right.pcolormesh(distance[1:], heads, np.exp(bias[:, 1:]), cmap="viridis", vmin=0, vmax=1,
                             shading="nearest", rasterized=True)
    right.set_xscale("log")
    right.invert_yaxis()
    right.set_xlabel("distance to the key, tokens back (log scale)")
    right.set_ylabel("head h")
    right.set_title("exp(-slope x d): weight left to a key d tokens back")
    fig.colorbar(image, ax=right, fraction=0.05, pad=0.02)
    fig.savefig(path, **SAVE)
    plt.close(fig)


def quantization_figure(plt, path):
    errors = quantization_data()
    colors = {"bfloat16": "tab:gray", "float16": "tab:green", "int8": "tab:blue", "int4": "tab:red"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.4), gridspec_kw={"width_ratios": [1.6, 1]})
    bins = np.linspace(-0.45, 0.45, 181)
    for name in ("int4", "int8", "bfloat16"):
        left.hist(errors[name].ravel(), bins=bins, histtype="step", color=colors[name], label=name, density=True)
    left.set_yscale("log")
    left.set_xlabel("error of a weight, in units of the weights' std")
    left.set_ylabel("density (log)")
    left.set_title("Rounding error on N(0, 0.02²) weights, 256 x 5120")
    left.legend(fontsize=8)

    names = ["bfloat16", "float16", "int8", "int4"]
    rms = [100 * np.sqrt(np.mean(errors[n] ** 2)) for n in names]
    bars = right.bar(names, rms, color=[colors[n] for n in names])
    right.set_yscale("log")
    right.set_ylabel("RMS error, % of the weights' RMS")
    right.set_title("RMS error by format")
    for bar, value in zip(bars, rms):
        right.annotate(f"{value:.2g}%", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom",
                       fontsize=8)
    fig.savefig(path, **SAVE)
    plt.close(fig)


def memory_figure(plt, path):
    report = inspect_model(BAICHUAN_13B)
    weights, kv = report["memory"]["weights"], report["memory"]["kv_cache"]
    rows = [("float32", weights["float32"]), ("bfloat16 / float16", weights["bfloat16"]),
            ("int8 (Q8_0)", weights["int8"]), ("int4 (Q4_0)", weights["int4"])]
    fig, ax = plt.subplots(figsize=(8, 2.6))
    y = np.arange(len(rows))[::-1]
    w_gb = np.array([r[1] for r in rows]) / 1e9
    kv_gb = kv["float16"] / 1e9
    ax.barh(y, w_gb, color="tab:blue", label="weights")
    ax.barh(y, kv_gb, left=w_gb, color="tab:orange",
            label=f"full KV cache, {kv['tokens']} tokens, float16 (the CPU keeps float32: {kv['float32'] / 1e9:.1f} GB)")
    for yi, a in zip(y, w_gb):
        ax.annotate(f"{a:.1f} + {kv_gb:.1f} GB", (a + kv_gb, yi), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.set_yticks(y, [r[0] for r in rows])
    ax.set_xlabel("GB (10^9 bytes)")
    ax.set_xlim(0, 1.2 * (w_gb.max() + kv_gb))
    ax.set_title("Baichuan-13B: memory for the weights and a full KV cache")
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, **SAVE)
    plt.close(fig)


def norm_head_data():
    """(stored row norms of lm_head, next-token probabilities with NormHead, without) on the Baichuan2 fixture."""
    from bcnp import Model
    fixture = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                           "b2-13-alibi-h8-l4-bf16")
    prompt = np.load(os.path.join(fixture, "golden.npz"))["prompt_2"]
    with_head = Model.from_pretrained(os.path.join(fixture, "hf"), family="baichuan2")
    without = Model.from_pretrained(os.path.join(fixture, "hf"), family="baichuan")   # the same files, read as v1
    stored = without.w["lm_head.weight"]
    assert np.allclose(norm_head(stored), with_head.w["lm_head.weight"])

    def probabilities(model):
        logits = model.logits(prompt)[-1].astype(np.float64)
        e = np.exp(logits - logits.max())
        return e / e.sum()
    return np.sqrt((stored.astype(np.float64) ** 2).sum(axis=1)), probabilities(with_head), probabilities(without)


def norm_head_figure(plt, path):
    norms, p_with, p_without = norm_head_data()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 2.8))
    left.plot(np.sort(norms)[::-1], color="tab:blue", label="stored")
    left.axhline(1.0, color="tab:orange", label="after NormHead: 1")
    left.set_xlabel("vocabulary rows of lm_head, largest norm first")
    left.set_ylabel("L2 norm of the row")
    left.set_yscale("log")
    left.legend(fontsize=8)
    left.set_title("Baichuan2 fixture: lm_head rows as stored")
    top = np.argsort(-p_with)[:10]
    x = np.arange(len(top))
    right.bar(x - 0.2, p_with[top], width=0.4, color="tab:orange", label="with NormHead (the original)")
    right.bar(x + 0.2, p_without[top], width=0.4, color="tab:blue", label="without")
    right.set_xticks(x, [str(t) for t in top], fontsize=7)
    right.set_xlabel("the 10 most likely next tokens (ids)")
    right.set_ylabel("probability")
    right.legend(fontsize=8)
    right.set_title("next token after prompt_2")
    fig.savefig(path, **SAVE)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs"))
    args = p.parse_args()
    plt = pyplot()
    os.makedirs(args.out, exist_ok=True)
    for name, draw in (("alibi.png", alibi_figure), ("quantization_error.png", quantization_figure),
                       ("memory.png", memory_figure), ("norm_head.png", norm_head_figure)):
        path = os.path.join(args.out, name)
        draw(plt, path + ".tmp.png")
        os.replace(path + ".tmp.png", path)                     # never a half-written figure
        print(f"wrote {os.path.normpath(path)} ({os.path.getsize(path):,} bytes)")


if __name__ == "__main__":
    main()
