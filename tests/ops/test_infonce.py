"""The reference label-guided InfoNCE against explicit loops, open_clip's ClipLoss and gradcheck."""
import math

import pytest
import torch
import torch.nn.functional as F

try:  # the cross-check against open_clip runs wherever it is importable
    from open_clip.loss import ClipLoss
except Exception:  # pragma: no cover
    ClipLoss = None

from acelora.ops import _backend, label_guided_infonce, label_guided_infonce_reference, labels_to_ids
from acelora.testing import rel_err


def _embeddings(b, d, dtype=torch.float64, requires_grad=False):
    image = F.normalize(torch.randn(b, d, dtype=dtype), dim=-1)
    text = F.normalize(torch.randn(b, d, dtype=dtype), dim=-1)
    return image.requires_grad_(requires_grad), text.requires_grad_(requires_grad)


def _naive_loss(image, text, scale, label_rows):
    """Both cross-entropies with every denominator built term by term (float64, python loops)."""
    b = image.shape[0]
    logits = [[scale * float(image[i] @ text[j]) for j in range(b)] for i in range(b)]

    def kept(i, j):
        return i == j or label_rows is None or label_rows[i] != label_rows[j]

    image_to_text = 0.0
    for i in range(b):
        denominator = sum(math.exp(logits[i][j]) for j in range(b) if kept(i, j))
        image_to_text += math.log(denominator) - logits[i][i]
    text_to_image = 0.0
    for j in range(b):
        denominator = sum(math.exp(logits[i][j]) for i in range(b) if kept(i, j))
        text_to_image += math.log(denominator) - logits[j][j]
    return (image_to_text / b + text_to_image / b) / 2


def _multi_hot(b, n_labels, p=0.3):
    return (torch.rand(b, n_labels) < p).float()


@pytest.mark.parametrize("b,d,n_labels", [(9, 7, 3), (16, 12, 2), (5, 4, 1)])
def test_reference_matches_explicit_loops(b, d, n_labels):
    image, text = _embeddings(b, d)
    labels = _multi_hot(b, n_labels, p=0.5)
    scale = float(torch.empty(()).uniform_(2.0, 20.0))
    rows = [tuple(r.tolist()) for r in labels]
    assert len(set(rows)) < b  # the draw has repeated label vectors, so something is masked
    out = label_guided_infonce_reference(image, text, scale, labels)
    assert out.dtype == torch.float64
    assert abs(out.item() - _naive_loss(image, text, scale, rows)) < 1e-10
    unmasked = label_guided_infonce_reference(image, text, scale, None)
    assert abs(unmasked.item() - _naive_loss(image, text, scale, None)) < 1e-10
    # Removing terms from every denominator can only lower the loss.
    assert out.item() < unmasked.item()


def test_all_labels_equal_leaves_only_the_diagonal():
    # Every off-diagonal pair is masked: each softmax has one term, so each CE is exactly 0.
    image, text = _embeddings(12, 8, requires_grad=True)
    scale = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
    labels = torch.ones(12, 5)
    loss = label_guided_infonce_reference(image, text, scale, labels)
    assert abs(loss.item()) < 1e-12
    loss.backward()
    for g in (image.grad, text.grad, scale.grad):
        assert g.abs().max().item() < 1e-12


def _hand_clip_loss(image, text, scale):
    """CLIP's symmetric loss written out: mean over both directions of -log softmax at the diagonal."""
    logits = scale * image @ text.T
    i2t = -(logits.diagonal() - logits.logsumexp(dim=1)).mean()
    t2i = -(logits.diagonal() - logits.logsumexp(dim=0)).mean()
    return (i2t + t2i) / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_distinct_labels_equal_the_plain_clip_loss(dtype):
    b = 14
    image, text = _embeddings(b, 10, dtype=dtype)
    scale = torch.tensor(11.0, dtype=dtype)
    expected = _hand_clip_loss(image, text, scale)
    distinct = torch.eye(b)  # every row its own vector
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for labels in (distinct, None, torch.randperm(b)):
        assert rel_err(label_guided_infonce_reference(image, text, scale, labels), expected) < tol
    if ClipLoss is not None:
        assert rel_err(ClipLoss()(image, text, scale), expected) < tol


def test_integer_ids_equal_multi_hot():
    b = 20
    image, text = _embeddings(b, 6)
    labels = _multi_hot(b, 3, p=0.5)
    _, ids = torch.unique(labels, dim=0, return_inverse=True)
    relabelled = torch.randperm(64)[ids]  # any injective renaming of the classes
    scale = 6.5
    multi_hot = label_guided_infonce_reference(image, text, scale, labels)
    for other in (relabelled, relabelled.int(), labels.bool(), labels.long()):
        assert rel_err(label_guided_infonce_reference(image, text, scale, other), multi_hot) < 1e-14


def test_labels_to_ids_groups_equal_rows():
    labels = (torch.rand(30, 4) < 0.4)
    ids = labels_to_ids(labels)
    assert ids.dtype == torch.long and ids.shape == (30,)
    same_rows = (labels[:, None, :] == labels[None, :, :]).all(-1)
    assert torch.equal(ids[:, None] == ids[None, :], same_rows)
    assert torch.equal(labels_to_ids(labels.float()), ids)
    assert torch.equal(labels_to_ids(torch.tensor([3, 1, 3], dtype=torch.int32)),
                       torch.tensor([3, 1, 3]))
    assert torch.equal(labels_to_ids(torch.zeros(4, 0)), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer class ids"):
        labels_to_ids(torch.rand(5))
    with pytest.raises(ValueError, match="multi-hot"):
        labels_to_ids(torch.zeros(2, 3, 4))


def test_sync_free_grouping_equals_unique():
    # The CUDA path of labels_to_ids; it is plain torch, so it is checked here on the CPU.
    from acelora.ops.infonce import _group_rows_sync_free

    for labels in ((torch.rand(200, 14) < 0.1).float(), torch.randint(-1, 2, (57, 5)),
                   (torch.rand(9, 1) < 0.5), torch.randint(0, 3, (1, 4)).float()):
        ids = _group_rows_sync_free(labels)
        _, want = torch.unique(labels, dim=0, return_inverse=True)
        assert ids.dtype == torch.long and ids.shape == (labels.shape[0],)
        assert torch.equal(ids, want)  # both number the groups in lexicographic order


def test_gradcheck_including_logit_scale():
    image, text = _embeddings(7, 5, requires_grad=True)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])
    assert torch.autograd.gradcheck(
        lambda i, t, s: label_guided_infonce_reference(i, t, s, labels), (image, text, scale))
    assert torch.autograd.gradgradcheck(
        lambda i, t, s: label_guided_infonce_reference(i, t, s, None), (image, text, scale))


def test_auto_backend_uses_the_reference_on_cpu():
    image, text = _embeddings(6, 4, dtype=torch.float32)
    assert _backend.resolve("label_guided_infonce", "auto", image.device) == "reference"
    labels = torch.randint(0, 2, (6,))
    out = label_guided_infonce(image, text, 4.0, labels)
    assert torch.equal(out, label_guided_infonce_reference(image, text, 4.0, labels))
    with pytest.raises(ValueError, match="backend must be one of"):
        label_guided_infonce(image, text, 4.0, labels, backend="fast")


def test_bad_inputs_raise_clear_errors():
    image, text = _embeddings(6, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="batch sizes differ"):
        label_guided_infonce(image, text[:5], 1.0)
    with pytest.raises(ValueError, match="embedding sizes differ"):
        label_guided_infonce(image, text[:, :3], 1.0)
    with pytest.raises(ValueError, match=r"must be \[B, D\]"):
        label_guided_infonce(image[0], text[0], 1.0)
    with pytest.raises(ValueError, match="labels have 5 rows"):
        label_guided_infonce(image, text, 1.0, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="labels have 5 rows"):
        label_guided_infonce(image, text, 1.0, torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="dtypes differ"):
        label_guided_infonce(image, text.double(), 1.0)
    with pytest.raises(TypeError, match="floating point"):
        label_guided_infonce(image.long(), text.long(), 1.0)
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        label_guided_infonce(image, text, torch.ones(2))
    with pytest.raises(ValueError, match="empty"):
        label_guided_infonce(image[:0], text[:0], 1.0)
    # Devices differ ("meta" stands in for a second device on a CPU-only machine).
    with pytest.raises(ValueError, match="text_emb on meta"):
        label_guided_infonce(image, text.to("meta"), 1.0)
    with pytest.raises(ValueError, match="labels are on meta"):
        label_guided_infonce(image, text, 1.0, torch.zeros(6, 2, device="meta"))
    with pytest.raises(ValueError, match="logit_scale is on meta"):
        label_guided_infonce(image, text, torch.tensor(1.0, device="meta"))
