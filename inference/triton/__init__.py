"""Triton Inference Server: export the model repository (``export``), run a local server (``serve``).

The tensor layout both sides agree on lives in :mod:`inference.backends.triton.layout`; the client side is
:class:`inference.backends.triton.TritonBackend`. Nothing here is imported unless Triton is used.
"""
