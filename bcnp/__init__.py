"""bcnp: Baichuan-13B/7B in readable NumPy (and CuPy), without PyTorch."""
from .api import Model

__all__ = ["Model"]
__version__ = "0.1.0"
