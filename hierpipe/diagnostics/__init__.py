"""hierpipe.diagnostics."""
