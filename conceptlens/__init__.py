"""conceptlens: explain what a PyTorch vision model has learned."""

__version__ = "0.1.0"
