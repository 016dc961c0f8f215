"""The training step's forward has no host syncs and no torch.compile graph breaks (issue 7).

CUDA-free proxy: a piece that needs a device->host read (``.item()``, ``bool(t)``, ``tolist()``)
or has a data-dependent output shape (``torch.unique``) cannot be traced by dynamo with
``fullgraph=True``; backend "eager" keeps these tests fast (no code generation).
"""
import pytest
import torch

import acelora
from acelora.ops import hypergraph as hg
from acelora.ops.infonce import labels_to_ids

torch._dynamo.config.cache_size_limit = 64  # several small functions compiled in one process


def _fullgraph(fn):
    torch._dynamo.reset()
    return torch.compile(fn, backend="eager", fullgraph=True)


def _graph_breaks(fn, *args):
    # explain() counts breaks that fullgraph=True may paper over (it can capture some
    # dynamic-shape ops, e.g. unique, that a default compile breaks on).
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args)
    return [str(r.reason).splitlines()[0] for r in explained.break_reasons]


def _same_rows_naive(labels):
    b = labels.shape[0]
    return torch.tensor([[bool(torch.equal(labels[i], labels[j])) for j in range(b)] for i in range(b)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.int64])
def test_labels_to_ids_compiles_fullgraph_and_is_exact(dtype):
    g = torch.Generator().manual_seed(1)
    labels = (torch.rand(24, 14, generator=g) < 0.15)
    labels[::3] = labels[0]  # many identical rows ("No Finding")
    labels = labels.to(dtype)
    assert _graph_breaks(lambda x: labels_to_ids(x) * 2, labels) == []
    ids = _fullgraph(labels_to_ids)(labels)
    same = ids[:, None] == ids[None, :]
    assert torch.equal(same, _same_rows_naive(labels))
    # the compiled (sort-based) ids are the eager (unique-based) ids, not just the same grouping
    assert torch.equal(ids, labels_to_ids(labels))


def test_sort_grouping_matches_unique_on_general_values():
    from acelora.ops.infonce import _group_rows_sync_free

    g = torch.Generator().manual_seed(2)
    for b, l, v in ((1, 3, 2), (7, 1, 3), (50, 14, 3), (200, 5, 2)):
        labels = (torch.randint(0, v, (b, l), generator=g) - 1).float()  # -1/0/1 (uncertain)
        _, ref = torch.unique(labels, dim=0, return_inverse=True)
        assert torch.equal(_group_rows_sync_free(labels), ref)


def test_topk_check_compiles_and_still_fails_on_bad_masks():
    x = torch.randn(3, 9, 4, dtype=torch.float64)
    a = torch.rand(3, 8, dtype=torch.float64)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[1, 6:] = True  # 6 vertices: 4 candidates

    def f(x, a, m):
        return hg.hypergraph_conv(x, a, torch.tanh, torch.tanh, topk=4, key_padding_mask=m,
                                  global_only=True, backend="reference")

    assert _graph_breaks(f, x, a, mask) == []
    out = _fullgraph(f)(x, a, mask)
    assert torch.allclose(out, f(x, a, mask))
    bad = mask.clone()
    bad[2, 5:] = True  # 5 vertices: only 3 candidates
    with pytest.raises(ValueError, match="sample 2 has 5 vertices"):  # eager CPU: exact error
        f(x, a, bad)
    with pytest.raises(RuntimeError, match="topk=4 is larger"):      # compiled: device-side check
        _fullgraph(f)(x, a, bad)
    with pytest.raises(ValueError, match="candidates"):             # static: no data needed
        hg.hypergraph_conv(x, a, torch.tanh, torch.tanh, topk=8, key_padding_mask=mask)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = acelora.create_ace_lora("tiny", config="paper").train()
    texts = ["effusion", "small left pleural effusion with basal atelectasis and cardiomegaly",
             "no acute", "normal chest radiograph without focal consolidation"]
    tok = model.tokenizer(texts)
    images = torch.randn(len(texts), 3, model.image_size, model.image_size)
    labels = torch.tensor([[1, 0, 0], [1, 0, 1], [0, 0, 0], [0, 0, 0]], dtype=torch.float32)
    return model, images, tok, labels


def test_text_padding_mask_matches_naive(tiny):
    model = tiny[0]
    need = model.text_tower.padding_policy.min_vertices
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 12, (16,), generator=g)
    lengths[0] = 11
    mask = (torch.arange(11)[None] < lengths[:, None]).long()
    expected = torch.zeros(16, 11, dtype=torch.bool)
    for i, n in enumerate(lengths.tolist()):
        vertices = max(n, need)  # a short text borrows its first padded positions
        expected[i, vertices:] = True
    assert torch.equal(model.text_tower.vertex_padding(mask), expected)
    assert _graph_breaks(lambda m: model.text_tower.vertex_padding(m).sum(), mask) == []
    assert torch.equal(_fullgraph(model.text_tower.vertex_padding)(mask), expected)


def test_default_forward_has_no_graph_breaks(tiny):
    model, images, tok, labels = tiny
    assert min(tok["attention_mask"].sum(1).tolist()) < model.text_tower.padding_policy.min_vertices  # the short path

    def forward():
        image_emb = model.encode_image(images)
        text_emb = model.encode_text(tok["input_ids"], tok["attention_mask"])
        return model.loss_fn(image_emb, text_emb, model.logit_scale.exp(), labels)

    assert _graph_breaks(forward) == []  # was 9 (padding `if`, topk check, unique)
    torch.manual_seed(5)
    eager = forward()
    torch.manual_seed(5)
    compiled = _fullgraph(forward)()
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6)
