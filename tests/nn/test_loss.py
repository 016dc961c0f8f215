"""LabelGuidedInfoNCELoss: single process, and two gloo ranks (CPU) against one process on the
whole batch, gradients of the "encoders" and of logit_scale included."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import acelora
from acelora.nn.loss import LabelGuidedInfoNCELoss, gather_features
from acelora.ops import label_guided_infonce_reference
from acelora.testing import infonce_ddp_worker, rel_err


def test_module_is_exported_and_matches_the_op():
    assert acelora.LabelGuidedInfoNCELoss is LabelGuidedInfoNCELoss
    b, d = 10, 6
    image = F.normalize(torch.randn(b, d, dtype=torch.float64), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(b, d, dtype=torch.float64), dim=-1)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    labels = (torch.rand(b, 3) < 0.5).float()
    loss_fn = LabelGuidedInfoNCELoss()
    assert "gather=True" in repr(loss_fn)
    out = loss_fn(image, text, scale, labels)
    want = label_guided_infonce_reference(image, text, scale, labels)
    assert rel_err(out, want) < 1e-14
    # Not distributed: gathering is the identity and keeps the autograd graph.
    assert gather_features(image, text, labels)[0] is image
    out.backward()
    assert image.grad is not None and scale.grad is not None


def test_module_checks_batch_sizes_before_any_collective():
    image, text = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="batch sizes differ"):
        LabelGuidedInfoNCELoss()(image, text, 1.0)
    with pytest.raises(ValueError, match="labels have 3 rows"):
        LabelGuidedInfoNCELoss()(image, image, 1.0, torch.zeros(3, 2))


def _cases():
    g = torch.Generator().manual_seed(1234)
    cases = []
    # (per-rank sizes, label kind): even and ragged splits, multi-hot, ids and no labels.
    for sizes, kind in (([6, 6], "multi_hot"), ([7, 4], "ids"), ([5, 5], None)):
        n, d_in, d = sum(sizes), 9, 5
        labels = None
        if kind == "multi_hot":
            labels = (torch.rand(n, 3, generator=g) < 0.4).float()
        elif kind == "ids":
            labels = torch.randint(0, 3, (n,), generator=g)
        cases.append({
            "sizes": sizes,
            "x_image": torch.randn(n, d_in, generator=g, dtype=torch.float64),
            "x_text": torch.randn(n, d_in, generator=g, dtype=torch.float64),
            "w_image": torch.randn(d, d_in, generator=g, dtype=torch.float64),
            "w_text": torch.randn(d, d_in, generator=g, dtype=torch.float64),
            "logit_scale": torch.tensor(5.0, dtype=torch.float64),
            "labels": labels,
        })
    return cases


def _single_process(case):
    w_image = case["w_image"].clone().requires_grad_()
    w_text = case["w_text"].clone().requires_grad_()
    scale = case["logit_scale"].clone().requires_grad_()
    image = F.normalize(case["x_image"] @ w_image.T, dim=-1)
    text = F.normalize(case["x_text"] @ w_text.T, dim=-1)
    loss = label_guided_infonce_reference(image, text, scale, case["labels"])
    loss.backward()
    return loss.detach(), [w_image.grad, w_text.grad, scale.grad]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_two_gloo_ranks_match_one_process_on_the_whole_batch(tmp_path):
    cases = _cases()
    torch.save(cases, tmp_path / "cases.pt")
    init_file = str(tmp_path / "pg_init")
    mp.spawn(infonce_ddp_worker, args=(2, init_file, str(tmp_path)), nprocs=2, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for index, case in enumerate(cases):
        want_loss, want_grads = _single_process(case)
        assert want_grads[2].abs().item() > 1e-6  # logit_scale gradient is informative
        for rank in range(2):
            got = per_rank[rank][index]
            assert rel_err(got["loss"], want_loss) < 1e-12, (index, rank)
            for name, g, ref in zip(("w_image", "w_text", "logit_scale"), got["grads"], want_grads):
                assert rel_err(g, ref) < 1e-10, (index, rank, name)
    assert not os.path.exists(tmp_path / "rank2.pt")
