"""Segmenter: plain Vision Transformers for semantic segmentation, with token-reduction patches."""

__version__ = "0.1.0"
