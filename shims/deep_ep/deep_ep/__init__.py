"""The module name ``deep_ep`` for code that imports DeepEP, served by ``expertwire.deep_ep``.

Installed only on request (``pip install shims/deep_ep``): it shadows a real DeepEP, so install it only where
DeepEP is absent.
"""

from expertwire.deep_ep import Buffer, Config, EventOverlap, topk_idx_t

__all__ = ["Buffer", "Config", "EventOverlap", "topk_idx_t"]
