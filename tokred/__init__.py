"""tokred: the shared mechanism of token reduction in plain-ViT encoders built from timm ``Block``s.

It holds the merge state (``MergeState``), the reducer protocol and registry (``TokenReducer``,
``Registry``, ``install`` / ``uninstall``), the one attention override, the bipartite matcher, and the
peer methods that need nothing else (``tokred.tome``). It depends on torch and timm only; methods with
a package of their own (ALGM) build on it.
"""

from tokred.blocks import MidBlock, ReductionBlock, run_block
from tokred.errors import UsageError
from tokred.options import Option
from tokred.reducer import Pure, Registry, TokenReducer, install, uninstall
from tokred.state import MergeState

__all__ = [
    "MergeState",
    "MidBlock",
    "Option",
    "Pure",
    "ReductionBlock",
    "Registry",
    "TokenReducer",
    "UsageError",
    "install",
    "run_block",
    "uninstall",
]
