"""The `edge-runtime` console script."""
