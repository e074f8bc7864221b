"""Compute kernels of the scoring path: pure-torch references first, fused GPU kernels beside them."""
