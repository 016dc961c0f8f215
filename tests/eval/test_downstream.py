"""Downstream heads on frozen patch tokens (segmentation Dice, detection mAP), and the COCO-style
mAP against hand-computed values."""
import math
import warnings

import numpy as np
import pytest
import torch

from eval_fakes import FakeCLIP, TensorItems

from acelora.eval import downstream as D
from acelora.eval import metrics as M


def square_images(n, seed, size=32, empty_every=4):
    """Dark noisy images with one bright rectangle (none in every ``empty_every``-th image):
    the rectangle's mask and box are the targets."""
    g = torch.Generator().manual_seed(seed)
    images, masks, boxes = [], [], []
    for i in range(n):
        img = torch.randn(3, size, size, generator=g) * 0.1 - 1.0
        mask = torch.zeros(size, size, dtype=torch.bool)
        if i % empty_every == empty_every - 1:
            boxes.append(torch.zeros(0, 4))
        else:
            w, h = (int(v) for v in torch.randint(10, 18, (2,), generator=g))
            x, y = int(torch.randint(0, size - w + 1, (1,), generator=g)), int(torch.randint(0, size - h + 1, (1,), generator=g))
            img[:, y:y + h, x:x + w] += 2.0
            mask[y:y + h, x:x + w] = True
            boxes.append(torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32))
        images.append(img)
        masks.append(mask)
    return images, masks, boxes


# --- mAP ----------------------------------------------------------------------------------

def _det(boxes, scores):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.zeros(len(scores), dtype=torch.long)}


def _gt(boxes):
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return {"boxes": b, "labels": torch.zeros(len(b), dtype=torch.long)}


def test_map_hand_computed():
    gt = [_gt([[0, 0, 10, 10]]), _gt([[20, 20, 40, 40], [50, 50, 60, 60]]), _gt([])]
    perfect = [_det([[0, 0, 10, 10]], [0.9]), _det([[20, 20, 40, 40], [50, 50, 60, 60]], [0.8, 0.7]), _det([], [])]
    assert M.mean_average_precision(perfect, gt, backend="acelora")["map"] == pytest.approx(1.0)

    # A higher-scoring false positive before the only true positive: the precision envelope is
    # 1/2 at every recall point.
    one = [_gt([[0, 0, 10, 10]])]
    fp_first = [_det([[50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.5])]
    assert M.coco_average_precision(fp_first, one, 0.5) == pytest.approx(0.5)

    # IoU of [0,0,10,10] with [0,0,10,5] is exactly 0.5: a hit at 0.50, a miss above.
    half = [_det([[0, 0, 10, 5]], [0.9])]
    assert M.coco_average_precision(half, one, 0.50) == pytest.approx(1.0)
    assert M.coco_average_precision(half, one, 0.55) == pytest.approx(0.0)
    res = M.mean_average_precision(half, one, backend="acelora")
    assert list(res["map_per_iou"]) == ["0.40", "0.45", "0.50", "0.55", "0.60", "0.65", "0.70", "0.75"]
    assert res["map"] == pytest.approx(3 / 8)

    # Two ground truths, detections TP, FP, TP (recall .5, .5, 1; precision 1, .5, 2/3): 51 recall
    # points at precision 1 and 50 at 2/3.
    two = [_gt([[0, 0, 10, 10], [30, 30, 40, 40]])]
    dets = [_det([[0, 0, 10, 10], [60, 60, 70, 70], [30, 30, 40, 40]], [0.9, 0.8, 0.7])]
    assert M.coco_average_precision(dets, two, 0.5) == pytest.approx((51 + 50 * 2 / 3) / 101)
    # No ground truth at all: undefined.
    assert math.isnan(M.coco_average_precision([_det([[0, 0, 1, 1]], [0.5])], [_gt([])], 0.5))


def test_map_auto_backend_says_which():
    gt, det = [_gt([[0, 0, 10, 10]])], [_det([[0, 0, 10, 10]], [0.9])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = M.mean_average_precision(det, gt)
    assert res["backend"] in ("torchmetrics", "acelora") and res["map"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="backend"):
        M.mean_average_precision(det, gt, backend="nope")


def test_map_agrees_with_torchmetrics_when_installed():
    if not M._coco_backend_available():
        pytest.skip("pycocotools / faster-coco-eval not installed")
    g = torch.Generator().manual_seed(0)
    preds, targets = [], []
    for _ in range(12):
        ng, nd = int(torch.randint(0, 4, (1,), generator=g)), int(torch.randint(0, 6, (1,), generator=g))
        xy = torch.rand(ng, 2, generator=g) * 100
        gt = torch.cat([xy, xy + torch.rand(ng, 2, generator=g) * 40 + 10], 1)
        src = gt[torch.randint(0, ng, (nd,), generator=g)] if ng else torch.tensor([[10., 10, 50, 50]]).repeat(nd, 1)
        det = src + torch.randn(nd, 4, generator=g) * 5
        det[:, 2:] = torch.maximum(det[:, 2:], det[:, :2] + 1)
        preds.append({"boxes": det, "scores": torch.rand(nd, generator=g), "labels": torch.zeros(nd, dtype=torch.long)})
        targets.append({"boxes": gt, "labels": torch.zeros(ng, dtype=torch.long)})
    a = M.mean_average_precision(preds, targets, backend="acelora")
    b = M.mean_average_precision(preds, targets, backend="torchmetrics")
    assert a["map"] == pytest.approx(b["map"], abs=1e-5)


# --- heads --------------------------------------------------------------------------------

def test_dice_scores_naive():
    pred = torch.rand(5, 8, 8) > 0.5
    target = torch.rand(5, 8, 8) > 0.6
    pred[4], target[4] = False, False
    out = M.dice_scores(pred, target)
    for i in range(4):
        p, t = pred[i].numpy(), target[i].numpy()
        assert out[i].item() == pytest.approx(2 * (p & t).sum() / (p.sum() + t.sum()))
    assert out[4].item() == 1.0


def test_subset_indices():
    idx = D.subset_indices(1000, 0.1, seed=3)
    assert len(idx) == 100 and len(set(idx.tolist())) == 100 and torch.equal(idx, idx.sort().values)
    assert torch.equal(idx, D.subset_indices(1000, 0.1, seed=3))
    assert len(D.subset_indices(50, 0.01)) == 1                # at least one image
    with pytest.raises(ValueError, match="fraction"):
        D.subset_indices(10, 0.0)


def test_detection_targets():
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 16.0], [1.0, 1.0, 6.0, 6.0]]), torch.zeros(0, 4)]
    pos, target = D.detection_targets(boxes, 4, 4, 8.0)
    # The big box covers the 2×2 cells whose centres (4, 12) lie inside; the small box holds the
    # centre (4, 4) too and is smaller, so it wins that cell.
    assert pos[0].sum() == 4 and pos[0, :2, :2].all() and not pos[1].any()
    assert target[0, 0, 0].tolist() == [1.0, 1.0, 6.0, 6.0]
    assert target[0, 1, 1].tolist() == [0.0, 0.0, 16.0, 16.0]
    # A box with no cell centre inside claims the cell of its own centre.
    pos, target = D.detection_targets([torch.tensor([[17.0, 9.0, 19.0, 11.0]])], 4, 4, 8.0)
    assert pos[0].nonzero().tolist() == [[1, 2]]


def test_segmentation_learns_on_frozen_features(tmp_path):
    model = FakeCLIP(seed=0)
    images, masks, _ = square_images(96, seed=1)
    train = TensorItems(images[:64], mask=masks[:64], label=[0] * 64)
    test = TensorItems(images[64:], mask=masks[64:], label=[0] * 32)
    res = D.segmentation_evaluate(model, train, test, fractions=(0.05, 1.0), epochs=30, min_steps=60,
                                  batch_size=16, lr=3e-3, out_dir=str(tmp_path))
    assert model.lora_calls == 0, "features must come from the merged model"
    small, full = res["fractions"]["5%"], res["fractions"]["100%"]
    assert small["n_train"] == 3 and full["n_train"] == 64
    for row in (small, full):
        assert 0.0 <= row["dice"] <= 1.0 and math.isfinite(row["dice_positive"])
    # An empty prediction scores 0 on images with a rectangle; the decoder must find them.
    assert full["dice_positive"] > 0.75, full
    assert res["test_positives"] == 24 and (tmp_path / "segment.json").stat().st_size > 0


def test_detection_learns_on_frozen_features(tmp_path):
    model = FakeCLIP(seed=0)
    images, _, boxes = square_images(96, seed=2)
    train = TensorItems(images[:64], boxes=boxes[:64], label=[0] * 64)
    test = TensorItems(images[64:], boxes=boxes[64:], label=[0] * 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = D.detection_evaluate(model, train, test, fractions=(0.1, 1.0), epochs=40, min_steps=80,
                                   batch_size=16, lr=3e-3, out_dir=str(tmp_path))
    full = res["fractions"]["100%"]
    assert res["map_backend"] in ("torchmetrics", "acelora")
    assert len(full["map_per_iou"]) == 8
    for row in res["fractions"].values():
        assert 0.0 <= row["map"] <= 1.0
    assert full["map"] > 0.6, full
    assert full["map_per_iou"]["0.40"] >= full["map_per_iou"]["0.75"]


def test_downstream_bad_input():
    model = FakeCLIP()
    images, _, _ = square_images(4, seed=0)
    plain = TensorItems(images, label=[0, 1, 0, 1])
    with pytest.raises(ValueError, match="masks"):
        D.segmentation_evaluate(model, plain, plain, fractions=(1.0,), min_steps=1, epochs=1)
    with pytest.raises(ValueError, match="boxes"):
        D.detection_evaluate(model, plain, plain, fractions=(1.0,), min_steps=1, epochs=1)

    class Registers(FakeCLIP):
        def encode_image_tokens(self, images):
            t = super().encode_image_tokens(images)
            return torch.cat([t, t[:, :2]], 1)

    with pytest.raises(ValueError, match="patch tokens"):
        D.extract_features(Registers(), plain)
    with pytest.raises(ValueError, match="power of two"):
        D.SegmentationDecoder(16, 14)


def test_decoder_shapes():
    dec = D.SegmentationDecoder(dim=24, patch_size=16)
    assert dec(torch.randn(2, 24, 4, 4)).shape == (2, 1, 64, 64)
    head = D.DetectionHead(dim=24)
    obj, box = head(torch.randn(2, 24, 4, 5))
    assert obj.shape == (2, 4, 5) and box.shape == (2, 4, 5, 4)
    np.testing.assert_allclose(obj.detach().sigmoid().mean().item(), 0.01, rtol=0.5)  # low prior
