"""Zero-shot class embeddings by rule (per-prompt / token-mean) and the recorded logit-scale choice
(DESIGN §9, issue 14): the ``official`` path against an independent float64 implementation of the
public scripts' token-mean rule, defaults per preset, refusals, and the CLI end to end."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import acelora
from eval_fakes import FakeCLIP, TensorItems

from acelora.cli import main
from acelora.data import synthetic
from acelora.eval.zeroshot import (ZeroShotClassifier, class_embeddings, resolve_class_embedding,
                                   resolve_logit_scale, zero_shot_evaluate)
from acelora.testing import rel_err

NAMES = ["atelectasis", "cardiomegaly", "pleural effusion"]
TEMPLATES = ("a chest X-ray image of {c}.", "Findings suggesting {c}.", "there is {c} on this film")
TINY = ["--model", "tiny", "--random-weights"]


def _randomised(model, seed=0):
    """LoRA B and both HGNNs random, so every part of the text path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.lora_modules():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
        for hgnn in (model.image_hgnn, model.text_hgnn):
            for p in hgnn.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def official():
    torch.manual_seed(0)
    return _randomised(acelora.create_ace_lora("tiny", config="official"))


@pytest.fixture(scope="module")
def paper():
    torch.manual_seed(0)
    return _randomised(acelora.create_ace_lora("tiny", config="paper"))


# --- an independent implementation of the public scripts' rule, in float64 -----------------

def _mlp(mlp, x, slope):
    h = F.leaky_relu(x @ mlp.down.weight.double().T + mlp.down.bias.double(), slope)
    return h @ mlp.up.weight.double().T + mlp.up.bias.double()


def _hgnn_global(hgnn, x, a):
    """DESIGN §5 densely for one sample: x [N, D] (as given), a [N-1] -> Out[0] [D]."""
    n = x.shape[0]
    unit = x[1:] / x[1:].norm(dim=-1, keepdim=True)
    s = torch.full((n, n), -math.inf, dtype=torch.float64)
    s[1:, 1:] = unit @ unit.T
    s[0, 1:] = a
    s.fill_diagonal_(-math.inf)
    vals, idx = s.topk(hgnn.topk, dim=-1)
    adj = torch.zeros(n, n, dtype=torch.float64).scatter_(1, idx, vals.softmax(-1))
    adj.fill_diagonal_(1.0)
    adj[1:, 0] = adj[0, 1:]
    edges = _mlp(hgnn.edge_mlp, adj @ x, hgnn.negative_slope)
    return _mlp(hgnn.node_mlp, adj.T @ edges, hgnn.negative_slope)[0]


def token_mean_reference(model, names, templates):
    """Per class, one prompt at a time through a float64 copy of the model: normalise each token,
    average tokens and CLS-attention rows over the templates, HGNN once, normalise."""
    ref = copy.deepcopy(model).double()
    rows = []
    with torch.no_grad():
        for name in names:
            tokens, attn = [], []
            for t in templates:
                batch = ref.tokenizer([t.replace("{c}", name)])
                out = ref.text_features(batch["input_ids"], batch["attention_mask"], cls_attn=True)
                tok = out.tokens[0].double()
                tokens.append(tok / tok.norm(dim=-1, keepdim=True))
                attn.append(out.cls_attn[0].double())
            emb = _hgnn_global(ref.text_hgnn, torch.stack(tokens).mean(0), torch.stack(attn).mean(0))
            rows.append(emb / emb.norm())
    return torch.stack(rows)


def per_prompt_reference(model, names, templates):
    rows = []
    with torch.no_grad():
        for name in names:
            embs = []
            for t in templates:
                batch = model.tokenizer([t.replace("{c}", name)])
                e = model.encode_text(batch["input_ids"], batch["attention_mask"], normalize=False)[0].double()
                embs.append(e / e.norm())
            mean = torch.stack(embs).mean(0)
            rows.append(mean / mean.norm())
    return torch.stack(rows)


# --- class embeddings ----------------------------------------------------------------------

def test_official_default_is_token_mean_and_equals_the_reference(official):
    assert resolve_class_embedding(official) == "token-mean"
    ref = token_mean_reference(official, NAMES, TEMPLATES)
    out = class_embeddings(official, NAMES, TEMPLATES)
    assert out.shape == (len(NAMES), official.embed_dim) and out.dtype == torch.float32
    assert rel_err(out.double(), ref) < 1e-5
    # Batching does not matter: one prompt per batch, a class split across batches, all at once.
    for batch_size in (1, 2, 4, 256):
        assert rel_err(class_embeddings(official, NAMES, TEMPLATES, rule="token-mean",
                                       batch_size=batch_size).double(), ref) < 1e-5


def test_per_prompt_differs_from_token_mean(official):
    per_prompt = class_embeddings(official, NAMES, TEMPLATES, rule="per-prompt")
    assert rel_err(per_prompt.double(), per_prompt_reference(official, NAMES, TEMPLATES)) < 1e-5
    token_mean = class_embeddings(official, NAMES, TEMPLATES, rule="token-mean")
    assert rel_err(per_prompt, token_mean) > 1e-3
    # One template: averaging nothing, both rules refine the same single prompt.
    one = TEMPLATES[:1]
    assert rel_err(class_embeddings(official, NAMES, one, rule="per-prompt"),
                   class_embeddings(official, NAMES, one, rule="token-mean")) < 1e-5


def test_paper_default_is_per_prompt(paper):
    assert resolve_class_embedding(paper) == "per-prompt"
    out = class_embeddings(paper, NAMES, TEMPLATES)
    assert torch.equal(out, class_embeddings(paper, NAMES, TEMPLATES, rule="per-prompt"))
    assert rel_err(out.double(), per_prompt_reference(paper, NAMES, TEMPLATES)) < 1e-5


def test_token_mean_refused_where_undefined(paper, official):
    with pytest.raises(ValueError, match="not defined.*text_padding_as_vertices=False.*use per-prompt"):
        class_embeddings(paper, NAMES, TEMPLATES, rule="token-mean")
    no_hgnn = acelora.create_ace_lora("tiny", config="official", hgnn=False)
    assert resolve_class_embedding(no_hgnn) == "per-prompt"
    with pytest.raises(ValueError, match="no text HGNN"):
        class_embeddings(no_hgnn, NAMES, TEMPLATES, rule="token-mean")
    with pytest.raises(ValueError, match="no text HGNN"):
        ZeroShotClassifier(FakeCLIP(), NAMES, class_embedding="token-mean")
    with pytest.raises(ValueError, match="unknown class-embedding rule"):
        class_embeddings(official, NAMES, TEMPLATES, rule="mean")


def test_token_mean_refused_for_eot_pooled_text_tower():
    from acelora.models.factory import build_open_clip
    from acelora.models.tokenizer import OpenCLIPTokenizer
    from acelora.testing import TOY_OPEN_CLIP_CFG

    base = build_open_clip(copy.deepcopy(TOY_OPEN_CLIP_CFG), name="toy-vit").eval()
    model = acelora.ACELoRAModel(base, OpenCLIPTokenizer(16), None, "official").eval()
    assert model.text_tower.name == "open_clip-text"
    assert resolve_class_embedding(model) == "per-prompt"        # official, but not defined here
    with pytest.raises(ValueError, match="EOT-pooled"):
        class_embeddings(model, NAMES, TEMPLATES, rule="token-mean")
    assert class_embeddings(model, NAMES, TEMPLATES).shape[0] == len(NAMES)


# --- logit scale ---------------------------------------------------------------------------

def test_logit_scale_choice_scales_the_logits_and_is_recorded(official, tmp_path):
    model = copy.deepcopy(official)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(50.0))                   # the checkpoint's own, learned
    base_scale = model.base.logit_scale.exp().item()
    assert resolve_logit_scale(model)[0] == "base"                # official: the base's
    assert resolve_logit_scale(model, "checkpoint")[1].item() == pytest.approx(50.0, rel=1e-6)
    images = torch.randn(6, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        by_base = ZeroShotClassifier(model, NAMES, TEMPLATES, logit_scale="base")
        by_ckpt = ZeroShotClassifier(model, NAMES, TEMPLATES, logit_scale="checkpoint")
        assert by_base.scale.item() == pytest.approx(base_scale, rel=1e-6)
        ratio = by_ckpt.scale.double() / by_base.scale.double()
        assert abs(ratio.item() - 50.0 / base_scale) < 1e-5
        logits_b, logits_c = by_base.logits(images).double(), by_ckpt.logits(images).double()
        probs_b, probs_c = by_base.probs(images).double(), by_ckpt.probs(images).double()
    assert rel_err(logits_c, logits_b * ratio) < 1e-5
    # Exactly a temperature change: p_checkpoint = softmax(ratio * log p_base).
    assert rel_err(probs_c, (ratio * probs_b.log()).softmax(-1)) < 1e-5
    assert rel_err(probs_c, probs_b) > 1e-3

    ds = TensorItems(images, classes=NAMES, label=[0, 1, 2, 0, 1, 2])
    for choice, value in (("base", base_scale), ("checkpoint", 50.0), (None, base_scale)):
        out = tmp_path / str(choice)
        result = zero_shot_evaluate(model, ds, templates=TEMPLATES, out_dir=str(out), logit_scale=choice)
        with open(result["files"]["json"]) as f:
            report = json.load(f)
        assert report["logit_scale_source"] == (choice or "base")
        assert report["logit_scale"] == pytest.approx(value, rel=1e-6)
        assert report["class_embedding"] == "token-mean"
        assert "balanced_accuracy" in report["metric_notes"]


def test_logit_scale_defaults_and_refusals(paper):
    assert resolve_logit_scale(paper)[0] == "checkpoint"
    fake = FakeCLIP()
    assert resolve_logit_scale(fake) == ("checkpoint", pytest.approx(torch.tensor(10.0)))
    with pytest.raises(ValueError, match="no base.logit_scale.*use 'checkpoint'"):
        ZeroShotClassifier(fake, NAMES, logit_scale="base")
    with pytest.raises(ValueError, match="unknown logit scale"):
        resolve_logit_scale(paper, "learned")


# --- the command line, end to end ----------------------------------------------------------

@pytest.fixture(scope="module")
def chexpert(tmp_path_factory):
    root = tmp_path_factory.mktemp("chexpert")
    synthetic.write_chexpert5x200(str(root), n=3, seed=11)
    return str(root)


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory):
    """A checkpoint in the released file's layout (DESIGN §7), sized for the tiny model."""
    g = torch.Generator().manual_seed(5)
    width, dim, hidden, r = 64, 64, 128, 4
    weights = {f"layer_{i}": {p: {"w_lora_A": torch.randn(r, width, generator=g) * 0.1,
                                  "w_lora_B": torch.randn(width, r, generator=g) * 0.1}
                              for p in ("q_proj", "k_proj", "v_proj")} for i in range(4)}
    for tower in ("img", "text"):
        for part in ("edge", "node"):
            weights[f"{tower}_{part}_adapter"] = {
                "down.weight": torch.randn(hidden, dim, generator=g) * 0.3,
                "down.bias": torch.randn(hidden, generator=g) * 0.1,
                "up.weight": torch.randn(dim, hidden, generator=g) * 0.3,
                "up.bias": torch.randn(dim, generator=g) * 0.1}
    weights["logit_scale"] = torch.tensor(40.0)
    path = tmp_path_factory.mktemp("ckpt") / "ACE_LoRA.pt"
    torch.save({"weights": weights, "metadata": {"r": r, "topk": 5}}, path)
    return str(path)


def _zeroshot(chexpert, ckpt, out, *flags):
    assert main(["eval", "zeroshot", *TINY, "--official", ckpt, "--dataset", "chexpert5x200",
                 "--data-root", chexpert, "--out", str(out), *flags]) == 0
    with open(out / "zeroshot_chexpert5x200.json") as f:
        return json.load(f)


def _probs(report_dir):
    with open(report_dir / "zeroshot_chexpert5x200_predictions.csv") as f:
        rows = [line.strip().split(",") for line in f][1:]
    return torch.tensor([[float(v) for v in row[3:]] for row in rows], dtype=torch.float64)


def test_cli_both_flags_on_chexpert_5x200(chexpert, official_ckpt, tmp_path, capsys):
    default = _zeroshot(chexpert, official_ckpt, tmp_path / "default")
    out = capsys.readouterr().out
    assert "class embedding token-mean, logit scale base" in out and "balanced_accuracy" in out
    assert (default["class_embedding"], default["logit_scale_source"]) == ("token-mean", "base")
    assert default["n"] == 15 and len(default["classnames"]) == 5
    base_scale = default["logit_scale"]
    assert base_scale == pytest.approx(1 / 0.07, rel=1e-5)      # open_clip's initial scale

    explicit = _zeroshot(chexpert, official_ckpt, tmp_path / "explicit",
                         "--class-embedding", "token-mean", "--logit-scale", "base")
    assert rel_err(_probs(tmp_path / "explicit"), _probs(tmp_path / "default")) < 1e-6

    ckpt = _zeroshot(chexpert, official_ckpt, tmp_path / "ckpt", "--logit-scale", "checkpoint")
    assert ckpt["logit_scale_source"] == "checkpoint"
    assert ckpt["logit_scale"] == pytest.approx(40.0, rel=1e-5)  # stored as the multiplier
    ratio = ckpt["logit_scale"] / base_scale
    expected = (ratio * _probs(tmp_path / "default").log()).softmax(-1)
    assert rel_err(_probs(tmp_path / "ckpt"), expected) < 1e-4    # CSV keeps 6 decimals

    per_prompt = _zeroshot(chexpert, official_ckpt, tmp_path / "pp", "--class-embedding", "per-prompt")
    assert per_prompt["class_embedding"] == "per-prompt" and per_prompt["logit_scale_source"] == "base"
    assert rel_err(_probs(tmp_path / "pp"), _probs(tmp_path / "default")) > 1e-3
    for report in (default, explicit, ckpt, per_prompt):
        assert 0.0 <= report["accuracy"] <= 1.0 and 0.0 <= report["balanced_accuracy"] <= 1.0


def test_cli_refuses_token_mean_on_the_paper_preset(chexpert, tmp_path, capsys):
    assert main(["eval", "zeroshot", *TINY, "--preset", "paper", "--dataset", "chexpert5x200",
                 "--data-root", chexpert, "--out", str(tmp_path / "o"),
                 "--class-embedding", "token-mean"]) == 2
    assert "token-mean class embedding is not defined" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "zeroshot", *TINY, "--dataset", "chexpert5x200", "--data-root", chexpert,
              "--out", str(tmp_path / "o"), "--logit-scale", "learned"])


def test_predict_records_the_choices(official_ckpt, tmp_path, capsys):
    from PIL import Image
    import numpy as np

    png = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((48, 40)) * 255).astype(np.uint8)).save(png)
    assert main(["predict", str(png), *TINY, "--official", official_ckpt, "--classes", "edema",
                 "pneumonia", "--json", "--logit-scale", "checkpoint"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["class_embedding"], out["logit_scale_source"]) == ("token-mean", "checkpoint")
    assert sum(out["predictions"][0]["probs"].values()) == pytest.approx(1.0, abs=1e-5)
