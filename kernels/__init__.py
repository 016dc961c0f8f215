"""Triton kernels only (@triton.jit functions + launch wrappers). Shipped as ``acelora.kernels``.
Nothing here knows of models or nn.Modules; autograd and dispatch live in ``acelora.ops``."""
