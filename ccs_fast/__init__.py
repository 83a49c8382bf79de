"""ccs_fast: Cooperative Cross-Stream two-stream action recognition, performance-engineered.

The drop-in layers are importable from the top level and load on first use, so that
``import ccs_fast`` stays light for the CLI::

    from ccs_fast import CrossModalTripletLoss, DiscriminativeEmbeddingLoss, CrossStreamAttention
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "CrossStreamAttention": "ccs_fast.connection",
    "CrossModalTripletLoss": "ccs_fast.losses",
    "BatchHardTripletLoss": "ccs_fast.losses",
    "DiscriminativeEmbeddingLoss": "ccs_fast.losses",
    "CCSObjective": "ccs_fast.losses",
    "build_model": "ccs_fast.model",
    "CCSModel": "ccs_fast.model",
    "load_config": "ccs_fast.config",
    "Config": "ccs_fast.config",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ccs_fast' has no attribute {name!r}")
