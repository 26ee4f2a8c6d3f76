"""hierpipe.models."""
