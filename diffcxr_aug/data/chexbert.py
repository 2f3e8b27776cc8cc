"""CheXbert (Smit et al., 2020): a BERT report labeler, loaded from the official checkpoint format.

The architecture is CheXbert's: a BERT encoder, dropout on the ``[CLS]`` hidden state, and 14 linear
heads, 13 with 4 classes (blank, positive, negative, uncertain) for the pathologies and Support Devices,
and one with 2 classes (blank, positive) for No Finding, in CheXbert's order (No Finding last). The
official ``chexbert.pth`` holds ``{"model_state_dict": ...}`` saved from ``nn.DataParallel``, so every
key starts with ``module.``; it is read with ``torch.load(..., weights_only=True)``.

The BERT config and tokenizer come from ``bert`` (a local folder or a hub id; CheXbert was trained from
``bert-base-uncased``). When ``bert`` is not given, the checkpoint's own folder is used if it holds a
``config.json``, else ``bert-base-uncased``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from diffcxr_aug.data.labels import CHEXPERT_LABELS
from diffcxr_aug.errors import InputError, MissingInputError
from diffcxr_aug.runtime import resolve_device

logger = logging.getLogger(__name__)

# CheXbert's head order (its CONDITIONS list): the 13 findings in CheXpert order, then No Finding.
CHEXBERT_CONDITIONS: tuple[str, ...] = tuple(c for c in CHEXPERT_LABELS if c != "No Finding") + ("No Finding",)
# Class index -> label value, as CheXbert's label.py converts them (0 blank, 1 positive, 2 negative, 3 uncertain).
CLASS_TO_LABEL = {0: np.nan, 1: 1.0, 2: 0.0, 3: -1.0}
DEFAULT_BERT = "bert-base-uncased"
MAX_TOKENS = 512


class CheXbert(nn.Module):
    """BERT encoder + 14 CheXbert heads over the ``[CLS]`` state.

    Args:
        bert: the encoder (any ``transformers`` BERT-like model returning ``last_hidden_state``).
        dropout: dropout on the ``[CLS]`` state before the heads (CheXbert: 0.1).
    """

    def __init__(self, bert: nn.Module, dropout: float = 0.1) -> None:
        super().__init__()
        self.bert = bert
        self.dropout = nn.Dropout(dropout)
        hidden = bert.config.hidden_size
        # 13 heads: blank / positive / negative / uncertain; the last: blank / positive (No Finding).
        self.linear_heads = nn.ModuleList([nn.Linear(hidden, 4) for _ in range(13)] + [nn.Linear(hidden, 2)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Logits per head, in :data:`CHEXBERT_CONDITIONS` order: 13 of shape (B, 4), then (B, 2)."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        cls = self.dropout(hidden[:, 0, :])
        return [head(cls) for head in self.linear_heads]


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


def load_chexbert_state(checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights of a CheXbert checkpoint, ``module.`` prefixes removed (official format)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise MissingInputError(f"{checkpoint}: no such CheXbert checkpoint")
    try:
        loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types; all mean "not a weights file"
        raise InputError(f"{checkpoint}: not a CheXbert checkpoint readable with weights_only=True ({err})") from err
    state = loaded.get("model_state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not any(k.endswith("linear_heads.0.weight") for k in state):
        keys = list(loaded)[:5] if isinstance(loaded, dict) else type(loaded).__name__
        raise InputError(
            f"{checkpoint}: expected CheXbert weights ({{'model_state_dict': ...}} with linear_heads.*), found {keys}"
        )
    return _strip_prefix(state)


def _resolve_bert_source(checkpoint: Path, bert: str | os.PathLike | None) -> str:
    if bert is not None:
        return str(bert)
    if (checkpoint.parent / "config.json").is_file():
        return str(checkpoint.parent)
    return DEFAULT_BERT


class CheXbertLabeler:
    """A loaded CheXbert model and its tokenizer, labelling reports in batches.

    Build it with :meth:`from_checkpoint`.
    """

    def __init__(self, model: CheXbert, tokenizer, device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | os.PathLike, bert: str | os.PathLike | None = None, device: str = "auto"
    ) -> CheXbertLabeler:
        """Load CheXbert weights from ``checkpoint`` into a BERT built from ``bert``'s config.

        Args:
            checkpoint: ``.pth`` file in the official format (``model_state_dict``, ``module.`` prefixes).
            bert: config and tokenizer source: a local folder or a hub id (see the module docstring).
            device: ``auto``, ``cpu`` or ``cuda[:N]``.
        """
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        checkpoint = Path(checkpoint)
        state = load_chexbert_state(checkpoint)
        source = _resolve_bert_source(checkpoint, bert)
        try:
            config = AutoConfig.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source)
        except OSError as err:
            raise MissingInputError(
                f"cannot load the BERT config/tokenizer from {source!r} ({err}); pass a local folder holding "
                "config.json and the tokenizer files (e.g. a saved bert-base-uncased)"
            ) from err
        # Weights come from the checkpoint, so the encoder is built from its config, not downloaded.
        model = CheXbert(AutoModel.from_config(config, add_pooling_layer=True))
        # Old transformers saved the position_ids buffer; new ones rebuild it, so it may be absent or extra.
        expected = model.state_dict()
        state = {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise InputError(
                f"{checkpoint}: weights do not fit a CheXbert built from {source!r}: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {list(unexpected)[:5]}"
            )
        logger.info("Loaded CheXbert from %s (BERT config and tokenizer from %s)", checkpoint, source)
        return cls(model, tokenizer, resolve_device(device))

    @torch.no_grad()
    def predict(self, reports: Sequence[str]) -> np.ndarray:
        """Label values ``(len(reports), 14)`` in :data:`CHEXBERT_CONDITIONS` order (NaN = blank)."""
        texts = [" ".join(str(r).split()) for r in reports]  # CheXbert's cleaning: one line, single spaces
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        logits = self.model(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
        classes = torch.stack([head.argmax(dim=1) for head in logits], dim=1).cpu().numpy()
        return np.vectorize(CLASS_TO_LABEL.get, otypes=[np.float32])(classes)

    def label(self, reports: Sequence[str], batch_size: int = 16, progress: bool = True) -> pd.DataFrame:
        """A frame of the 14 CheXpert labels, one row per report, in :data:`CHEXPERT_LABELS` order."""
        chunks = []
        starts = range(0, len(reports), batch_size)
        for start in tqdm(starts, desc="CheXbert", unit="batch", disable=not progress):
            chunks.append(self.predict(reports[start : start + batch_size]))
        values = np.concatenate(chunks) if chunks else np.zeros((0, len(CHEXBERT_CONDITIONS)), np.float32)
        return pd.DataFrame(values, columns=list(CHEXBERT_CONDITIONS))[list(CHEXPERT_LABELS)]
