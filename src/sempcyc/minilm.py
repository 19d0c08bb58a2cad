"""A small sentence encoder for MiniLM (BERT) models stored as sentence-transformers folders, in plain PyTorch.

Why: the semantic stage needs one thing from sentence-transformers, the mean-pooled, L2-normalised BERT encoding
of a short text, and importing sentence-transformers (with transformers) was most of the stage's time. Measured
on 2 cores shared with another job: torch imports in 2.0-2.4 s, then `tokenizers` in 0.01-0.05 s and
`safetensors` in under 0.01 s, but sentence-transformers in another 5-10 s; `sempcyc semantic` on the demo's 100
classes took 12.2-14.5 s with sentence-transformers and takes 4.7-6.6 s with this module (loading the model:
0.45 s; encoding 100 classes in float64 on one thread: 1.4-2 s), with byte-identical output.

It reads the same files and computes the same vectors as sentence-transformers (in float64, bit for bit the output
of its model on the demo's 100 and the emoji catalogue's 688 class names; within 1e-10 of its encode() in the
tests, which normalises a second time), from the BERT architecture and the folder's own settings:

  config.json                 the network's shape: hidden size, layers, heads, feed-forward size, layer-norm eps,
                              activation (only exact-erf "gelu", what all-MiniLM-L6-v2 names, is accepted)
  model.safetensors           the weights, loaded strictly: every weight the network has must be in the file
                              with its shape, and every tensor in the file must be one the network uses
                              (UNUSED_WEIGHTS names the only exceptions)
  tokenizer.json              the WordPiece tokenizer, run by the `tokenizers` package
  sentence_bert_config.json   max_seq_length: longer texts are cut to this many tokens, [CLS] and [SEP] included
  1_Pooling/config.json       the pooling, which must be the mean over the tokens

Texts are encoded one at a time, so there is no padding and no attention mask: a text's vector cannot depend on
the other texts. Every problem with the folder is a ModelFilesError whose message starts with the file at fault.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

# Weights that the checkpoint carries and mean pooling never reads: BERT's pooler ([CLS] -> dense -> tanh, trained
# for next-sentence prediction). sentence-transformers loads and computes it and then ignores its output too.
UNUSED_WEIGHTS = frozenset({"pooler.dense.weight", "pooler.dense.bias"})
# Our parameter names (clearer inside the forward pass) -> the checkpoint's (Hugging Face BERT) names. Inside a
# block the checkpoint's name is prefixed with encoder.layer.<i>.
CHECKPOINT_NAMES = {
    "word_embeddings": "embeddings.word_embeddings.weight",
    "position_embeddings": "embeddings.position_embeddings.weight",
    "token_type_embeddings": "embeddings.token_type_embeddings.weight",
    "position_ids": "embeddings.position_ids",
    "embedding_norm": "embeddings.LayerNorm",
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_out": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "feed_forward_in": "intermediate.dense",
    "feed_forward_out": "output.dense",
    "feed_forward_norm": "output.LayerNorm",
}


class ModelFilesError(ValueError):
    """A model file is missing, unreadable or not what this encoder implements; the message names the file."""


@dataclass(frozen=True)
class Config:
    """The parts of a BERT config.json this encoder uses."""
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float


# ----------------------------------------------------------------------------------------------- the network

class Block(nn.Module):
    """One transformer layer, post-norm as in BERT: self-attention, add & norm, feed-forward, add & norm."""

    def __init__(self, config: Config):
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.heads = config.num_attention_heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.attention_out = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden, eps=eps)
        self.feed_forward_in = nn.Linear(hidden, config.intermediate_size)
        self.feed_forward_out = nn.Linear(config.intermediate_size, hidden)
        self.feed_forward_norm = nn.LayerNorm(hidden, eps=eps)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(1, tokens, hidden) -> (1, heads, tokens, hidden / heads)."""
        batch, tokens, hidden = x.shape
        return x.view(batch, tokens, self.heads, hidden // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self.split_heads(linear(x)) for linear in (self.query, self.key, self.value))
        # softmax(q k^T / sqrt(head size)) v; no mask: a single text has no padding to hide. The scale is given as
        # head_size ** -0.5, which rounds differently from SDPA's default 1 / sqrt(head_size): that is the value
        # sentence-transformers' BERT passes, and with it the float64 encodings equal its own to the last bit.
        context = F.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5)
        context = context.transpose(1, 2).reshape(x.shape)
        x = self.attention_norm(x + self.attention_out(context))
        # config.json's "gelu" is the exact, erf-based GELU (the tanh approximation is called "gelu_new")
        return self.feed_forward_norm(x + self.feed_forward_out(F.gelu(self.feed_forward_in(x))))


class Bert(nn.Module):
    """Token ids (1, tokens) -> contextual token vectors (1, tokens, hidden)."""

    def __init__(self, config: Config):
        super().__init__()
        # Plain tables rather than nn.Embedding: nn.Embedding initialises itself with normal_, which on the meta
        # device (see load) imports torch._dynamo, 2.3 s. The weights come from the file anyway.
        hidden = config.hidden_size
        self.word_embeddings = nn.Parameter(torch.empty(config.vocab_size, hidden))
        self.position_embeddings = nn.Parameter(torch.empty(config.max_position_embeddings, hidden))
        self.token_type_embeddings = nn.Parameter(torch.empty(config.type_vocab_size, hidden))
        # the checkpoint stores the position index 0..max-1 with the weights; load_weights checks it is exactly that
        self.register_buffer("position_ids", torch.zeros(1, config.max_position_embeddings, dtype=torch.long))
        self.embedding_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        segment = torch.zeros_like(ids)  # one sentence: every token is segment (token type) 0
        x = F.embedding(ids, self.word_embeddings) + F.embedding(segment, self.token_type_embeddings)
        x = self.embedding_norm(x + F.embedding(self.position_ids[:, : ids.shape[1]], self.position_embeddings))
        for block in self.blocks:
            x = block(x)
        return x


class SentenceEncoder(nn.Module):
    """Text -> unit vector: tokenize (cut to max_seq_length), run BERT, mean over the tokens, L2-normalise."""

    def __init__(self, bert: Bert, tokenizer: Tokenizer, max_seq_length: int):
        super().__init__()
        self.bert = bert
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.dim = bert.word_embeddings.shape[1]

    @torch.inference_mode()
    def encode(self, text: str) -> np.ndarray:
        """The unit vector of `text` (hidden,), in the dtype of the weights (float32 as stored; call .double()
        for float64)."""
        ids = torch.tensor([self.tokenizer.encode(text).ids], dtype=torch.long)
        tokens = self.bert(ids)
        mean = tokens.sum(dim=1) / ids.shape[1]
        return F.normalize(mean, p=2, dim=1)[0].numpy()


# ----------------------------------------------------------------------------------------------- loading

def load(folder: str | Path) -> SentenceEncoder:
    """The encoder stored in a sentence-transformers model folder, on CPU, float32 as stored."""
    folder = Path(folder)
    config = read_config(folder / "config.json")
    max_seq_length = read_max_seq_length(folder / "sentence_bert_config.json", config)
    check_pooling(folder / "1_Pooling" / "config.json", config)
    with torch.device("meta"):  # shapes only: the weights come from the file, no random initialisation
        bert = Bert(config)
    load_weights(bert, folder / "model.safetensors")
    return SentenceEncoder(bert, read_tokenizer(folder / "tokenizer.json", max_seq_length), max_seq_length)


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFilesError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFilesError(f"{path}: unreadable ({one_line(exc)})") from None
    if not isinstance(data, dict):
        raise ModelFilesError(f"{path}: expected a JSON object")
    return data


def read_config(path: Path) -> Config:
    data = read_json(path)
    if data.get("model_type") != "bert" or data.get("position_embedding_type", "absolute") != "absolute":
        raise ModelFilesError(f"{path}: not a BERT model with absolute positions, which is all this encoder runs")
    if data.get("hidden_act") != "gelu":
        raise ModelFilesError(f"{path}: hidden_act {data.get('hidden_act')!r}; this encoder implements \"gelu\" only")
    try:
        config = Config(**{name: data[name] for name in Config.__dataclass_fields__})
    except KeyError as exc:
        raise ModelFilesError(f"{path}: {exc.args[0]} is missing") from None
    whole = [getattr(config, n) for n in Config.__dataclass_fields__ if n != "layer_norm_eps"]
    eps = config.layer_norm_eps
    if not all(isinstance(v, int) and v > 0 for v in whole) or not isinstance(eps, float) or not 0 < eps < 1 \
            or config.hidden_size % config.num_attention_heads:
        raise ModelFilesError(f"{path}: sizes must be positive integers, the hidden size a multiple of the heads")
    return config


def read_max_seq_length(path: Path, config: Config) -> int:
    length = read_json(path).get("max_seq_length")
    if not isinstance(length, int) or not 2 < length <= config.max_position_embeddings:
        raise ModelFilesError(f"{path}: max_seq_length must be an integer from 3 to max_position_embeddings "
                              f"({config.max_position_embeddings}), got {length!r}")
    return length


def check_pooling(path: Path, config: Config) -> None:
    data = read_json(path)
    modes = {key for key, value in data.items() if key.startswith("pooling_mode_") and value is True}
    if modes != {"pooling_mode_mean_tokens"}:
        raise ModelFilesError(f"{path}: pooling {sorted(modes)}; this encoder implements mean pooling only")
    if data.get("word_embedding_dimension", config.hidden_size) != config.hidden_size:
        raise ModelFilesError(f"{path}: word_embedding_dimension {data['word_embedding_dimension']} is not the "
                              f"model's hidden size {config.hidden_size}")


def checkpoint_name(name: str) -> str:
    """Our parameter name -> the checkpoint's: blocks.3.query.weight -> encoder.layer.3.attention.self.query.weight."""
    parts = name.split(".")
    if parts[0] == "blocks":
        return ".".join(["encoder.layer", parts[1], CHECKPOINT_NAMES[parts[2]], *parts[3:]])
    return ".".join([CHECKPOINT_NAMES[parts[0]], *parts[1:]])


def load_weights(bert: Bert, path: Path) -> None:
    """Fill `bert` (built on the meta device) with the file's tensors; strict both ways."""
    if not path.is_file():
        raise ModelFilesError(f"{path}: missing")
    try:
        stored = safetensors.torch.load_file(str(path), device="cpu")
    except (OSError, safetensors.SafetensorError) as exc:
        raise ModelFilesError(f"{path}: unreadable ({one_line(exc)})") from None
    wanted = {checkpoint_name(name): (name, tensor) for name, tensor in bert.state_dict().items()}
    missing = sorted(set(wanted) - set(stored))
    unknown = sorted(set(stored) - set(wanted) - UNUSED_WEIGHTS)
    if missing or unknown:
        raise ModelFilesError(f"{path}: does not hold this model's weights: missing {missing or 'none'}, "
                              f"unexpected {unknown or 'none'}")
    state = {}
    for key, (name, expected) in wanted.items():
        tensor = stored[key]
        if tensor.shape != expected.shape or tensor.is_floating_point() != expected.is_floating_point():
            kind = "floating point" if expected.is_floating_point() else "integer"
            raise ModelFilesError(f"{path}: {key} is {tensor.dtype} {list(tensor.shape)}, expected {kind} "
                                  f"{list(expected.shape)}")
        state[name] = tensor.to(expected.dtype)
    positions = state["position_ids"]
    if not torch.equal(positions, torch.arange(positions.shape[1]).unsqueeze(0)):
        raise ModelFilesError(f"{path}: embeddings.position_ids is not 0, 1, 2, ...")
    bert.load_state_dict(state, strict=True, assign=True)


def read_tokenizer(path: Path, max_seq_length: int) -> Tokenizer:
    if not path.is_file():
        raise ModelFilesError(f"{path}: missing")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the Rust side raises plain Exception for any malformed file
        raise ModelFilesError(f"{path}: unreadable ({one_line(exc)})") from None
    # The file's own settings pad and cut to 128 tokens (left from export); sentence-transformers overrides them
    # with its max_seq_length and no padding for a single text, and so do we.
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_seq_length)
    return tokenizer


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__

