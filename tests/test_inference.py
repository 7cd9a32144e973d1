"""Padding, up-only resize, sliding windows (reference anchors), window merging and view averaging."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from segm.model.inference import (
    WindowCanvas,
    inference,
    merge_windows,
    padding,
    resize,
    sliding_window,
    unpadding,
    window_anchors,
    window_batches,
)


class Pointwise(nn.Module):
    """A per-pixel classifier: its output on a crop is the crop of its output on the whole image."""

    def __init__(self, n_cls: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, n_cls, 1)
        self.n_cls = n_cls
        self.batches = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.conv(x)


def test_padding_and_unpadding():
    im = torch.randn(2, 3, 33, 48)
    padded = padding(im, 16, fill_value=0)
    assert padded.shape == (2, 3, 48, 48)
    assert torch.equal(padded[:, :, :33], im)
    assert padded[:, :, 33:].abs().sum() == 0
    assert padding(im[:, :, :32], 16).shape == (2, 3, 32, 48)
    assert torch.equal(unpadding(padded, (33, 48)), im)


@pytest.mark.parametrize("h,w,s,want", [(300, 400, 512, (512, 682)), (400, 300, 512, (682, 512)),
                                        (500, 500, 512, (512, 512)), (600, 700, 512, (600, 700)),
                                        (100, 333, 128, (128, 426))])
def test_resize_scales_up_only_with_reference_sizes(h, w, s, want):
    out = resize(torch.randn(1, 3, h, w), s)
    assert tuple(out.shape[2:]) == want


def test_window_anchors_match_reference_rule():
    for length in (64, 100, 128, 150, 512, 683):
        for ws, stride in ((64, 64), (64, 40), (64, 32), (48, 100)):
            if length < ws:
                continue
            want = [a for a in torch.arange(0, length, stride).tolist() if a < length - ws] + [length - ws]
            assert window_anchors(length, ws, stride) == want
    assert window_anchors(683, 512, 480) == [0, 171]


def test_sliding_window_crops_and_order():
    im = torch.arange(1 * 1 * 100 * 150, dtype=torch.float32).reshape(1, 1, 100, 150)
    w = sliding_window(im, False, 64, 50)
    assert w["anchors"] == [(0, 0), (0, 50), (0, 86), (36, 0), (36, 50), (36, 86)]
    for crop, (ha, wa) in zip(w["crop"], w["anchors"]):
        assert torch.equal(crop, im[0, :, ha:ha + 64, wa:wa + 64])
    assert w["shape"] == (100, 150)


def test_merge_windows_mean_logits_softmax_and_flip():
    seg_maps = torch.stack([torch.full((2, 4, 4), 1.0), torch.full((2, 4, 4), 3.0)])
    seg_maps[1, 1] = 0.0
    windows = {"anchors": [(0, 0), (0, 2)], "shape": (4, 6), "flip": False, "seg_maps": seg_maps}
    logit = torch.zeros(2, 4, 6)
    logit[:, :, :2] = 1.0
    logit[:, :, 2:4] = torch.tensor([2.0, 0.5])[:, None, None]
    logit[0, :, 4:] = 3.0
    logit[1, :, 4:] = 0.0
    assert torch.allclose(merge_windows(windows, 4, (4, 6)), F.softmax(logit, 0))
    windows["flip"] = True
    assert torch.allclose(merge_windows(windows, 4, (4, 6)), F.softmax(logit, 0).flip(2))
    resized = F.interpolate(logit[None], (8, 12), mode="bilinear", align_corners=False)[0]
    windows["flip"] = False
    assert torch.allclose(merge_windows(windows, 4, (8, 12)), F.softmax(resized, 0))


@pytest.mark.parametrize("size,ws,stride,batch", [((64, 64), 64, 64, 1), ((80, 150), 64, 40, 2),
                                                   ((64, 97), 64, 20, 3), ((40, 50), 64, 64, 4)])
def test_sliding_window_inference_equals_whole_image_for_pointwise_model(size, ws, stride, batch):
    model = Pointwise()
    im = torch.randn(1, 3, *size)
    probs = inference(model, [im], [{"flip": False}], size, ws, stride, batch)
    with torch.no_grad():
        want = F.softmax(F.interpolate(model(resize(im, ws)), size, mode="bilinear", align_corners=False)[0], 0)
    assert probs.shape == (4, *size)
    assert torch.allclose(probs, want, atol=1e-6)


def test_window_batches_are_forwarded_in_groups_of_batch_size():
    model = Pointwise()
    im = torch.randn(1, 3, 64, 200)
    windows = sliding_window(im, False, 64, 32)
    n = len(windows["anchors"])
    model.batches.clear()
    out = list(window_batches(model, windows["crop"], 4))
    assert model.batches == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    with torch.no_grad():
        assert torch.equal(torch.cat(out), model(windows["crop"]))


def test_canvas_sums_windows_in_place_and_checks_their_number():
    windows = sliding_window(torch.zeros(1, 3, 6, 10), False, 4, 3)
    canvas = WindowCanvas(windows, 4)
    logits = torch.randn(len(windows["anchors"]), 2, 4, 4)
    with pytest.raises(ValueError, match="0 of 6 windows were added"):
        canvas.probabilities((6, 10))
    canvas.add(logits[:4])
    first = canvas.logits
    canvas.add(logits[4:])
    assert canvas.logits is first and first.is_contiguous(memory_format=torch.channels_last)
    total = torch.zeros(2, 6, 10)
    count = torch.zeros(1, 6, 10)
    for window, (ha, wa) in zip(logits, windows["anchors"]):
        total[:, ha:ha + 4, wa:wa + 4] += window
        count[:, ha:ha + 4, wa:wa + 4] += 1
    assert torch.allclose(canvas.probabilities((6, 10)), F.softmax(total / count, 0), atol=1e-6)
    with pytest.raises(ValueError, match="7 windows added to a view cut into 6"):
        canvas.add(logits[:1])


def test_views_are_averaged_and_flipped_back():
    model = Pointwise()
    im = torch.randn(1, 3, 64, 64)
    single = inference(model, [im], [{"flip": False}], (64, 64), 64, 64, 1)
    flipped = inference(model, [im.flip(3)], [{"flip": torch.tensor([True])}], (64, 64), 64, 64, 1)
    assert torch.allclose(single, flipped, atol=1e-6)
    both = inference(model, [im, im.flip(3)], [{"flip": False}, {"flip": True}], (64, 64), 64, 64, 1)
    assert torch.allclose(both, single, atol=1e-6)
    assert torch.allclose(both.sum(0), torch.ones(64, 64), atol=1e-5)


def test_whole_segmenter_single_window_matches_forward(tiny_model):
    model, _ = tiny_model
    im = torch.randn(1, 3, 64, 64)
    probs = inference(model, [im], [{"flip": False}], (64, 64), 64, 64, 1)
    with torch.no_grad():
        assert torch.allclose(probs, F.softmax(model(im)[0], 0), atol=1e-6)
