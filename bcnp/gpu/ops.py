"""The forward pass's ops for one token on the device: bcnp.forward.decoder_layer runs a layer with these in 8
kernel launches instead of the CPU's ~25 array operations.

Each RMSNorm is one kernel (the CPU's code: 7 array operations), the residual adds happen inside o_proj's and
down_proj's matvecs, and gate_proj, up_proj and silu(gate) * up are one kernel. In a CUDA graph a small step
costs its launch, not its arithmetic. Without `kernels` (an array module other than CuPy) the kernels' NumPy
twins compute the same."""
from ..forward import Ops, linear
from .kernels import rms_norm_on_device, silu_mul_on_device
from .weights import DeviceQuantizedWeight


class DecodeOps(Ops):
    def __init__(self, kernels):
        self.kernels = kernels

    def rms_norm(self, xp, x, weight, eps):
        return rms_norm_on_device(xp, self.kernels, x, weight, eps)

    def add_linear(self, x, a, w):
        """x + a @ w.T for one token: a device weight adds the residual x in its matvec kernel."""
        if isinstance(w, DeviceQuantizedWeight):
            return w.matvec(w.vector(a), residual=x[0])[None]
        return x + linear(a, w)

    def swiglu(self, xp, h, gate, up):
        """silu(gate_proj(h)) * up_proj(h) for one token: device weights of one kind in one kernel."""
        if isinstance(gate, DeviceQuantizedWeight) and isinstance(up, DeviceQuantizedWeight) \
                and gate.bits == up.bits and gate.shape == up.shape:
            return gate.swiglu(up, gate.vector(h))[None]
        return silu_mul_on_device(xp, self.kernels, linear(h, gate), linear(h, up))
