"""BERT tasks: fine-tune the top transformer layer and a fresh 2-class head.

The frozen lower layers run once: their output for every sentence is cached
as the task's input, so retraining costs only the top. Inputs are packed as
``[n, T, H + 1]``: the hidden states entering the top layer, then the attention
mask as a last channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.registry import registered
from bench.seeding import rng
from tasks.base import HeadView, Params, Split, TaskData, head_view_of
from tasks.datasets import DatasetNotFoundError
from tasks.deep import SgdTask
from tasks.sgd import SgdRecipe
from tasks.splits import fixed_splits, seeded_splits
from tasks.text_data import as_dataset, load_rt_snippets, minilm_path, tokenised


@cache
def load_pretrained(path: str, num_labels: int = 2) -> tuple[object, nn.Module]:
    """Tokenizer and ``AutoModelForSequenceClassification`` from a folder or hub name (eager attention:
    double-backward Hessian-vector products work on CPU)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, attn_implementation="eager")
    except OSError as err:
        raise DatasetNotFoundError(
            f"cannot load BERT checkpoint {path!r}: {str(err).splitlines()[0]} It must be a local folder with "
            "config, weights and tokenizer files, or a Hugging Face hub name reachable from this machine") from err
    return tokenizer, model.eval()


class BertTop(nn.Module):
    """The top encoder layer, masked mean pooling and a linear head: ``[b, T, H+1]`` → logits ``[b, C]``."""

    def __init__(self, layer: nn.Module, hidden: int, n_classes: int):
        super().__init__()
        self.layer = layer
        self.classifier = nn.Linear(hidden, n_classes)

    def top_output(self, packed: Tensor) -> tuple[Tensor, Tensor]:
        """The top layer's output ``[b, T, H]`` and the attention mask ``[b, T]``."""
        hidden, mask = packed[..., :-1], packed[..., -1]
        additive = (1.0 - mask)[:, None, None, :] * torch.finfo(hidden.dtype).min
        out = self.layer(hidden, attention_mask=additive)
        return (out[0] if isinstance(out, tuple) else out), mask

    def features(self, packed: Tensor) -> Tensor:
        """Masked mean of the top layer's output: ``[b, H]`` (the classifier's input)."""
        out, mask = self.top_output(packed)
        return (out * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)

    def cls_features(self, packed: Tensor) -> Tensor:
        """The top layer's output at the [CLS] token: ``[b, H]``."""
        return self.top_output(packed)[0][:, 0]

    def forward(self, packed: Tensor) -> Tensor:
        return self.classifier(self.features(packed))


@torch.no_grad()
def frozen_features(model: nn.Module, encoded: Any, trainable_layers: int, batch_size: int = 256) -> Tensor:
    """Hidden states entering the first trainable layer, with the mask packed last: ``[n, T, H+1]``, from a
    tokenised dataset (:func:`tasks.text_data.tokenised`)."""
    bert = model.bert
    n_frozen = len(bert.encoder.layer) - trainable_layers
    chunks = []
    for start in range(0, len(encoded), batch_size):
        enc = encoded[start : start + batch_size]
        hidden = bert(**enc, output_hidden_states=True).hidden_states[n_frozen]
        chunks.append(torch.cat([hidden, enc["attention_mask"][..., None].to(hidden.dtype)], dim=-1))
    return torch.cat(chunks)


@dataclass(frozen=True)
class BertConfig(SgdRecipe):
    """Sizes and tokenisation; the SGD recipe's fields are inherited (top layer + head are trained)."""

    n_train: int = 3000
    n_test: int = 500
    n_queries: int = 100
    max_length: int = 40
    epochs: int = 3
    batch_size: int = 32
    lr: float = 0.03
    l2: float = 1e-4
    n_checkpoints: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_length < 2:
            raise ValueError(f"max_length must be ≥ 2 tokens ([CLS] and [SEP]), got {self.max_length}")


class BertTask(SgdTask):
    """Shared logic; subclasses give the texts, labels and checkpoint folder."""

    Config: ClassVar[type] = BertConfig
    influence_parameters: ClassVar[tuple[str, ...]] = ("classifier",)
    embedding_spaces: ClassVar[tuple[str, ...]] = ("penultimate", "cls")
    trainable_layers: ClassVar[int] = 1

    def checkpoint_path(self) -> Path | str:
        """A local folder or a Hugging Face hub name."""
        raise NotImplementedError

    def dataset(self) -> Any:
        """The corpus as a ``datasets.Dataset`` with columns ``text`` and ``label``."""
        raise NotImplementedError

    def make_model(self) -> nn.Module:
        _, pretrained = load_pretrained(str(self.checkpoint_path()))
        layer = pretrained.bert.encoder.layer[-1]
        top = BertTop(type(layer)(pretrained.config), pretrained.config.hidden_size, 2)
        top.layer.load_state_dict(layer.state_dict())  # pretrained top layer; the head is freshly initialised
        return top.eval()

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets, reduction="none")

    def head_view(self, params: Params) -> HeadView | None:
        return head_view_of(self.build_model(), params, "classifier")

    def load_data(self) -> TaskData:
        corpus = self.dataset()
        cfg = self.config
        if cfg.n_train + cfg.n_test > len(corpus):
            raise ValueError(f"{self.name}: n_train + n_test = {cfg.n_train + cfg.n_test} exceeds {len(corpus)} sentences")
        chosen = rng(self.seed, self.name, "subset").permutation(len(corpus))[: cfg.n_train + cfg.n_test]
        return self.encode(corpus.select(chosen), cfg.n_train, cfg.n_test)

    def encode(self, corpus: Any, n_train: int, n_test: int, keep_order: bool = False) -> TaskData:
        """Frozen features of a ``datasets.Dataset`` (``text``, ``label``), tokenised by ``Dataset.map``; the
        first ``n_train`` rows train when ``keep_order``, else a seeded split."""
        tokenizer, model = load_pretrained(str(self.checkpoint_path()))
        features = frozen_features(model, tokenised(corpus, tokenizer, self.config.max_length), self.trainable_layers)
        targets = torch.as_tensor(np.asarray(corpus["label"], dtype=np.int64))
        if not keep_order:
            return seeded_splits(self, features, targets, n_train, n_test, self.config.n_queries)
        return fixed_splits(self, Split(features[:n_train], targets[:n_train]),
                            Split(features[n_train:], targets[n_train:]), self.config.n_queries)


@registered("rt-bert")
class RtBert(BertTask):
    """Pretrained 6-layer BERT (all-MiniLM-L6-v2) on 12,808 real Rotten Tomatoes snippets: top layer + head tuned."""

    presets: ClassVar[dict[str, BertConfig]] = {
        "smoke": BertConfig(n_train=300, n_test=100, n_queries=10, max_length=12, epochs=2),
        "default": BertConfig(),
    }
    version: ClassVar[str] = "1"

    def checkpoint_path(self) -> Path:
        return minilm_path()

    def dataset(self) -> Any:
        return as_dataset(*load_rt_snippets())
