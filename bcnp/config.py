"""Model configuration, read from a Hugging Face `config.json` of Baichuan-13B or Baichuan-7B.

The two models differ in one respect that matters to the forward pass: 13B (`BaichuanForCausalLM`) biases
attention with ALiBi and names its context `model_max_length`; 7B (`BaiChuanForCausalLM`) rotates q and k with
RoPE and names it `max_position_embeddings`.
"""
import dataclasses
import json
import os
from dataclasses import dataclass


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position: int                 # the context length: model_max_length (13B) / max_position_embeddings (7B)
    position_embedding: str           # "alibi" (13B) or "rope" (7B)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    torch_dtype: str = "float32"

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d, source="config.json"):
        archs = d.get("architectures") or []
        if "BaichuanForCausalLM" in archs or ("model_max_length" in d and "max_position_embeddings" not in d):
            position, max_position = "alibi", d.get("model_max_length")
        elif "BaiChuanForCausalLM" in archs or "max_position_embeddings" in d:
            position, max_position = "rope", d.get("max_position_embeddings")
        else:
            raise ConfigError(f"{source}: not a Baichuan config (architectures={archs!r}, "
                              "expected BaichuanForCausalLM (13B, ALiBi) or BaiChuanForCausalLM (7B, RoPE))")
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        missing = [k for k in required if not isinstance(d.get(k), int) or d[k] <= 0]
        if not isinstance(max_position, int) or max_position <= 0:
            missing.append("model_max_length" if position == "alibi" else "max_position_embeddings")
        if missing:
            raise ConfigError(f"{source}: missing or invalid positive integer field(s): {', '.join(missing)}")
        if d["hidden_size"] % d["num_attention_heads"]:
            raise ConfigError(f"{source}: hidden_size {d['hidden_size']} is not a multiple of "
                              f"num_attention_heads {d['num_attention_heads']}")
        if position == "rope" and (d["hidden_size"] // d["num_attention_heads"]) % 2:
            raise ConfigError(f"{source}: RoPE needs an even head_dim")
        if d.get("tie_word_embeddings"):
            raise ConfigError(f"{source}: tie_word_embeddings=true is not a Baichuan layout")
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: d[k] for k in names if k in d}
        return cls(**known, max_position=max_position, position_embedding=position)

    @classmethod
    def from_json(cls, path):
        path = config_path(path)
        return cls.from_dict(read_config_json(path), source=path)

    def to_hf_dict(self):
        """The config.json fields the original code reads."""
        d = {"architectures": ["BaichuanForCausalLM" if self.position_embedding == "alibi" else "BaiChuanForCausalLM"],
             "model_type": "baichuan", "hidden_act": "silu", "tie_word_embeddings": False,
             "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
             "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
             "num_attention_heads": self.num_attention_heads, "rms_norm_eps": self.rms_norm_eps,
             "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
             "pad_token_id": self.pad_token_id, "torch_dtype": self.torch_dtype}
        d["model_max_length" if self.position_embedding == "alibi" else "max_position_embeddings"] = self.max_position
        return d

    def weight_shapes(self):
        """Every tensor of the checkpoint with its shape as stored (out_features, in_features)."""
        V, H, I = self.vocab_size, self.hidden_size, self.intermediate_size
        shapes = {"model.embed_tokens.weight": (V, H)}
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (H,)
            shapes[p + "self_attn.W_pack.weight"] = (3 * H, H)
            shapes[p + "self_attn.o_proj.weight"] = (H, H)
            shapes[p + "post_attention_layernorm.weight"] = (H,)
            shapes[p + "mlp.gate_proj.weight"] = (I, H)
            shapes[p + "mlp.up_proj.weight"] = (I, H)
            shapes[p + "mlp.down_proj.weight"] = (H, I)
        shapes["model.norm.weight"] = (H,)
        shapes["lm_head.weight"] = (V, H)
        return shapes

    def num_parameters(self):
        n = 0
        for shape in self.weight_shapes().values():
            size = 1
            for s in shape:
                size *= s
            n += size
        return n


def config_path(path):
    path = os.fspath(path)
    return os.path.join(path, "config.json") if os.path.isdir(path) else path


def read_config_json(path):
    """The dict in config.json (`path`: the file or its directory), with a clear error when it is not there."""
    path = config_path(path)
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no config.json (is this a Baichuan model directory?)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


# The released models, for tests, benchmarks and `bcnp.inspect --preset`.
BAICHUAN_13B = Config(vocab_size=64000, hidden_size=5120, intermediate_size=13696, num_hidden_layers=40,
                      num_attention_heads=40, max_position=4096, position_embedding="alibi",
                      torch_dtype="bfloat16")
BAICHUAN_7B = Config(vocab_size=64000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, max_position=4096, position_embedding="rope",
                     torch_dtype="float16")
