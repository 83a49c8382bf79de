"""Fused ops of ccs_fast (installed as ``ccs_fast.kernels``); exports are added as the op files land."""
