"""ALGM: Adaptive Local-then-Global token Merging for plain-ViT semantic segmentation.

``algm.patch.algm_segmenter_patch(model, [1, 5], window_size=(2, 2), threshold=0.88)`` patches a Segmenter;
``algm.patch.ALGM`` is the same method as a ``tokred`` patch type.
"""

from algm import calibrate, global_merge, local_merge, patch

__all__ = ["calibrate", "global_merge", "local_merge", "patch"]
