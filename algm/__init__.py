"""ALGM: Adaptive Local-then-Global token Merging for plain-ViT semantic segmentation."""

from algm import merge

__all__ = ["merge"]
