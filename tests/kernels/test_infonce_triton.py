"""The fused Triton label-guided InfoNCE (TRITON_INTERPRET=1 on CPU tensors) against the float64
reference, forward and backward; interpreter tiles are 16 wide, so B=21 and D=24 leave ragged tiles."""
import pytest
import torch
import torch.nn.functional as F

from acelora.kernels import infonce as kernels
from acelora.ops import label_guided_infonce, label_guided_infonce_reference
from acelora.testing import rel_err

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # bf16: the gradients are stored in bf16


def _inputs(b, d, dtype, labels_kind, scale=8.0):
    image = F.normalize(torch.randn(b, d), dim=-1).to(dtype).requires_grad_()
    text = F.normalize(torch.randn(b, d), dim=-1).to(dtype).requires_grad_()
    logit_scale = torch.tensor(scale, requires_grad=True)
    if labels_kind == "multi_hot":
        labels = (torch.rand(b, 3) < 0.4).float()
    elif labels_kind == "ids":
        labels = torch.randint(0, 3, (b,))
    else:
        labels = None
    return image, text, logit_scale, labels


def _float64_reference(image, text, logit_scale, labels):
    leaves = [x.detach().double().requires_grad_() for x in (image, text, logit_scale)]
    loss = label_guided_infonce_reference(*leaves, labels)
    loss.backward()
    return loss, [x.grad for x in leaves]


def _check_against_reference(image, text, logit_scale, labels, dtype):
    loss = label_guided_infonce(image, text, logit_scale, labels, backend="triton")
    loss.backward()
    ref_loss, ref_grads = _float64_reference(image, text, logit_scale, labels)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert rel_err(loss, ref_loss) < 1e-5
    grads = [image.grad, text.grad, logit_scale.grad]
    assert image.grad.dtype == dtype and text.grad.dtype == dtype
    for name, g, ref in zip(("image", "text", "logit_scale"), grads, ref_grads):
        assert rel_err(g, ref) < TOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,d,labels_kind", [(21, 24, "multi_hot"), (32, 16, "ids"), (19, 40, None)])
def test_forward_backward_match_float64_reference(b, d, labels_kind, dtype):
    _check_against_reference(*_inputs(b, d, dtype, labels_kind), dtype)


def test_large_logit_scale_is_stable():
    # s = 100 (CLIP's clamp): logits up to ±100 must not overflow the online log-sum-exp.
    image, text, scale, labels = _inputs(18, 20, torch.float32, "ids", scale=100.0)
    _check_against_reference(image, text, scale, labels, torch.float32)


def test_batch_of_one():
    image, text, scale, _ = _inputs(1, 8, torch.float32, None)
    loss = label_guided_infonce(image, text, scale, torch.ones(1, 3), backend="triton")
    loss.backward()
    assert abs(loss.item()) < 1e-6  # the only logit is the positive one
    for g in (image.grad, text.grad, scale.grad):
        assert g.abs().max().item() < 1e-6


def test_all_labels_equal_gives_zero_loss():
    image, text, scale, _ = _inputs(20, 16, torch.float32, None)
    loss = label_guided_infonce(image, text, scale, torch.zeros(20, dtype=torch.long), backend="triton")
    loss.backward()
    assert abs(loss.item()) < 1e-5
    assert image.grad.abs().max().item() < 1e-5 and scale.grad.abs().item() < 1e-5


def test_float_scale_and_partial_gradients():
    image, text, _, labels = _inputs(17, 12, torch.float32, "multi_hot")
    text = text.detach()  # only the image tower is trained here
    loss = label_guided_infonce(image, text, 5.0, labels, backend="triton")
    loss.backward()
    _, ref_grads = _float64_reference(image, text, torch.tensor(5.0), labels)
    assert text.grad is None
    assert rel_err(image.grad, ref_grads[0]) < 1e-5


def test_non_contiguous_inputs():
    # Strided views are read in place (row stride) or copied (feature stride), never misread.
    b, d = 18, 20
    labels = torch.randint(0, 4, (b,))
    views = {
        "every_other_feature": lambda base: base[:, ::2],                  # stride (2d, 2)
        "column_major": lambda base: base[:, :2 * d].reshape(b, d, 2)[..., 0].T.contiguous().T,
        "row_stride": lambda base: base[:, :d],                            # stride (2d, 1)
    }
    for name, view in views.items():
        base_i = (0.3 * torch.randn(b, 2 * d)).requires_grad_()  # unnormalised is fine for the op
        base_t = 0.3 * torch.randn(b, 2 * d)
        raw_i, raw_t = view(base_i), view(base_t)
        assert not raw_i.is_contiguous(), name
        got = label_guided_infonce(raw_i, raw_t, 6.0, labels, backend="triton")
        got.backward()
        ref_base = base_i.detach().double().requires_grad_()
        want = label_guided_infonce_reference(view(ref_base), view(base_t.double()), 6.0, labels)
        want.backward()
        assert rel_err(got, want) < 1e-5, name
        assert rel_err(base_i.grad, ref_base.grad) < 1e-5, name


def test_lse_kernel_rows_and_columns():
    # The kernel's row LSE of s·A·Bᵀ, called with (I, T) and (T, I), gives both directions.
    b, d = 23, 18
    image, text, _, _ = _inputs(b, d, torch.float32, None)
    ids = torch.randint(0, 3, (b,))
    scale = torch.tensor([4.0])
    logits = 4.0 * image.detach().double() @ text.detach().double().T
    masked = (ids[:, None] == ids[None, :]) & ~torch.eye(b, dtype=torch.bool)
    logits = logits.masked_fill(masked, float("-inf"))
    lse_rows, diag = kernels.infonce_lse(image.detach(), text.detach(), scale, ids)
    lse_cols, _ = kernels.infonce_lse(text.detach(), image.detach(), scale, ids)
    assert rel_err(lse_rows, logits.logsumexp(1)) < 1e-6
    assert rel_err(lse_cols, logits.logsumexp(0)) < 1e-6
    assert rel_err(diag, (image.detach().double() * text.detach().double()).sum(-1)) < 1e-6


def test_bad_inputs():
    image, text, scale, _ = _inputs(8, 8, torch.float32, None)
    with pytest.raises(TypeError, match="triton backend takes"):
        label_guided_infonce(image.double(), text.double(), 1.0, backend="triton")
    # "auto" routes float64 to the reference instead of failing.
    assert label_guided_infonce(image.double(), text.double(), 1.0).dtype == torch.float64
    with pytest.raises(ValueError, match="batch sizes differ"):
        label_guided_infonce(image, text[:7], scale, backend="triton")
    with pytest.raises(ValueError, match="embedding sizes differ"):
        label_guided_infonce(image, text[:, :7], scale, backend="triton")
    with pytest.raises(ValueError, match="labels have 7 rows"):
        label_guided_infonce(image, text, scale, torch.zeros(7, 2), backend="triton")
    with pytest.raises(ValueError, match="labels are on meta"):
        label_guided_infonce(image, text, scale, torch.zeros(8, device="meta", dtype=torch.long),
                             backend="triton")
    with pytest.raises(ValueError, match="text_emb on meta"):
        label_guided_infonce(image, text.to("meta"), scale, backend="triton")
    with pytest.raises(TypeError, match="dtypes differ"):
        label_guided_infonce(image, text.bfloat16(), scale, backend="triton")
