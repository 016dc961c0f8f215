"""Batching: tokenising collator and the classification collate, including bad input."""
import pytest
import torch

from acelora.data.collate import ImageTextCollator, classification_collate


def items(n, size=8, labels=True):
    out = []
    for i in range(n):
        item = {"image": torch.randn(3, size, size), "text": "word " * (i + 2), "path": f"/x/{i}.jpg"}
        if labels:
            item["labels"] = (torch.rand(14) > 0.5).float()
        out.append(item)
    return out


def tokenizer_plain(texts):
    length = max(len(t.split()) for t in texts) + 1
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(texts):
        n = len(t.split()) + 1
        ids[i, :n], mask[i, :n] = torch.arange(1, n + 1), 1
    return {"input_ids": ids, "attention_mask": mask}


def test_image_text_batch():
    batch_items = items(5)
    batch = ImageTextCollator(tokenizer_plain)(batch_items)
    assert torch.equal(batch["images"], torch.stack([i["image"] for i in batch_items]))
    assert torch.equal(batch["labels"], torch.stack([i["labels"] for i in batch_items]))
    assert batch["input_ids"].shape == (5, 7) and batch["attention_mask"].sum(1).tolist() == [3, 4, 5, 6, 7]
    assert batch["paths"] == [f"/x/{i}.jpg" for i in range(5)] and batch["ids"] == batch["paths"]
    assert "labels" not in ImageTextCollator(tokenizer_plain)(items(2, labels=False))


def test_context_length_cut_or_passed_on():
    cut = ImageTextCollator(tokenizer_plain, context_length=4)(items(5))
    assert cut["input_ids"].shape == (5, 4) and cut["attention_mask"][1:].all()
    seen = {}

    def tokenizer_with_length(texts, context_length=None):
        seen["context_length"] = context_length
        return tokenizer_plain(texts)

    ImageTextCollator(tokenizer_with_length, context_length=6)(items(2))
    assert seen["context_length"] == 6
    ImageTextCollator(tokenizer_with_length)(items(2))
    assert seen["context_length"] is None  # the tokenizer's own default


def test_bad_batches():
    collate = ImageTextCollator(tokenizer_plain)
    with pytest.raises(ValueError, match="empty batch"):
        collate([])
    mixed = items(2)
    mixed[1]["image"] = torch.randn(3, 9, 9)
    with pytest.raises(ValueError, match="differ in shape"):
        collate(mixed)
    with pytest.raises(KeyError, match="text"):
        collate([{"image": torch.zeros(3, 2, 2), "label": 1}])
    with pytest.raises(KeyError, match="attention_mask"):
        ImageTextCollator(lambda t: {"input_ids": torch.zeros(len(t), 3, dtype=torch.long)})(items(2))
    with pytest.raises(ValueError, match="expected"):
        ImageTextCollator(lambda t: {"input_ids": torch.zeros(1, 3), "attention_mask": torch.zeros(1, 3)})(items(2))
    with pytest.raises(ValueError, match="context_length"):
        ImageTextCollator(tokenizer_plain, context_length=0)
    with pytest.raises(TypeError, match="callable"):
        ImageTextCollator("bert")


def test_classification_collate():
    batch = [{"image": torch.randn(3, 4, 4), "label": i % 2, "id": str(i), "path": f"{i}.dcm",
              "boxes": torch.rand(i, 4), "mask": torch.rand(4, 4) > 0.5} for i in range(3)]
    out = classification_collate(batch)
    assert out["images"].shape == (3, 3, 4, 4) and out["labels"].tolist() == [0, 1, 0]
    assert out["labels"].dtype == torch.long and [len(b) for b in out["boxes"]] == [0, 1, 2]
    assert out["masks"].dtype == torch.bool and torch.equal(out["masks"][2], batch[2]["mask"])
    assert out["ids"] == ["0", "1", "2"] and out["paths"] == ["0.dcm", "1.dcm", "2.dcm"]
    with pytest.raises(ValueError, match="empty"):
        classification_collate([])
