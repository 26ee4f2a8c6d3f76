"""hierpipe.cv."""
