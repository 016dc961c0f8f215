"""The compiled LoRA-QKV extension (csrc/): C++ CPU kernels always, CUDA kernels where a GPU is.

Compared with an independent float64 formulation; dropout masks are replayed from the op's
rng_state so forward and backward can be checked exactly with p > 0.
"""
import importlib

import pytest
import torch

from acelora.ops import _extension

lq = importlib.import_module("acelora.ops.lora_qkv")

pytestmark = pytest.mark.skipif(
    not _extension.cpu_ops_available(),
    reason=f"LoRA-QKV extension not built ({_extension.unavailable_reason()})")
cuda_only = pytest.mark.skipif(not (torch.cuda.is_available() and _extension.cuda_ops_available()),
                               reason="needs a CUDA device and acelora._C_cuda")


def naive(x, weight, bias, A, B, scale, masks=None, p=0.0):
    """y_g = x W_gᵀ + b_g + s·(m_g/(1-p) ⊙ x) A_gᵀ B_gᵀ in float64, one group at a time."""
    x, weight, A, B = (t.double() for t in (x, weight, A, B))
    r, d_out = A.shape[0] // 3, weight.shape[0] // 3
    outs = []
    for g in range(3):
        xg = x if masks is None else x * masks[g].to(x.device).double() / (1 - p)
        y = x @ weight[g * d_out:(g + 1) * d_out].T
        if bias is not None:
            y = y + bias.double()[g * d_out:(g + 1) * d_out]
        outs.append(y + scale * (xg @ A[g * r:(g + 1) * r].T) @ B[g * d_out:(g + 1) * d_out].T)
    return torch.cat(outs, -1)


def make(lead=(3, 11), d_in=32, d_out=24, r=4, dtype=torch.float32, bias=True, device="cpu"):
    g = lambda *s: torch.randn(*s, dtype=torch.float64, device=device)  # noqa: E731
    x = g(*lead, d_in)
    w = g(3 * d_out, d_in) / d_in ** 0.5
    b = g(3 * d_out) if bias else None
    A = g(3 * r, d_in) / d_in ** 0.5
    B = g(3 * d_out, r)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x).requires_grad_(), cast(w), cast(b), cast(A).requires_grad_(), cast(B).requires_grad_()


def rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def grads_naive(x, w, b, A, B, scale, g, masks=None, p=0.0):
    leaves = [t.detach().double().requires_grad_() for t in (x, A, B)]
    out = naive(leaves[0], w, b, leaves[1], leaves[2], scale, masks, p)
    return out, torch.autograd.grad(out, leaves, g.double())


@pytest.mark.parametrize("lead,d_in,r,bias", [((3, 11), 32, 4, True), ((17,), 20, 1, False),
                                             ((2, 2, 5), 40, 5, True)])
@pytest.mark.parametrize("p,training", [(0.0, False), (0.25, True)])
def test_cpu_op_matches_naive_forward_and_backward(lead, d_in, r, bias, p, training):
    x, w, b, A, B = make(lead, d_in=d_in, r=r, bias=bias)
    y, rng = lq.lora_qkv_compiled(x, w, b, A, B, 0.6, p, training, return_rng_state=True)
    masks = lq.lora_qkv_dropout_masks(rng, x.shape, p) if training else None
    g = torch.randn_like(y)
    ref, ref_grads = grads_naive(x, w, b, A, B, 0.6, g, masks, p)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert rel(y, ref) < 1e-5
    for out, r_ in zip(torch.autograd.grad(y, (x, A, B), g), ref_grads):
        assert rel(out, r_) < 1e-5


def test_cpu_op_float64_gradcheck_without_and_with_dropout():
    x, w, b, A, B = make((2, 5), d_in=16, d_out=8, r=2, dtype=torch.float64)
    fn = lambda x, A, B: lq.lora_qkv_compiled(x, w, b, A, B, 0.7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, A, B))

    def dropped(x, A, B):  # same generator state every call -> same masks, so the op is a function
        torch.manual_seed(123)
        return lq.lora_qkv_compiled(x, w, b, A, B, 0.7, 0.3, True)
    assert torch.autograd.gradcheck(dropped, (x, A, B))


def test_cpu_op_bfloat16():
    x, w, b, A, B = make((64,), d_in=64, d_out=32, dtype=torch.bfloat16)
    y = lq.lora_qkv_compiled(x, w, b, A, B, 0.5)
    g = torch.randn_like(y)
    ref, ref_grads = grads_naive(x, w, b, A, B, 0.5, g)
    assert y.dtype == torch.bfloat16 and rel(y, ref) < 2e-2
    for out, r_ in zip(torch.autograd.grad(y, (x, A, B), g), ref_grads):
        assert out.dtype == torch.bfloat16 and rel(out, r_) < 3e-2


def test_frozen_base_gets_no_gradient_and_x_grad_is_optional():
    x, w, b, A, B = make()
    x = x.detach()
    y = lq.lora_qkv_compiled(x, w, b, A, B, 0.5, 0.1, True)
    y.sum().backward()
    assert w.grad is None and b.grad is None and x.grad is None
    assert A.grad is not None and B.grad is not None


def test_p_zero_in_training_is_exactly_no_dropout():
    x, w, b, A, B = make()
    y0 = lq.lora_qkv_compiled(x, w, b, A, B, 0.5, 0.0, True)
    y1 = lq.lora_qkv_compiled(x, w, b, A, B, 0.5, 0.3, False)
    y2 = lq.lora_qkv_compiled(x, w, b, A, B, 0.5)
    assert torch.equal(y0, y2) and torch.equal(y1, y2)
    g = torch.randn_like(y0)
    assert all(torch.equal(a, c) for a, c in zip(torch.autograd.grad(y0, (x, A, B), g),
                                                 torch.autograd.grad(y2, (x, A, B), g)))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_masks_keep_rate_and_independence(p):
    x, w, b, A, B = make((4, 197), d_in=128)
    y, rng = lq.lora_qkv_compiled(x, w, b, A, B, 0.5, p, True, return_rng_state=True)
    m = lq.lora_qkv_dropout_masks(rng, x.shape, p).view(3, -1).double()
    n = m.shape[1]
    tol = 5 * (p * (1 - p) / n) ** 0.5
    for g in range(3):
        assert abs(m[g].mean().item() - (1 - p)) < tol
    for g, h in ((0, 1), (0, 2), (1, 2)):  # independent: P(both kept) = (1-p)²
        assert abs((m[g] * m[h]).mean().item() - (1 - p) ** 2) < tol
    # Along features and tokens too (the 8 lanes of one philox draw must not be correlated).
    mg = m[0].view(-1, 8)
    assert abs((mg[:, 0] * mg[:, 1]).mean().item() - (1 - p) ** 2) < 5 * tol
    # A new call draws new masks; the same generator state replays them.
    _, rng2 = lq.lora_qkv_compiled(x, w, b, A, B, 0.5, p, True, return_rng_state=True)
    assert not torch.equal(rng, rng2)
    torch.manual_seed(7)
    _, rng3 = lq.lora_qkv_compiled(x, w, b, A, B, 0.5, p, True, return_rng_state=True)
    torch.manual_seed(7)
    _, rng4 = lq.lora_qkv_compiled(x, w, b, A, B, 0.5, p, True, return_rng_state=True)
    assert torch.equal(rng3, rng4)


def test_masks_do_not_depend_on_threading():
    rng = torch.tensor([1234567, 89], dtype=torch.int64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lq.lora_qkv_dropout_masks(rng, (300, 24), 0.3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, lq.lora_qkv_dropout_masks(rng, (300, 24), 0.3))


@pytest.mark.parametrize("bad,err,match", [
    (dict(A=lambda A: A.double()), RuntimeError, "dtype mismatch"),
    (dict(w=lambda w: w.half()), RuntimeError, "dtype mismatch"),
    (dict(B=lambda B: B[:, :3]), ValueError, "lora_B must be"),
    (dict(x=lambda x: x[..., :31]), ValueError, "features"),
    (dict(x=lambda x: x.to("meta")), ValueError, "one device"),
])
def test_bad_input_errors_name_the_problem(bad, err, match):
    args = dict(zip("x w b A B".split(), make()))
    for k, f in bad.items():
        args[k] = f(args[k].detach())
    with pytest.raises(err, match=match):
        lq.lora_qkv_compiled(args["x"], args["w"], args["b"], args["A"], args["B"], 0.5)


def test_cpp_checks_direct_calls():
    x, w, b, A, B = (t.detach() for t in make((5,)))
    ops = torch.ops.acelora
    with pytest.raises(RuntimeError, match="lora_B must be"):
        ops.lora_qkv_fwd(x, w, b, A, B[:-1], 0.5, 0.0, False)
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        ops.lora_qkv_fwd(x, w, b, A, B, 0.5, 1.0, True)
    with pytest.raises(RuntimeError, match="2-D"):
        ops.lora_qkv_fwd(x[None], w, b, A, B, 0.5, 0.0, False)
    y, u, rng = ops.lora_qkv_fwd(x, w, b, A, B, 0.5, 0.0, False)
    with pytest.raises(RuntimeError, match="grad_y must be"):
        ops.lora_qkv_bwd(y[:, :-1], x, w, A, B, u, rng, 0.5, 0.0, False, True)
    with pytest.raises(RuntimeError, match="rng_state must be"):
        ops.lora_qkv_bwd(y, x, w, A, B, u, rng.int(), 0.5, 0.1, True, True)


def test_autocast_cpu_bfloat16():
    x, w, b, A, B = make((16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lq.lora_qkv_compiled(x, w, b, A, B, 0.5)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32
    assert rel(y, naive(x, w, b, A, B, 0.5)) < 2e-2


def test_opcheck_and_torch_compile_trace_the_op():
    x, w, b, A, B = make((9,))
    args = (x, w, b, A, B, 0.5, 0.0, False)
    lq._compiled_ops("cpu")
    torch.library.opcheck(torch.ops.acelora.lora_qkv_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))

    def step(x, A, B):
        return lq.lora_qkv_compiled(x, w, b, A, B, 0.5, 0.2, True).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.manual_seed(3)
    loss = compiled(x, A, B)
    grads = torch.autograd.grad(loss, (x, A, B))
    torch.manual_seed(3)
    loss_eager = step(x, A, B)
    grads_eager = torch.autograd.grad(loss_eager, (x, A, B))
    assert torch.allclose(loss, loss_eager, rtol=1e-5)
    for a, c in zip(grads, grads_eager):
        assert torch.allclose(a, c, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ GPU

@cuda_only
@pytest.mark.parametrize("tokens", [64 * 197])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("p,training", [(0.0, False), (0.1, True)])
def test_cuda_full_shape_matches_naive(tokens, dtype, tol, p, training):
    x, w, b, A, B = make((tokens,), d_in=768, d_out=768, r=4, dtype=dtype, device="cuda")
    y, rng = lq.lora_qkv_compiled(x, w, b, A, B, 0.5, p, training, return_rng_state=True)
    masks = lq.lora_qkv_dropout_masks(rng, x.shape, p) if training else None
    g = torch.randn_like(y)
    ref, ref_grads = grads_naive(x, w, b, A, B, 0.5, g, masks, p)
    assert rel(y, ref) < tol
    for out, r_ in zip(torch.autograd.grad(y, (x, A, B), g), ref_grads):
        assert rel(out, r_) < 2 * tol


@cuda_only
@pytest.mark.parametrize("d_in,r", [(20, 4), (64, 6)])   # shapes the fused kernels leave to ATen
def test_cuda_composite_shapes(d_in, r):
    x, w, b, A, B = make((300,), d_in=d_in, r=r, device="cuda")
    y, rng = lq.lora_qkv_compiled(x, w, b, A, B, 0.5, 0.2, True, return_rng_state=True)
    masks = lq.lora_qkv_dropout_masks(rng, x.shape, 0.2)
    g = torch.randn_like(y)
    ref, ref_grads = grads_naive(x, w, b, A, B, 0.5, g, masks, 0.2)
    assert rel(y, ref) < 1e-4
    for out, r_ in zip(torch.autograd.grad(y, (x, A, B), g), ref_grads):
        assert rel(out, r_) < 1e-4


@cuda_only
def test_cuda_and_cpu_masks_agree():
    rng = torch.tensor([987654321, 4242], dtype=torch.int64)
    cpu = lq.lora_qkv_dropout_masks(rng, (257, 40), 0.1)
    gpu = lq.lora_qkv_dropout_masks(rng.cuda(), (257, 40), 0.1)
    assert torch.equal(cpu, gpu.cpu())


@cuda_only
def test_cuda_gradcheck_float64():
    x, w, b, A, B = make((2, 5), d_in=16, d_out=8, r=2, dtype=torch.float64, device="cuda")

    def dropped(x, A, B):
        torch.cuda.manual_seed(5)
        return lq.lora_qkv_compiled(x, w, b, A, B, 0.7, 0.3, True)
    assert torch.autograd.gradcheck(dropped, (x, A, B))


def test_auto_picks_the_cpp_op_and_merged_weight_matches_it():
    from acelora.ops import resolve
    assert resolve("lora_qkv", "auto", torch.device("cpu")) == "cuda"
    x, w, b, A, B = (t.detach() for t in make((6,), dtype=torch.float64))
    merged = lq.merge_lora_qkv_weight(w, A, B, 0.4)
    y = lq.lora_qkv(x, w, b, A, B, 0.4, 0.1, training=False)   # eval: dropout off
    assert rel(torch.nn.functional.linear(x, merged, b), y) < 1e-12
