"""rtl: Routing the Lottery (arXiv 2601.22141) for PyTorch: one shared weight, one pruning mask per ticket.

This package holds the method (routed modules, model conversion, routing, pruning, joint retraining and the
mask-similarity diagnostic); the routed kernels it runs on live in :mod:`rtl_kernels`, which never imports rtl.
"""
__version__ = "0.1.0"
