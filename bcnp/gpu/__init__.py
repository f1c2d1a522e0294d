"""The GPU: bcnp.forward run by CuPy, with CUDA kernels for the linear layers and decode attention.

    model = Model.from_pretrained(path).quantize(8).cuda()     # = bcnp.api.to_device(model)

`to_device` copies the weights to the GPU one tensor at a time (`weights.device_weights`): float weights as
float16 (the norms stay float32), quantized ones as they are, and returns a model whose array module is `cupy`,
so bcnp.forward runs the same lines as on the CPU; its KV cache is float16 on the GPU. Activations and every sum
stay float32. `to_device(model, dtype="float32")` keeps float32 weights, float32 prefill and a float32 cache
instead: the same numbers as the CPU, for the golden tests.

The package, by job:
- `kernels`: the CUDA kernels of bcnp/cuda/quant_kernels.cu loaded with CuPy, and a NumPy twin of each;
- `weights`: `DeviceQuantizedWeight` (8 or 4 bits, or 16 for float16 values: one token multiplies in a matvec
  kernel straight from the compact form, several tokens expand the weight into a float16 scratch for cuBLAS),
  and the passes that move a weight dict to the device and back;
- `cache`: `DeviceKVCache`, whose one-token attention is a kernel reading the float16 keys and values as stored,
  and `GraphKVCache`, the fixed-shape step a CUDA graph records;
- `ops`: `DecodeOps`, what bcnp.forward.decoder_layer computes one token with (8 kernels a layer);
- `graphs`: `DecodeGraphs`, whole decode steps replayed from CUDA graphs: launched one by one from Python, the
  kernels would cost more time than the GPU needs to read the layer's weights.

`to_device(model, xp=module)` with any module other than CuPy runs the twins instead of the kernels, and each
decode step op by op instead of from a graph: the tests run the whole forward pass that way on a module that
refuses implicit conversions to NumPy, as CuPy does (tests/strict_xp.py), so a stray `np.` call fails without a
GPU.
"""
