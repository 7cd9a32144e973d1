"""ALGM: Adaptive Local-then-Global token Merging for plain-ViT semantic segmentation.

``algm.patch.algm_segmenter_patch(model, [1, 5], window_size=(2, 2), threshold=0.88)`` patches a Segmenter.
"""

from algm import global_merge, local_merge, merge, patch

__all__ = ["global_merge", "local_merge", "merge", "patch"]
