"""graphspace: learning on neural-network weights with PyTorch Geometric and Lightning."""

__version__ = "0.1.0"

__all__ = ["__version__"]
