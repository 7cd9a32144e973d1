"""CTS's policy network, trained on its own before the Segmenter (``specs/methods.md`` section 5).

``labels`` derives the policy targets from ground truth (is a 32 x 32 superpatch uniform?) and holds the
per-dataset rules and training geometry; ``data`` turns a segmentation dataset into policy training items;
``train`` is ``python -m segm.policy.train``, which writes the ``policynet.pth`` that
``segm.train --policynet-ckpt`` loads.
"""
