"""The fused Triton label-guided InfoNCE (TRITON_INTERPRET=1 on CPU tensors) against the float64
reference, forward and backward; interpreter tiles are 16 wide, so B=21 and D=24 leave ragged tiles."""
import pytest
import torch
import torch.nn.functional as F

from acelora.kernels import configs
from acelora.kernels import infonce as kernels
from acelora.ops import label_guided_infonce, label_guided_infonce_reference
from acelora.testing import rel_err

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}  # bf16: the gradients are stored in bf16


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


def test_half_precision_inputs():
    _check_against_reference(*_inputs(20, 24, torch.float16, "ids"), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_of_one(dtype):
    image, text, scale, _ = _inputs(1, 8, dtype, None)
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


@pytest.mark.parametrize("b", [23, 40])
def test_forward_kernel_rows_and_columns(b):
    # One pass gives both directions' log-sum-exps; with all rows of a 16-row block sharing a
    # label, some column partials are entirely masked (-inf) and must fold away cleanly.
    d = 18
    image, text, _, _ = _inputs(b, d, torch.float32, None)
    ids = torch.randint(0, 3, (b,))
    ids[:16] = 7
    scale = torch.tensor([4.0])
    logits = 4.0 * image.detach().double() @ text.detach().double().T
    masked = (ids[:, None] == ids[None, :]) & ~torch.eye(b, dtype=torch.bool)
    logits = logits.masked_fill(masked, float("-inf"))
    lse_rows, lse_cols, diag = kernels.infonce_fwd(image.detach(), text.detach(), scale, ids)
    assert rel_err(lse_rows, logits.logsumexp(1)) < 1e-6
    assert rel_err(lse_cols, logits.logsumexp(0)) < 1e-6
    assert rel_err(diag, (image.detach().double() * text.detach().double()).sum(-1)) < 1e-6
    assert torch.isfinite(lse_cols).all() and torch.isfinite(lse_rows).all()


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
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        label_guided_infonce(image, text, torch.ones(3), backend="triton")


def test_logit_scale_shape_and_dtype_are_kept():
    # A [1]-shaped bf16 multiplier (e.g. a parameter stored in half precision) gets its gradient
    # back in that shape and dtype.
    image, text, _, labels = _inputs(13, 10, torch.float32, "ids")
    scale = torch.tensor([7.0], dtype=torch.bfloat16, requires_grad=True)
    label_guided_infonce(image, text, scale, labels, backend="triton").backward()
    _, ref_grads = _float64_reference(image, text, scale, labels)
    assert scale.grad.shape == (1,) and scale.grad.dtype == torch.bfloat16
    assert rel_err(scale.grad, ref_grads[2]) < 1e-2


def test_gpu_column_chunking_covers_every_column(monkeypatch):
    # The GPU launch plan, checked without a GPU: chunks are whole row blocks, cover [0, N) once,
    # and give about two programs per SM when the row blocks alone are too few.
    monkeypatch.setattr(configs, "interpreted", lambda: False)
    monkeypatch.setattr(kernels, "_num_sms", lambda device: 132)
    for n in (1, 100, 1024, 8192, 8193, 65536):
        num_chunks, chunk = kernels._column_chunks(n, kernels.FWD_BLOCK_M, torch.device("cpu"))
        blocks = -(-n // kernels.FWD_BLOCK_M)
        assert chunk % kernels.FWD_BLOCK_M == 0
        assert (num_chunks - 1) * chunk < n <= num_chunks * chunk
        assert blocks * num_chunks >= min(2 * 132, blocks * blocks) or num_chunks == blocks
    assert kernels._column_chunks(65536, kernels.FWD_BLOCK_M, torch.device("cpu"))[0] == 1


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_torch_compile_keeps_the_kernels_whole():
    # The kernels are opaque custom ops: fullgraph=True fails on any graph break.
    b, d = 20, 24
    image, text, scale, _ = _inputs(b, d, torch.float32, None)
    ids = torch.randint(0, 3, (b,))

    def step(i, t, s, y):
        return label_guided_infonce(F.normalize(i, dim=-1), F.normalize(t, dim=-1), s, y,
                                    backend="triton")

    want = torch.autograd.grad(step(image, text, scale, ids), (image, text, scale))
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(image, text, scale, ids), (image, text, scale))
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-6


def test_double_backward_is_refused():
    image, text, scale, labels = _inputs(9, 8, torch.float32, "ids")
    loss = label_guided_infonce(image, text, scale, labels, backend="triton")
    (grad,) = torch.autograd.grad(loss, image, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice|does not require grad"):
        grad.sum().backward()


def test_kernel_wrappers_reject_bad_layouts():
    a = torch.randn(8, 6)
    scale = torch.tensor([1.0])
    with pytest.raises(ValueError, match="unit stride"):
        kernels.infonce_fwd(a.T.contiguous().T, a, scale)
    with pytest.raises(ValueError, match="one shape"):
        kernels.infonce_fwd(a, a[:7], scale)
    with pytest.raises(TypeError, match="one dtype"):
        kernels.infonce_fwd(a, a.bfloat16(), scale)
    with pytest.raises(ValueError, match="ids must be"):
        kernels.infonce_fwd(a, a, scale, torch.zeros(8))


# ---------------------------------------------------------------------------------------------
# Compiled kernels on a GPU (skipped on the CPU).

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_auto_picks_triton_for_cuda_tensors():
    from acelora.ops import _backend
    assert _backend.resolve("label_guided_infonce", "auto", torch.device("cuda")) == "triton"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,d", [(1000, 512), (4097, 200)])
def test_gpu_matches_float64_reference(b, d, dtype):
    image, text, scale, labels = _inputs(b, d, dtype, "multi_hot", scale=14.3)
    image, text = [x.detach().cuda().requires_grad_() for x in (image, text)]
    scale = scale.detach().cuda().requires_grad_()
    labels = (torch.rand(b, 14) < 0.08).float().cuda()
    loss = label_guided_infonce(image, text, scale, labels)  # auto -> triton
    loss.backward()
    ref_loss, ref_grads = _float64_reference(image, text, scale, labels)
    assert rel_err(loss, ref_loss) < 1e-4
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3  # fp32 may run on TF32 tensor cores
    for g, ref in zip((image.grad, text.grad, scale.grad), ref_grads):
        assert rel_err(g, ref) < tol


@needs_cuda
def test_gpu_batch_65536_fits_in_one_gib():
    b, d = 65536, 512
    image = F.normalize(torch.randn(b, d, device="cuda"), dim=-1).bfloat16().requires_grad_()
    text = F.normalize(torch.randn(b, d, device="cuda"), dim=-1).bfloat16().requires_grad_()
    scale = torch.tensor(14.3, device="cuda", requires_grad=True)
    labels = (torch.rand(b, 14, device="cuda") < 0.08).float()
    label_guided_infonce(image, text, scale, labels).backward()  # compile / autotune first
    image.grad = text.grad = scale.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = label_guided_infonce(image, text, scale, labels)
    loss.backward()
    torch.cuda.synchronize()
    assert torch.isfinite(loss) and torch.isfinite(image.grad.float()).all()
    assert torch.cuda.max_memory_allocated() - base < 2**30
