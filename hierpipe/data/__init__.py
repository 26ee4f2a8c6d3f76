"""hierpipe.data."""
