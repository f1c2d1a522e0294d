"""What a converted bcnp directory holds: the block format's sizes and every tensor's name, dtype and shape.

Pure facts, in one place, for the writer (`bcnp.convert`), the readers (`bcnp.checkpoint.read_model_dir`,
`bcnp.inspect`) and the in-memory quantizer (`bcnp.quant`, `Model.quantize`), which must all agree on them.
A linear weight `NAME.weight` (out, in) quantized to `bits` is stored as

    NAME.qweight   int8 (out, in_padded)  (8 bits)   or   uint8 (out, in_padded / 2)  (4 bits, two codes a byte)
    NAME.scales    float16 (out, in_padded / 32)       one scale per block of 32 values

with `in_padded` the input width rounded up to whole blocks. Every other tensor is a float tensor under its
Hugging Face name, in the directory's float dtype (the source's, unless converted on purpose) -- except the
embedding of a quantized directory, which is float16 as `Model.quantize` keeps it.

The `bcnp` section of config.json says which: `format_version`, `quantization` (null or {bits, block_size}),
`float_dtype` (since version 2; version 1 stored every float tensor as float16), and `float_dtypes`
({name: dtype}) for the tensors of a mixed-precision source that differ from `float_dtype`.
"""
from .config import ConfigError

FORMAT_VERSION = 2                       # 2: float tensors keep their dtype; 1: every float tensor float16
READABLE_FORMAT_VERSIONS = (1, 2)
BLOCK_SIZE = 32                          # values per quantization block, along the input dimension
BITS = (8, 4)
FLOAT_DTYPES = ("float16", "bfloat16", "float32")
EMBEDDING = "model.embed_tokens.weight"
LINEAR_SUFFIXES = ("self_attn.W_pack.weight", "self_attn.o_proj.weight",
                   "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def padded_width(in_features):
    """The input width rounded up to whole blocks (small test models; every real Baichuan width is a multiple)."""
    return -(-in_features // BLOCK_SIZE) * BLOCK_SIZE


def is_linear(name):
    return name == "lm_head.weight" or name.endswith(LINEAR_SUFFIXES)


def quantized_bits(name, bits):
    """How many bits weight `name` gets when the model is quantized to `bits` (None: it stays float). Every linear
    gets `bits` except lm_head, which keeps 8: the output matrix matters most (llama.cpp keeps it precise too).
    The embedding is a lookup, not a matmul: it stays float16."""
    if bits is None or not is_linear(name):
        return None
    return 8 if name == "lm_head.weight" else bits


def activation_bits(bits):
    """The integers the fused kernels round x to, per block of 32, in a model quantized to `bits`: int16 at 8 bits,
    int8 (llama.cpp's choice) at 4 bits, for every linear, the 8-bit lm_head included. Measured on the fixture b13
    (RMS of the logits' difference from float32, 33-token prompt): int8 x took the 8-bit model from 0.0031 to
    0.0040, worse than the original's own int8, and left the 4-bit model at 0.0485 (0.0484), whose weights'
    rounding is 16 times coarser than int8 x's. int8 x is one product per four codes where int16 x is two: a batch
    of 8 tokens through an 8-bit lm_head of 64000 x 5120 took 13 ms against 22 (Zen 5, 2 threads)."""
    return 16 if bits == 8 else 8


def quantized_shapes(shape, bits):
    """(qweight, scales) as (dtype, shape) for a float (out, in) weight; rows are padded to whole blocks."""
    out_features, in_features = shape
    padded = padded_width(in_features)
    qweight = ("int8", (out_features, padded)) if bits == 8 else ("uint8", (out_features, padded // 2))
    return qweight, ("float16", (out_features, padded // BLOCK_SIZE))


def converted_float_dtype(name, bits, float_dtypes):
    """The dtype float tensor `name` is stored in: float16 for a quantized directory's embedding, else the one
    dtype `float_dtypes` names (a string), or its entry for `name` (a dict with every float tensor)."""
    if bits is not None and name == EMBEDDING:
        return "float16"
    return float_dtypes if isinstance(float_dtypes, str) else float_dtypes[name]


def expected_converted_shapes(config, bits, float_dtypes="float16"):
    """Every tensor of a converted directory: name -> (dtype, shape), in model order. bits: None (float), 8 or 4;
    float_dtypes: the dtype of the float tensors, or {name: dtype} (see `converted_float_dtype`)."""
    expected = {}
    for name, shape in config.weight_shapes().items():
        b = quantized_bits(name, bits)
        if b is None:
            expected[name] = (converted_float_dtype(name, bits, float_dtypes), shape)
        else:
            base = name[: -len(".weight")]
            expected[base + ".qweight"], expected[base + ".scales"] = quantized_shapes(shape, b)
    return expected


def section_float_dtypes(section, config, source="config.json"):
    """The float dtype(s) a `bcnp` section records: a string, or {name: dtype} when the source mixed dtypes."""
    version = section.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise ConfigError(f"{source}: bcnp.format_version {version!r} is not one this bcnp reads "
                          f"({', '.join(map(str, READABLE_FORMAT_VERSIONS))}); convert the model again")
    if version == 1:
        return "float16"
    default = section.get("float_dtype")
    if default not in FLOAT_DTYPES:
        raise ConfigError(f"{source}: bcnp.float_dtype must be one of {', '.join(FLOAT_DTYPES)}, got {default!r}")
    others = section.get("float_dtypes") or {}
    if not isinstance(others, dict):
        raise ConfigError(f"{source}: bcnp.float_dtypes must map tensor names to dtypes")
    names = config.weight_shapes()
    for name, dtype in others.items():
        if name not in names or dtype not in FLOAT_DTYPES:
            raise ConfigError(f"{source}: bcnp.float_dtypes has {name!r}: {dtype!r}; expected a tensor of the "
                              f"model and one of {', '.join(FLOAT_DTYPES)}")
    return {name: others.get(name, default) for name in names} if others else default


def section_bits(section, source="config.json"):
    quantization = section.get("quantization") or {}
    if not isinstance(quantization, dict):
        raise ConfigError(f"{source}: bcnp.quantization must be null or an object, got {quantization!r:.80}")
    bits = quantization.get("bits")
    if bits not in (None, *BITS):
        raise ConfigError(f"{source}: bcnp.quantization.bits must be 8 or 4, got {bits!r:.80}")
    if bits is not None and quantization.get("block_size", BLOCK_SIZE) != BLOCK_SIZE:
        raise ConfigError(f"{source}: bcnp.quantization.block_size must be {BLOCK_SIZE}, "
                          f"got {quantization.get('block_size')!r:.80}")
    return bits


def expected_section_shapes(config, section, source="config.json"):
    """`expected_converted_shapes` for the directory a `bcnp` section of config.json describes, checking it."""
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: the bcnp section must be an object, got {type(section).__name__}")
    return expected_converted_shapes(config, section_bits(section, source),
                                     section_float_dtypes(section, config, source))

