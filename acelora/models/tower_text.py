"""Text towers: an HF BERT with a projection, CLS pooled (BiomedCLIP's open_clip ``HFTextEncoder``;
CT-CLIP's ``text_transformer`` + ``to_text_latent``), and open_clip's native causal
``TextTransformer`` (OpenAI-style CLIPs; EOT pooled). For the EOT-pooled tower the pooled token is
moved to index 0 and the positions after it are padding."""
from __future__ import annotations

import torch
from torch import nn

from acelora.models.towers import TextTower, TowerOutput, run_blocks


class HFBertTower(TextTower):
    """An HF ``BertModel`` pooled on its CLS token's last hidden state, ``proj`` applied to the
    tokens: open_clip's ``HFTextEncoder`` (``from_open_clip``) or CT-CLIP's ``text_transformer``
    with ``to_text_latent``."""

    name = "hf-bert"

    def __init__(self, bert: nn.Module, proj: nn.Module, context_length: int):
        layers = getattr(getattr(bert, "encoder", None), "layer", None)
        if layers is None or len(layers) == 0 or not all(hasattr(l, "attention") for l in layers):
            raise TypeError("the text tower must be a BERT model (encoder.layer[i].attention.self)")
        self.bert, self.proj = bert, proj
        self._context_length = int(context_length)

    @classmethod
    def from_open_clip(cls, text: nn.Module, context_length: int) -> "HFBertTower":
        """The tower of an open_clip ``HFTextEncoder`` over a BERT (BiomedCLIP)."""
        bert = getattr(text, "transformer", None)
        if getattr(getattr(bert, "encoder", None), "layer", None) is None:
            raise TypeError("the text tower must be an open_clip HFTextEncoder over a BERT model "
                            "(text.transformer.encoder.layer[i].attention.self)")
        pooler = type(getattr(text, "pooler", None)).__name__
        if pooler != "ClsLastHiddenStatePooler" and not (
                pooler == "ClsPooler" and getattr(bert, "pooler", None) is None):
            raise ValueError(f"only CLS-token pooled HF text towers are supported (pooler {pooler})")
        return cls(bert, text.proj, context_length)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return hasattr(getattr(getattr(model, "text", None), "transformer", None), "encoder")

    def attention_slots(self):
        return [(l.attention, "self") for l in self.bert.encoder.layer]

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def pad_token_id(self) -> int:
        return int(self.bert.config.pad_token_id or 0)

    @property
    def device(self):
        return self.bert.embeddings.word_embeddings.weight.device

    def describe(self) -> dict:
        c = self.bert.config
        return {"tower": self.name, "width": int(c.hidden_size), "depth": int(c.num_hidden_layers),
                "heads": int(c.num_attention_heads), "vocab_size": int(c.vocab_size),
                "context_length": self.context_length}

    def hashed_tensors(self):
        return {"word_embeddings": self.bert.embeddings.word_embeddings.weight,
                "text_proj": next(p for p in self.proj.parameters())}

    def _hidden(self, input_ids, attention_mask, row_mode):
        h = self.bert.embeddings(input_ids=input_ids)
        mask = attention_mask.bool()[:, None, None, :]      # SDPA: True = attend
        layers = self.bert.encoder.layer
        # transformers 5 layers checkpoint themselves (GradientCheckpointingLayer); 4.x do not.
        ckpt = not hasattr(layers[0], "gradient_checkpointing") and bool(
            getattr(self.bert, "is_gradient_checkpointing", False))
        h = run_blocks(layers[:-1], h, ckpt, attention_mask=mask)
        last = layers[-1]
        if row_mode is None:
            out = last(h, attention_mask=mask)
            return (out[0] if isinstance(out, tuple) else out), None
        sa = last.attention.self
        if not hasattr(sa, "forward_with_row"):
            raise RuntimeError("the attention row needs acelora attention modules in the tower")
        ctx, row = sa.forward_with_row(h, row_mode, mask)
        a = last.attention.output(ctx, h)
        return last.output(last.intermediate(a), a), row

    def __call__(self, input_ids, attention_mask=None, row_mode=None) -> TowerOutput:
        ids, mask = self.fit(*self.check(input_ids, attention_mask))
        h, row = self._hidden(ids, mask, row_mode)
        return TowerOutput(self.proj(h), None if row is None else row[:, 1:],
                           self.vertex_padding(mask))

    def pooled(self, input_ids, attention_mask=None):
        ids, mask = self.check(input_ids, attention_mask)
        h, _ = self._hidden(ids, mask, None)
        return self.proj(h[:, 0])


class OpenCLIPTextTower(TextTower):
    """open_clip's native text transformer: token + learned positions, causal residual blocks
    with ``nn.MultiheadAttention``, ln_final, projection; pooled at the EOT token.

    open_clip's ``CLIP`` class flattens this tower onto the model (``model.transformer``,
    ``model.token_embedding``, ...); ``CustomTextCLIP`` keeps it as ``model.text``.
    """

    name = "open_clip-text"

    def __init__(self, model: nn.Module):
        text = getattr(model, "text", None)
        flat = text is None
        root = model if flat else text
        if not hasattr(root, "token_embedding") or not hasattr(getattr(root, "transformer", None), "resblocks"):
            raise TypeError("not an open_clip native text transformer")
        if getattr(root, "cls_emb", None) is not None:
            raise ValueError("open_clip text towers with an appended CLS embedding (CoCa) are not supported")
        self.root = root
        self.pool_type = getattr(root, "text_pool_type" if flat else "pool_type", "argmax")
        self.eos_id = getattr(root, "text_eos_id" if flat else "eos_id", None)
        if self.pool_type not in ("argmax", "eos"):
            raise ValueError(f"only EOT-pooled open_clip text towers are supported (pool_type "
                             f"{self.pool_type!r})")
        self._pad_id = int(getattr(root, "pad_id", 0) or 0)
        self._context_length = int(model.context_length)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        root = getattr(model, "text", None) or model
        return hasattr(root, "token_embedding") and hasattr(getattr(root, "transformer", None), "resblocks")

    def attention_slots(self):
        return [(b, "attn") for b in self.root.transformer.resblocks]

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def pad_token_id(self) -> int:
        return self._pad_id

    @property
    def device(self):
        return self.root.token_embedding.weight.device

    def describe(self) -> dict:
        blocks = self.root.transformer.resblocks
        return {"tower": self.name, "width": int(self.root.transformer.width), "depth": len(blocks),
                "heads": int(blocks[0].attn.num_heads),
                "vocab_size": int(self.root.token_embedding.num_embeddings),
                "context_length": self.context_length}

    def hashed_tensors(self):
        proj = self.root.text_projection
        return {"word_embeddings": self.root.token_embedding.weight,
                "text_proj": proj.weight if isinstance(proj, nn.Linear) else proj}

    def eot_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "eos":
            return (input_ids == self.eos_id).int().argmax(-1)
        return input_ids.argmax(-1)

    def default_mask(self, input_ids):
        # Real tokens are those up to the EOT (token id 0 is a real BPE token, not only padding).
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return (pos[None] <= self.eot_index(input_ids)[:, None]).long()

    def _hidden(self, input_ids, eot, row_mode):
        r = self.root
        L = input_ids.shape[1]
        cast = r.transformer.get_cast_dtype()
        x = r.token_embedding(input_ids).to(cast) + r.positional_embedding[:L].to(cast)
        causal = r.attn_mask[:L, :L] if r.attn_mask is not None else None
        blocks = r.transformer.resblocks
        x = run_blocks(blocks[:-1], x, bool(r.transformer.grad_checkpointing), attn_mask=causal)
        last = blocks[-1]
        if row_mode is None:
            x, row = last(x, attn_mask=causal), None
        else:
            if not hasattr(last.attn, "forward_with_row"):
                raise RuntimeError("the attention row needs acelora attention modules in the tower")
            mask = None if causal is None else causal.to(x.dtype)
            a, row = last.attn.forward_with_row(last.ln_1(x), row_mode, mask, row_index=eot)
            x = x + last.ls_1(a)
            x = x + last.ls_2(last.mlp(last.ln_2(x)))
        return r.ln_final(x), row

    def _project(self, x):
        proj = self.root.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def __call__(self, input_ids, attention_mask=None, row_mode=None) -> TowerOutput:
        ids, mask = self.check(input_ids, attention_mask)
        eot = self.eot_index(ids)
        ids, mask = self.fit(ids, mask)
        x, row = self._hidden(ids, eot, row_mode)
        # Move the EOT token to index 0: order [eot, 0, ..., eot-1, eot+1, ...]. The real tokens
        # stay a prefix (0..eot), so the padding mask keeps its meaning.
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        e = eot[:, None]
        order = torch.where(pos == 0, e, torch.where(pos <= e, pos - 1, pos))
        tokens = self._project(x)
        tokens = tokens.gather(1, order[..., None].expand(-1, -1, tokens.shape[-1]))
        if row is not None:
            row = row.gather(1, order)[:, 1:]
        return TowerOutput(tokens, row, self.vertex_padding(mask))

    def pooled(self, input_ids, attention_mask=None):
        ids, _ = self.check(input_ids, attention_mask)
        eot = self.eot_index(ids)
        x, _ = self._hidden(ids, eot, None)
        return self._project(x[torch.arange(x.shape[0], device=x.device), eot])


TEXT_TOWERS = (HFBertTower, OpenCLIPTextTower)


def text_tower(model: nn.Module) -> TextTower:
    """The text tower of an open_clip model or a CT-CLIP (first matching type)."""
    from acelora.models.tower_ct import is_ctclip

    if is_ctclip(model):   # CXR-BERT: CLS state -> to_text_latent
        return HFBertTower(model.text_transformer, model.to_text_latent, int(model.context_length))
    if HFBertTower.matches(model):
        return HFBertTower.from_open_clip(model.text, int(model.context_length))
    if OpenCLIPTextTower.matches(model):
        return OpenCLIPTextTower(model)
    text = getattr(model, "text", None)
    raise ValueError(f"unsupported text tower {type(text if text is not None else model).__name__}: "
                     "acelora supports BERT (open_clip HFTextEncoder) and open_clip's native "
                     "text transformer")
