"""hierpipe.report."""
