"""Argument checks shared by the models' ``prunable_filter`` methods."""

from torch import nn


def check_filter_args(name, module) -> None:
    """TypeError unless ``name`` is a str and ``module`` an nn.Module (what ``named_modules`` yields)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
