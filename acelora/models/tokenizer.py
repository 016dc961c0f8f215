"""Text tokenization: a thin wrapper over a HuggingFace BERT tokenizer, and a WordPiece vocabulary
generated offline for the tiny test/demo model.

``tokenizer(texts) -> {"input_ids": [B, L] long, "attention_mask": [B, L] long}``, padded on the
right to the batch's longest sequence and truncated to the context length (CLS at position 0, as
the text tower's CLS pooler and the HGNN's global node expect).
"""
from __future__ import annotations

import os
import string
from typing import Iterable, Sequence

import torch

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Words of chest radiology reports and prompts; enough that typical report sentences tokenize into
# whole words rather than characters. Anything else falls back to wordpieces / characters.
_MEDICAL_WORDS = """
a an the of and or in on at to with without no not is are was were be been has have there this that
these those it its as by for from than then which who also may can could should would will seen
noted new old stable unchanged improved improving worsening worsened increased decreased since prior
previous comparison compared study studies exam examination image images view views pa ap lateral
portable upright supine frontal chest x ray xray radiograph radiographs film films findings finding
impression history indication technique report clinical patient patients evidence suggest suggests
suggesting suggestive consistent concerning concern likely possible possibly probable probably
cannot excluded exclude excluding represent represents representing due secondary related
normal abnormal abnormality abnormalities clear clearer well small large larger smaller mild
moderate severe minimal trace tiny subtle marked extensive diffuse focal patchy streaky linear
left right bilateral bilaterally unilateral upper lower middle mid base bases basilar apex apical
apices hilar hila hilum perihilar retrocardiac costophrenic angle angles hemidiaphragm
hemidiaphragms diaphragm lung lungs pulmonary lobe lobes lobar segment segmental zone zones field
fields parenchyma parenchymal airspace airspaces interstitial interstitium vascular vasculature
vessels heart cardiac cardiomediastinal mediastinal mediastinum silhouette contour contours size
enlarged enlargement cardiomegaly borderline top aorta aortic arch tortuous calcified calcification
calcifications atherosclerotic trachea tracheal bronchial bronchi airway pleural pleura effusion
effusions fluid thickening pneumothorax pneumothoraces pneumonia infection infectious aspiration
atelectasis atelectatic collapse consolidation consolidative opacity opacities opacification
density densities edema congestion congestive overload vascular cephalization kerley lines line
nodule nodules nodular mass masses lesion lesions granuloma granulomas scarring scar fibrosis
fibrotic emphysema hyperinflated hyperinflation hyperexpanded copd cyst cavity cavitary fracture
fractures fractured rib ribs clavicle spine thoracic degenerative osseous bony structures soft
tissue tissues subcutaneous emphysema support device devices tube tubes catheter catheters
endotracheal nasogastric orogastric enteric feeding picc central venous pacemaker pacer leads
lead wire wires sternotomy surgical clips valve replacement stent port tip terminates terminating
projects projecting overlying overlies courses coursing positioned position appropriate
appropriately placement placed removed removal interval change changes resolved resolution
persistent persists residual acute chronic process processes disease airspace free air gas
contrast within beyond above below along adjacent posterior anterior medial superior inferior
known underlying component components pattern appearance appears appear demonstrate demonstrates
demonstrated identified visualized evaluated assessed obscured obscuring blunting blunted
elevation elevated low volumes volume lung volumes poor inspiration inspiratory effort rotation
rotated limited evaluation no acute cardiopulmonary process negative positive free air
mediastinal widening widened hernia hiatal granulomatous disease metastatic metastasis
metastases cancer carcinoma tumor neoplasm malignancy lymph node nodes lymphadenopathy
one two three four five cm mm approximately measuring measures
""".split()

# Frequent English/medical suffixes as wordpieces.
_WORDPIECES = """
s es ed ing al ic ity ation ations ly er ers ment ments ous ive ial ia ism ist ness able ible ar
ary ory ent ence ant ance um us is ae ata oma omas itis osis emia ectomy otomy ology ologic logy
""".split()


def generate_vocabulary(extra_words: Iterable[str] = ()) -> list[str]:
    """The tiny model's WordPiece vocabulary: specials, single characters (as word starts and as
    ``##`` continuations, so every lowercase ASCII text tokenizes), medical words, wordpieces."""
    vocab: list[str] = list(SPECIAL_TOKENS)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab += list(chars)
    vocab += ["##" + c for c in string.ascii_lowercase + string.digits]
    vocab += ["##" + p for p in _WORDPIECES]
    vocab += list(_MEDICAL_WORDS) + [w.lower() for w in extra_words]
    seen: set[str] = set()
    return [t for t in vocab if not (t in seen or seen.add(t))]


def build_wordpiece_tokenizer(vocab: Sequence[str], lowercase: bool = True):
    """A ``BertTokenizerFast`` over ``vocab`` built in memory (no files, no network)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import BertTokenizerFast

    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"vocabulary lacks the special token(s) {missing}")
    ids = {token: i for i, token in enumerate(vocab)}
    backend = Tokenizer(WordPiece(ids, unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    return BertTokenizerFast(tokenizer_object=backend, do_lower_case=lowercase,
                             unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]")


def check_texts(texts: str | Sequence[str]) -> list[str]:
    """A non-empty list of strings (one string is a batch of one)."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to tokenize")
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must be strings, got {sorted(set(bad))}")
    return texts


class TextTokenizer:
    """Callable tokenizer of a text tower: texts -> padded ``input_ids`` and ``attention_mask``."""

    def __init__(self, hf_tokenizer, context_length: int):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (CLS and SEP), got {context_length}")
        self.hf_tokenizer = hf_tokenizer
        self.context_length = int(context_length)

    @property
    def pad_token_id(self) -> int:
        return int(self.hf_tokenizer.pad_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self.hf_tokenizer)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None
                 ) -> dict[str, torch.Tensor]:
        texts = check_texts(texts)
        max_length = int(context_length or self.context_length)
        enc = self.hf_tokenizer(texts, padding="longest", truncation=True, max_length=max_length,
                                return_tensors="pt", return_token_type_ids=False)
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}

    def save(self, directory: str | os.PathLike) -> None:
        """Write the HuggingFace tokenizer files (vocab.txt, tokenizer.json, ...)."""
        directory = os.fspath(directory)
        self.hf_tokenizer.save_pretrained(directory)
        vocab_file = os.path.join(directory, "vocab.txt")
        if not os.path.exists(vocab_file):  # tokenizers built in memory only write tokenizer.json
            by_id = sorted(self.hf_tokenizer.get_vocab().items(), key=lambda kv: kv[1])
            with open(vocab_file, "w", encoding="utf-8") as f:
                f.writelines(token + "\n" for token, _ in by_id)

    @classmethod
    def from_directory(cls, directory: str | os.PathLike, context_length: int) -> "TextTokenizer":
        """Load a BERT tokenizer from local files only (vocab.txt or tokenizer.json)."""
        from transformers import BertTokenizerFast
        hf = BertTokenizerFast.from_pretrained(os.fspath(directory), local_files_only=True)
        return cls(hf, context_length)

    @classmethod
    def generated(cls, context_length: int = 64) -> "TextTokenizer":
        """The tokenizer over the generated medical WordPiece vocabulary (tiny model, demos)."""
        return cls(build_wordpiece_tokenizer(generate_vocabulary()), context_length)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, "
                f"context_length={self.context_length})")


class OpenCLIPTokenizer:
    """open_clip's BPE tokenizer (``SimpleTokenizer``, shipped inside open_clip: no download) with
    acelora's interface: texts -> ``input_ids`` and ``attention_mask`` [B, L], L the batch's
    longest text (through its EOT token), at most the context length.

    The mask marks the tokens up to and including EOT (id 0 is a real BPE token, so padding cannot
    be told from ``input_ids != 0``)."""

    def __init__(self, context_length: int = 77, tokenizer=None):
        from open_clip.tokenizer import SimpleTokenizer

        self.tokenizer = tokenizer if tokenizer is not None else SimpleTokenizer(context_length=context_length)
        self.context_length = int(context_length)
        self.eot_token_id = int(getattr(self.tokenizer, "eot_token_id"))

    @property
    def pad_token_id(self) -> int:
        return 0

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer.encoder)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None
                 ) -> dict[str, torch.Tensor]:
        texts = check_texts(texts)
        ids = self.tokenizer(texts, context_length=int(context_length or self.context_length)).long()
        eot = ids.argmax(-1)          # EOT has the highest id of the vocabulary
        length = int(eot.max()) + 1
        ids = ids[:, :length]
        mask = (torch.arange(length)[None] <= eot[:, None]).long()
        return {"input_ids": ids, "attention_mask": mask}

    def save(self, directory: str | os.PathLike) -> None:
        """Nothing to write: the BPE vocabulary ships with open_clip."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, context_length={self.context_length})"
