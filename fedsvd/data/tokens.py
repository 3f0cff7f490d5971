"""Tokenisation: fixed-length tensors for training, and how many examples that truncates."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fedsvd.data.dataset import TextDataset

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["tokenize", "truncation_share"]

# Examples counted per tokenizer call: bounds the token lists held at once on the largest tasks (~400k pairs).
_COUNT_BATCH = 8192


def tokenize(data: TextDataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict[str, torch.Tensor]:
    """Tokenise a dataset into fixed-length tensors.

    Parameters
    ----------
    data : TextDataset
        Examples to encode; sentence pairs are encoded as pairs when ``texts_b`` is set.
    tokenizer : PreTrainedTokenizerBase
        A Hugging Face tokenizer.
    max_length : int
        Every sequence is truncated or padded to exactly this many tokens (fixed shapes keep DP-SGD per-sample
        gradients and batch memory predictable).

    Returns
    -------
    dict of str to torch.Tensor
        ``input_ids`` and ``attention_mask`` of shape ``[len(data), max_length]``, ``token_type_ids`` too
        if the tokenizer produces them, and ``labels`` (``torch.long``, shape ``[len(data)]``).
    """
    encoded = tokenizer(
        list(data.texts),
        None if data.texts_b is None else list(data.texts_b),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    batch = {key: encoded[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded}
    batch["labels"] = torch.tensor(data.labels, dtype=torch.long)
    return batch


def truncation_share(data: TextDataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> float:
    """Share of examples that :func:`tokenize` truncates: their token count (with special tokens) exceeds max_length.

    The texts are tokenised in batches without padding or truncation, and only their lengths are kept, so the
    whole training set of a task can be counted before a run.

    Parameters
    ----------
    data : TextDataset
        Examples, counted as pairs when ``texts_b`` is set (as :func:`tokenize` encodes them).
    tokenizer : PreTrainedTokenizerBase
        The tokenizer the run uses.
    max_length : int
        Tokens per example of the run.

    Returns
    -------
    float
        In [0, 1]; 0.0 for an empty dataset.
    """
    if len(data) == 0:
        return 0.0
    truncated = 0
    for start in range(0, len(data), _COUNT_BATCH):
        stop = start + _COUNT_BATCH
        encoded = tokenizer(
            list(data.texts[start:stop]),
            None if data.texts_b is None else list(data.texts_b[start:stop]),
            padding=False,
            truncation=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            # Lengths beyond the model's limit are what is being counted, so the tokenizer's warning is noise.
            verbose=False,
        )
        truncated += sum(len(ids) > max_length for ids in encoded["input_ids"])
    return truncated / len(data)
