"""jalign: JAX-native preference optimization."""

__version__ = "0.1.0"
