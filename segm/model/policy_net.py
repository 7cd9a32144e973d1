"""CTS's policy network: which 2 x 2 superpatches (32 x 32 pixels) are uniform enough to share one token.

timm's ``efficientnet_lite0`` with ``features_only``; its last feature map (stride 32, 320 channels) goes
through a 1 x 1 convolution to two logits per superpatch (1 = shareable). Parameter names are CTS's
(``backbone.*``, ``head.*``; ``policy_net.*`` inside a Segmenter), the same in timm 0.4.12 and 1.x, so
a checkpoint written by the published CTS code loads strictly. The input is the normalised image the
Segmenter sees (CTS trains the policy with ``(x - 127.5) / 127.5``, the ``vit`` normalisation).
"""

from __future__ import annotations

import timm
import torch
import torch.nn as nn

BACKBONE = "efficientnet_lite0"
CELL = 32


class PolicyNet(nn.Module):
    """Two logits per 32 x 32 superpatch: ``forward(x)["logits"]`` is (B, 2, H / 32, W / 32)."""

    def __init__(self, pretrained: bool = False):
        super().__init__()
        try:
            self.backbone = timm.create_model(BACKBONE, pretrained=pretrained, features_only=True)
        except Exception as err:
            if not pretrained:
                raise
            raise ConnectionError(
                f"could not fetch the ImageNet weights of {BACKBONE} ({type(err).__name__}); download them once "
                "with network access, pass a local file (--pretrained PATH) or train without (--no-pretrained)"
            ) from None
        self.head = nn.Conv2d(self.backbone.feature_info.channels()[-1], 2, 1)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.head(self.backbone(x)[-1])}
