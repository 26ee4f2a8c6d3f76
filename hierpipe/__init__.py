"""hierpipe: reproducible hierarchical model studies."""

__version__ = "0.1.0"
