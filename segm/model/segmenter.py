"""Segmenter: pad -> encode -> drop prefix tokens -> decode (merged tokens) -> unmerge -> upsample -> unpad."""

from __future__ import annotations

import torch
import torch.nn as nn

from segm.model.inference import padding, unpadding, upsample_logits
from tokred.errors import UsageError


def check_image_batch(im: torch.Tensor, channels: int = 3) -> None:
    """Raise a clear error unless ``im`` is a floating ``B x channels x H x W`` tensor."""
    if not isinstance(im, torch.Tensor) or im.ndim != 4 or im.shape[1] != channels:
        shape = tuple(im.shape) if isinstance(im, torch.Tensor) else type(im).__name__
        raise UsageError(f"expected an image batch of shape B x {channels} x H x W, got {shape}")
    if not im.is_floating_point():
        raise UsageError(f"expected a floating-point (normalised) image batch, got dtype {im.dtype}")


class Segmenter(nn.Module):
    """A ViT encoder and a decoder producing per-pixel class logits ``[B, K, H, W]`` for any ``H x W``.

    ``policy_net`` (optional) is CTS's policy network, used by token sharing; ``policy_schedule``
    the ``(not shared, shared)`` token counts the model was trained with.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, n_cls: int, policy_net: nn.Module | None = None,
                 policy_schedule: tuple[int, int] | None = None):
        super().__init__()
        self.n_cls = n_cls
        self.patch_size = encoder.patch_size
        self.encoder = encoder
        self.decoder = decoder
        self.policy_net = policy_net
        self.policy_schedule = policy_schedule

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        parts = {"encoder": self.encoder, "decoder": self.decoder, "policy_net": self.policy_net}
        return {f"{name}.{n}" for name, part in parts.items() if part is not None for n in part.no_weight_decay()}

    def forward(self, im: torch.Tensor) -> torch.Tensor:
        check_image_batch(im, self.encoder.patch_embed.proj.in_channels)
        H_ori, W_ori = im.shape[2], im.shape[3]
        im = padding(im, self.encoder.reducer.input_multiple(self.encoder))
        H, W = im.shape[2], im.shape[3]

        x, state = self.encoder.forward_tokens(im)
        x = x[:, self.encoder.num_prefix_tokens :]
        masks = self.decoder(x, (H, W), state)

        return unpadding(upsample_logits(masks, (H, W)), (H_ori, W_ori))
