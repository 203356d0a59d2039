"""widthlab: how wide should this network be?

Wide & sparse families at a fixed weight count, adaptive-width layers, self-expanding networks and
the Gaussian-process kernel theory of sparse networks, with one trainer, one data layer and one report.
"""

__version__ = "0.1.0"

# The Python API, imported on first use so that ``import widthlab`` (and the CLI) stays light.
_API = {
    "AdaptiveWidth": "widthlab.methods.adaptive.controller",
    "make_adaptive": "widthlab.methods.adaptive.any_model",
    "fold_adaptive": "widthlab.methods.adaptive.any_model",
    "discover": "widthlab.nn.discovery",
    "width_sites": "widthlab.nn.discovery",
    "allocate": "widthlab.methods.widesparse.families",
    "sparsify": "widthlab.methods.widesparse.sparsify",
    "SelfExpanding": "widthlab.methods.expanding.plain_loop",
    "LayerSlot": "widthlab.nn.layer_slot",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'widthlab' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
