"""Triton kernels with their plain PyTorch references (installs as ``fastssl.kernels``).

Nothing here launches or compiles at import; ``triton`` is optional (imported inside each module
in a try block) and only the ``impl="triton"`` paths need it.
"""
