"""Model configuration, read from a Hugging Face `config.json` of Baichuan-13B / 7B or Baichuan2-13B / 7B.

The sizes differ in one respect that matters to the forward pass: 13B (`BaichuanForCausalLM`) biases
attention with ALiBi and names its context `model_max_length`; 7B (`BaiChuanForCausalLM`) rotates q and k with
RoPE and names it `max_position_embeddings`. The family differs in one more: Baichuan2 normalises the rows of
lm_head (NormHead). Nothing in Baichuan2's config.json says so and both its sizes are `BaichuanForCausalLM`:
its vocabulary of 125,696 tells the family (as in vLLM), and its 7B is the one with `max_position_embeddings`
(Baichuan2-7B's config.json has both context fields, 13B's only `model_max_length`). `family=` overrides the
vocabulary rule (tiny test models), and bcnp.convert records the family in the `bcnp` section.

`Config.from_dict` checks the type and range of every field bcnp uses, so a directory that opens is one that
runs: inspect, convert and generate all read a config through it, and a hostile config.json cannot make bcnp
build anything huge (10^7 layers, a 10^12-token cache) before a single file has been checked.
"""
import math
import numbers
import os
from dataclasses import dataclass

from .errors import read_json_object


class ConfigError(ValueError):
    pass


ARCHITECTURES = {"BaichuanForCausalLM": "alibi", "BaiChuanForCausalLM": "rope"}   # 13B, 7B
DTYPES = ("float32", "float16", "bfloat16")
FAMILIES = ("baichuan", "baichuan2")
BAICHUAN2_VOCAB = 125696

# Sane maxima, so that nothing bcnp builds from a config (the table of weight shapes, the KV cache) can be huge.
# The largest released models stay far below them: Llama-3.1-405B has 126 layers, 128 heads, hidden 16384 and
# intermediate 53248; the largest vocabularies are ~256k (Gemma); the longest contexts 2^20 tokens. Baichuan-13B:
# 40 layers, 40 heads, 5120 / 13696, vocab 64000, 4096 tokens.
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_WIDTH = 2**17              # hidden_size and intermediate_size
MAX_VOCAB = 2**22
MAX_CONTEXT = 2**20
# config.json and generation_config.json are ~1 kB; 1 MiB is far beyond any real one and bounds what is parsed
# (read_json checks the size before reading, so the bound costs no memory).
MAX_CONFIG_BYTES = 2**20


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
    family: str = "baichuan"          # "baichuan2": lm_head rows are normalised (NormHead)
    rope_inv_freq: tuple = None       # the checkpoint's own RoPE table (float32 values), if it stores one

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d, source="config.json", family=None):
        """The Config of config.json's dict `d` (unknown keys ignored); ConfigError naming `source` and the
        field for anything bcnp would later trip over. `family` ("baichuan" or "baichuan2") overrides the one
        the bcnp section records or the vocabulary implies."""
        field = FieldChecker(d, source)
        family = model_family(d, source, family)
        position = position_embedding(d, source, family)
        context_field = "model_max_length" if position == "alibi" else "max_position_embeddings"
        sizes = dict(vocab_size=field.integer("vocab_size", 1, MAX_VOCAB),
                     hidden_size=field.integer("hidden_size", 1, MAX_WIDTH),
                     intermediate_size=field.integer("intermediate_size", 1, MAX_WIDTH),
                     num_hidden_layers=field.integer("num_hidden_layers", 1, MAX_LAYERS),
                     num_attention_heads=field.integer("num_attention_heads", 1, MAX_HEADS),
                     max_position=field.integer(context_field, 1, MAX_CONTEXT))
        if sizes["hidden_size"] % sizes["num_attention_heads"]:
            raise ConfigError(f"{source}: hidden_size {sizes['hidden_size']} is not a multiple of "
                              f"num_attention_heads {sizes['num_attention_heads']}")
        if position == "rope" and (sizes["hidden_size"] // sizes["num_attention_heads"]) % 2:
            raise ConfigError(f"{source}: RoPE needs an even head_dim (hidden_size / num_attention_heads)")
        if field.boolean("tie_word_embeddings", default=False):
            raise ConfigError(f"{source}: tie_word_embeddings=true is not a Baichuan layout (it has a separate "
                              "lm_head)")
        if field.string("hidden_act", default="silu") != "silu":
            raise ConfigError(f"{source}: hidden_act must be \"silu\" (Baichuan's SwiGLU), got {d['hidden_act']!r:.60}")
        vocab = sizes["vocab_size"]
        return cls(**sizes, position_embedding=position,
                   rms_norm_eps=field.real("rms_norm_eps", 0.0, 1.0, default=cls.rms_norm_eps),
                   rope_theta=field.real("rope_theta", 0.0, math.inf, default=cls.rope_theta),
                   bos_token_id=field.token_id("bos_token_id", vocab, default=cls.bos_token_id),
                   eos_token_id=field.token_id("eos_token_id", vocab, default=cls.eos_token_id),
                   pad_token_id=field.token_id("pad_token_id", vocab, default=cls.pad_token_id),
                   torch_dtype=field.choice("torch_dtype", DTYPES, default=cls.torch_dtype), family=family,
                   rope_inv_freq=recorded_rope_table(d, source, sizes, position))

    @classmethod
    def from_json(cls, path, family=None):
        path = config_path(path)
        return cls.from_dict(read_config_json(path), source=path, family=family)

    def to_hf_dict(self):
        """The config.json fields the original code reads (a tiny Baichuan2 needs `family=` to be read back)."""
        alibi_or_v2 = self.position_embedding == "alibi" or self.family == "baichuan2"
        d = {"architectures": ["BaichuanForCausalLM" if alibi_or_v2 else "BaiChuanForCausalLM"],
             "model_type": "baichuan", "hidden_act": "silu", "tie_word_embeddings": False,
             "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
             "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
             "num_attention_heads": self.num_attention_heads, "rms_norm_eps": self.rms_norm_eps,
             "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
             "pad_token_id": self.pad_token_id, "torch_dtype": self.torch_dtype}
        d["model_max_length" if self.position_embedding == "alibi" else "max_position_embeddings"] = self.max_position
        if self.family == "baichuan2" and self.position_embedding == "rope":
            d["model_max_length"] = self.max_position          # as Baichuan2-7B's config.json
        if self.position_embedding == "rope" and self.rope_theta != 10000.0:
            d["rope_theta"] = self.rope_theta
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


def model_family(d, source, override=None):
    """"baichuan2" or "baichuan": `override` if given, else what bcnp.convert recorded, else the vocabulary's."""
    if override is not None:
        if override not in FAMILIES:
            raise ConfigError(f"family must be one of {', '.join(FAMILIES)}, got {override!r:.60}")
        return override
    recorded = d.get("bcnp", {}).get("family") if isinstance(d.get("bcnp"), dict) else None
    if recorded is not None:
        if recorded not in FAMILIES:
            raise ConfigError(f"{source}: bcnp.family must be one of {', '.join(FAMILIES)}, got {recorded!r:.60}")
        return recorded
    return "baichuan2" if d.get("vocab_size") == BAICHUAN2_VOCAB else "baichuan"


def recorded_rope_table(d, source, sizes, position):
    """The RoPE table bcnp.convert recorded from the source's `rotary_emb.inv_freq` (bcnp.rope_inv_freq), or None."""
    section = d.get("bcnp")
    table = section.get("rope_inv_freq") if isinstance(section, dict) else None
    if table is None:
        return None
    half = sizes["hidden_size"] // sizes["num_attention_heads"] // 2
    if not (position == "rope" and isinstance(table, list) and len(table) == half
            and all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in table)):
        raise ConfigError(f"{source}: bcnp.rope_inv_freq must be a list of head_dim / 2 = {half} positive numbers "
                          "(a RoPE model's table)")
    return tuple(table)


def position_embedding(d, source, family="baichuan"):
    """"alibi" (13B) or "rope" (7B), from `architectures` (or, without it, the name of the context field).
    Both Baichuan2 sizes are `BaichuanForCausalLM`: its 7B is the one with `max_position_embeddings`."""
    model_type = d.get("model_type", "baichuan")
    if model_type != "baichuan":
        raise ConfigError(f"{source}: model_type is {model_type!r:.60}, not \"baichuan\": not a Baichuan model")
    if "architectures" in d:
        archs = d["architectures"]
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ConfigError(f"{source}: architectures must be a list of strings, got {archs!r:.60}")
        known = [ARCHITECTURES[a] for a in archs if a in ARCHITECTURES]
        if len(known) != 1:
            raise ConfigError(f"{source}: not a Baichuan config (architectures={archs!r:.100}, expected "
                              "[\"BaichuanForCausalLM\"] (13B, ALiBi) or [\"BaiChuanForCausalLM\"] (7B, RoPE))")
        if family == "baichuan2" and known[0] == "alibi" and "max_position_embeddings" in d:
            return "rope"
        return known[0]
    if "model_type" in d and ("model_max_length" in d) != ("max_position_embeddings" in d):
        return "alibi" if "model_max_length" in d else "rope"
    if "model_type" in d and family == "baichuan2" and "max_position_embeddings" in d:
        return "rope"                  # Baichuan2-7B's config names both context fields, 13B's only one
    raise ConfigError(f"{source}: not a Baichuan config (no architectures field; expected [\"BaichuanForCausalLM\"] "
                      "(13B, ALiBi) or [\"BaiChuanForCausalLM\"] (7B, RoPE))")


class FieldChecker:
    """Typed reads of config.json's fields, each a ConfigError naming the file and the field when wrong.
    JSON's true/false are Python bools, which are ints: they are refused where a number is expected."""

    def __init__(self, d, source):
        self.d, self.source = d, source

    def fail(self, name, expected):
        value = self.d.get(name)
        raise ConfigError(f"{self.source}: {name} must be {expected}, got {value!r:.60}"
                          + ("" if name in self.d else " (missing)"))

    def integer(self, name, low, high, default=None):
        value = self.d.get(name, default)
        if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
            self.fail(name, f"an integer in [{low}, {high}]")
        return value

    def token_id(self, name, vocab_size, default):
        return self.integer(name, 0, vocab_size - 1, default)

    def real(self, name, low, high, default):
        """A finite number in the open interval (low, high)."""
        value = self.d.get(name, default)
        if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
                and low < value < high):
            self.fail(name, f"a finite number in ({low:g}, {high:g})")
        return float(value)

    def boolean(self, name, default):
        value = self.d.get(name, default)
        if not isinstance(value, bool):
            self.fail(name, "true or false")
        return value

    def string(self, name, default):
        value = self.d.get(name, default)
        if not isinstance(value, str):
            self.fail(name, "a string")
        return value

    def choice(self, name, choices, default):
        value = self.d.get(name, default)
        if value not in choices or not isinstance(value, str):
            self.fail(name, "one of " + ", ".join(choices))
        return value


def add_family_argument(parser):
    """--family, for every command line that opens a model."""
    parser.add_argument("--family", choices=FAMILIES, default=None,
                        help="baichuan or baichuan2 (NormHead); default: baichuan2 for a vocabulary of 125,696, "
                             "or what bcnp.convert recorded")


def config_path(path):
    path = os.fspath(path)
    return os.path.join(path, "config.json") if os.path.isdir(path) else path


def read_config_json(path):
    """The dict in config.json (`path`: the file or its directory), with a clear error when it is not there;
    its `bcnp` section (written by bcnp.convert), if any, has the shape its readers expect."""
    path = config_path(path)
    try:
        d = read_json_object(path, error=ConfigError, max_bytes=MAX_CONFIG_BYTES, what="config.json")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no config.json (is this a Baichuan model directory?)") from None
    if "bcnp" in d:
        check_bcnp_section(d["bcnp"], path)
    return d


def check_bcnp_section(section, path):
    """{"format_version": int, "quantization": null or {"bits": 8 | 4, "block_size": 32}, "source_dtype": str}."""
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: the bcnp section must be an object, got {section!r:.60}")
    version = section.get("format_version")
    if not (isinstance(version, int) and not isinstance(version, bool) and version >= 1):
        raise ConfigError(f"{path}: bcnp.format_version must be an integer >= 1, got {version!r:.60}")
    q = section.get("quantization")
    if q is not None and not (isinstance(q, dict) and q.get("bits") in (8, 4) and not isinstance(q.get("bits"), bool)
                              and q.get("block_size") == 32 and not isinstance(q.get("block_size"), bool)):
        raise ConfigError(f"{path}: bcnp.quantization must be null or {{\"bits\": 8 or 4, \"block_size\": 32}}, "
                          f"got {q!r:.80}")
    if section.get("family", "baichuan") not in FAMILIES:
        raise ConfigError(f"{path}: bcnp.family must be one of {', '.join(FAMILIES)}, got {section.get('family')!r:.60}")
    if section.get("source_dtype") not in DTYPES or not isinstance(section.get("source_dtype"), str):
        raise ConfigError(f"{path}: bcnp.source_dtype must be one of {', '.join(DTYPES)}, "
                          f"got {section.get('source_dtype')!r:.60}")


# The released models, for tests, benchmarks and `bcnp.inspect --preset`.
BAICHUAN_13B = Config(vocab_size=64000, hidden_size=5120, intermediate_size=13696, num_hidden_layers=40,
                      num_attention_heads=40, max_position=4096, position_embedding="alibi",
                      torch_dtype="bfloat16")
BAICHUAN_7B = Config(vocab_size=64000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, max_position=4096, position_embedding="rope",
                     torch_dtype="float16")
BAICHUAN2_13B = Config(vocab_size=BAICHUAN2_VOCAB, hidden_size=5120, intermediate_size=13696, num_hidden_layers=40,
                       num_attention_heads=40, max_position=4096, position_embedding="alibi",
                       torch_dtype="bfloat16", family="baichuan2")
BAICHUAN2_7B = Config(vocab_size=BAICHUAN2_VOCAB, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, max_position=4096, position_embedding="rope",
                      torch_dtype="bfloat16", family="baichuan2")
