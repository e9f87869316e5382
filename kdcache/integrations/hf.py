"""Hugging Face: causal language models from ``transformers`` as teachers and students (``hf:``), and
text corpora read with ``datasets`` and tokenized with the teacher's tokenizer (``hf-text:``).

``transformers``, ``tokenizers`` and ``datasets`` are the optional extra ``pip install 'kdcache[hf]'``.

Model specs (a local directory holding an image classifier is one of :mod:`kdcache.vision.models`'s):

- ``hf:PATH_OR_NAME[,dtype=bf16|fp16|fp32][,device_map=auto]``: ``AutoModelForCausalLM.from_pretrained``
  (a local directory, or a hub name where the machine reaches the hub); the module maps input ids
  ``[B, L]`` to logits ``[B, L, vocab]`` (float32). ``device_map=auto`` spreads a teacher too large
  for one GPU over the GPUs of the machine (accelerate); kdcache then leaves its placement alone.
- ``hf:llama,hidden=H,layers=N,heads=A[,intermediate=I][,kv_heads=K][,context=C]``: a fresh Llama-style
  model from a config, its vocabulary the dataset's (a student trained from scratch). kdcache's
  checkpoint of it records this spec, so it loads without unpickling; ``train-student`` also writes
  ``hf/`` beside it with ``save_pretrained`` (safetensors) and the tokenizer, for plain ``transformers``.

Dataset spec: ``hf-text:PATH[,tokenizer=PATH][,field=text][,seq=N][,split=train][,holdout=N]`` (see
:class:`HFText`). :func:`train_tokenizer` (``kdcache train-tokenizer``) makes a byte-level BPE tokenizer
from such a corpus, for a teacher trained from scratch.
"""
from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdcache.errors import SpecError
from kdcache.text import TokenWindows

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CONFIG_KEYS = {"hidden": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
               "intermediate": "intermediate_size", "kv_heads": "num_key_value_heads",
               "context": "max_position_embeddings"}


def _require() -> Any:
    try:
        import transformers
    except ImportError:
        raise SpecError("hf: and hf-text: specs need transformers, tokenizers and datasets: "
                        "pip install 'kdcache[hf]'") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _kv(text: str, spec: str) -> tuple[str, dict[str, str]]:
    head, *rest = text.split(",")
    kv = {}
    for part in rest:
        k, eq, v = part.partition("=")
        if not eq:
            raise SpecError(f"spec {spec!r}: cannot read {part!r}; options are key=value")
        kv[k.strip()] = v.strip()
    return head.strip(), kv


class CausalLM(nn.Module):
    """A ``transformers`` causal LM as kdcache sees a sequence model: input ids ``[B, L]`` in, logits
    ``[B, L, vocab]`` (float32) out. Padding is on the right, so causal attention never lets it
    change a real position's logits."""

    def __init__(self, model: nn.Module, placed: bool = False) -> None:
        super().__init__()
        self.model = model
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        # placed by accelerate (device_map=): inputs go to the first layer's device; .to() leaves it alone
        self.placed = placed

    def _apply(self, fn: Any, recurse: bool = True) -> "CausalLM":
        return self if self.placed else super()._apply(fn, recurse)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.max_positions is not None and input_ids.shape[1] > self.max_positions:
            from kdcache.errors import KdcacheError
            raise KdcacheError(f"sequences of {input_ids.shape[1]} tokens but the model's context is "
                               f"{self.max_positions}; give the dataset seq={self.max_positions} or less")
        if self.placed:
            input_ids = input_ids.to(self.model.get_input_embeddings().weight.device)
        return self.model(input_ids=input_ids.long()).logits.float()


def is_hf_spec(spec: str) -> bool:
    return spec.startswith("hf:")


def build_model(spec: str, num_classes: int | None) -> nn.Module:
    """The module an ``hf:`` spec names: loaded from a directory or the hub, or built from a config."""
    transformers = _require()
    head, kv = _kv(spec[3:], spec)
    if head == "llama":
        return CausalLM(_from_config(transformers, spec, kv, num_classes))
    image = _image_config(transformers, head)
    if image is not None:
        from kdcache.vision.models import build_hf_image
        return build_hf_image(transformers, spec, head, kv, image, num_classes)
    dtype = kv.pop("dtype", "fp32")
    device_map = kv.pop("device_map", None)
    if kv or dtype not in DTYPES:
        raise SpecError(f"model spec {spec!r}: options are dtype=bf16|fp16|fp32 and device_map=auto "
                        f"(got {kv or dtype})")
    if device_map is not None:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise SpecError(f"model spec {spec!r}: device_map needs accelerate: pip install 'kdcache[hf]'") from None
    path = Path(head)
    if not path.exists() and (head.startswith((".", "/")) or head.count("/") != 1):
        raise SpecError(f"model spec {spec!r}: {head} does not exist; give a directory written by save_pretrained "
                        f"or a hub name such as org/model")
    try:
        config = transformers.AutoConfig.from_pretrained(head)
    except Exception as e:
        raise SpecError(f"model spec {spec!r}: no transformers config there ({_first(e)})") from None
    try:
        placement = {} if device_map is None else {"device_map": device_map}
        model = transformers.AutoModelForCausalLM.from_pretrained(head, dtype=DTYPES[dtype], **placement)
    except ValueError as e:
        raise SpecError(f"model spec {spec!r}: {type(config).__name__} is not a causal language model "
                        f"({_first(e)}); kdcache's hf: teachers are AutoModelForCausalLM models") from None
    except Exception as e:
        raise SpecError(f"model spec {spec!r}: cannot be loaded ({_first(e)})") from None
    return CausalLM(model, placed=device_map is not None)


def _image_config(transformers: Any, path: str) -> Any:
    """The config of a local image classifier (``AutoModelForImageClassification``: ViT, ResNet, ConvNeXt...)
    at ``path``, or None for anything else (a causal LM, a hub name)."""
    if not (Path(path) / "config.json").is_file():
        return None
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except Exception:
        return None  # reported by the causal-LM path, which reads the same config
    from kdcache.vision.models import is_image_classifier
    return config if is_image_classifier(config) else None


def _from_config(transformers: Any, spec: str, kv: dict[str, str], num_classes: int | None) -> nn.Module:
    usage = "e.g. hf:llama,hidden=256,layers=4,heads=4"
    unknown = sorted(set(kv) - set(CONFIG_KEYS) - {"vocab"})
    if unknown:
        raise SpecError(f"model spec {spec!r}: unknown keys {unknown}; known: {', '.join([*CONFIG_KEYS, 'vocab'])}")
    try:
        sizes = {CONFIG_KEYS[k]: int(v) for k, v in kv.items() if k in CONFIG_KEYS}
        vocab = int(kv["vocab"]) if "vocab" in kv else num_classes
    except ValueError:
        raise SpecError(f"model spec {spec!r}: sizes are integers, {usage}") from None
    if not {"hidden_size", "num_hidden_layers", "num_attention_heads"} <= set(sizes) or vocab is None:
        raise SpecError(f"model spec {spec!r}: give hidden, layers and heads (the vocabulary comes from the "
                        f"dataset), {usage}")
    sizes.setdefault("intermediate_size", 4 * sizes["hidden_size"])
    sizes.setdefault("num_key_value_heads", sizes["num_attention_heads"])
    try:
        config = transformers.LlamaConfig(vocab_size=vocab, **sizes)
        return transformers.AutoModelForCausalLM.from_config(config)
    except Exception as e:
        raise SpecError(f"model spec {spec!r}: {_first(e)}") from None


def save_pretrained(module: nn.Module, out: Path, tokenizer: Any = None) -> Path | None:
    """Write a trained ``hf:`` model with ``save_pretrained`` (safetensors) and its tokenizer to ``out/hf``."""
    if not isinstance(module, CausalLM):
        return None
    target = out / "hf"
    module.model.save_pretrained(target, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    return target


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """``name`` and ``sha256`` of a tokenizer: its vocabulary (token -> id, sorted) and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: v for k, v in sorted(tokenizer.special_tokens_map.items())}
    body = json.dumps({"vocab": vocab, "special": special}, sort_keys=True, separators=(",", ":"))
    name = str(getattr(tokenizer, "name_or_path", "")).rstrip("/\\")
    return {"name": name.replace("\\", "/").rsplit("/", 1)[-1], "size": len(tokenizer),  # a name, not a path
            "sha256": hashlib.sha256(body.encode()).hexdigest()}


def load_tokenizer(path: str, spec: str) -> Any:
    transformers = _require()
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise SpecError(f"dataset spec {spec!r}: no tokenizer at {path} ({_first(e)}); give tokenizer=PATH, a "
                        f"directory written by save_pretrained (the teacher's)") from None


def model_tokenizer(spec: str) -> str | None:
    """The directory of an ``hf:PATH`` model when a tokenizer is saved there (the default tokenizer)."""
    if not is_hf_spec(spec):
        return None
    head, _ = _kv(spec[3:], spec)
    path = Path(head)
    return str(path) if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists() else None


class HFText(TokenWindows):
    """``hf-text:PATH[,tokenizer=PATH][,field=text][,seq=N][,split=train][,holdout=N]``: a corpus read
    with ``datasets`` (JSON/JSONL, Parquet, plain text a paragraph per record, or a ``save_to_disk``
    directory; PATH may be a glob of files of one format), each record's ``field`` tokenized with the
    tokenizer and cut into windows of at most ``seq + 1`` tokens, one sequence each: inputs its first
    tokens, per-position labels the next ones (a row per real position in a store; padding is never a
    row). ``num_classes`` is the tokenizer's size.

    ``split`` names a split of a ``save_to_disk`` directory. Files have one split; ``holdout=N`` makes
    every N-th record the ``test`` split and the others ``train``."""

    def __init__(self, spec: str) -> None:
        _require()
        path, kv = _kv(spec[len("hf-text:"):], spec)
        tok_path = kv.pop("tokenizer", None)
        field = kv.pop("field", "text")
        split = kv.pop("split", "train")
        try:
            seq = int(kv.pop("seq", "128"))
            holdout = int(kv.pop("holdout", "0"))
        except ValueError:
            raise SpecError(f"dataset spec {spec!r}: seq and holdout are integers") from None
        if kv:
            raise SpecError(f"dataset spec {spec!r}: unknown keys {sorted(kv)}; known: tokenizer, field, seq, split, "
                            f"holdout")
        if holdout == 1 or holdout < 0 or (holdout and split not in ("train", "test")):
            raise SpecError(f"dataset spec {spec!r}: holdout=N takes every N-th record (N >= 2) as split=test, the "
                            f"rest as split=train")
        if not tok_path:
            raise SpecError(f"dataset spec {spec!r}: give tokenizer=PATH (dump-logits takes the one saved beside an "
                            f"hf: teacher)")
        if seq < 1:
            raise SpecError(f"dataset spec {spec!r}: seq must be at least 1")
        self.tokenizer = load_tokenizer(tok_path, spec)
        texts = corpus_texts(path, field, spec, split, holdout)
        ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        windows = [np.asarray(t[a:a + seq + 1], dtype=np.int64) for t in ids for a in range(0, max(len(t) - 1, 0), seq)]
        windows = [w for w in windows if len(w) >= 2]
        if not windows:
            raise SpecError(f"dataset spec {spec!r}: the corpus has no text of two tokens or more in field {field!r}")
        self.seq, self.num_classes = seq, len(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._set_windows(windows)

    def identity(self) -> dict[str, Any]:
        return {"tokenizer": tokenizer_identity(self.tokenizer)}


def corpus_texts(path: str, field: str, spec: str, split: str = "train", holdout: int = 0) -> list[str]:
    """The ``field`` of every record of the corpus at ``path`` in ``split`` (see :class:`HFText`)."""
    records = _records(path, split, spec, single_split=bool(holdout))
    if field not in records.column_names:
        raise SpecError(f"dataset spec {spec!r}: the corpus has no field {field!r}; its fields are "
                        f"{', '.join(records.column_names)} (give field=NAME)")
    texts = list(records[field])
    if holdout:
        texts = [t for i, t in enumerate(texts) if (i % holdout == holdout - 1) == (split == "test")]
    return texts


def _records(path: str, split: str, spec: str, single_split: bool = False) -> Any:
    import datasets
    datasets.disable_progress_bars()
    p = Path(path)
    files = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path] if p.exists() else []
    if not files:
        raise SpecError(f"dataset spec {spec!r}: {path} does not exist")
    try:
        if p.is_dir():
            loaded = datasets.load_from_disk(str(p))
            if isinstance(loaded, datasets.DatasetDict):
                if single_split:
                    raise SpecError(f"dataset spec {spec!r}: {path} has splits {', '.join(loaded)}; holdout= is "
                                    f"for corpora of one split")
                if split not in loaded:
                    raise SpecError(f"dataset spec {spec!r}: {path} has splits {', '.join(loaded)}, not {split!r}")
                return loaded[split]
            return loaded
        kinds = {Path(f).suffix for f in files}
        kind = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".md": "text",
                ".arrow": "arrow"}.get(kinds.pop() if len(kinds) == 1 else "")
        if kind is None:
            raise SpecError(f"dataset spec {spec!r}: cannot tell the format of {path}; use .jsonl/.json, .parquet, "
                            f".txt/.md, .arrow files (one format) or a save_to_disk directory")
        if split != "train" and not single_split:
            raise SpecError(f"dataset spec {spec!r}: files have one split, train; give holdout=N to hold out every "
                            f"N-th record as split=test")
        extra = {"sample_by": "paragraph"} if kind == "text" else {}
        return datasets.load_dataset(kind, data_files=files, split="train", **extra)
    except SpecError:
        raise
    except Exception as e:
        raise SpecError(f"dataset spec {spec!r}: {path} cannot be read ({_first(e)})") from None


def train_tokenizer(corpus: str, vocab: int, out: Path, field: str = "text") -> Any:
    """A byte-level BPE tokenizer of ``vocab`` tokens trained on the corpus (``hf-text:`` paths and
    formats; a ``field`` holding chat messages gives their contents), with ``<pad>``, ``<unk>`` and
    ``<eos>``; saved to ``out`` with ``save_pretrained``."""
    transformers = _require()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    spec = f"hf-text:{corpus}"
    texts = corpus_texts(corpus, field, spec)
    if texts and isinstance(texts[0], list):  # a chat corpus's messages: their contents
        texts = [m["content"] for t in texts for m in t or []
                 if isinstance(m, dict) and isinstance(m.get("content"), str)]
    if not any(t.strip() for t in texts):
        raise SpecError(f"train-tokenizer: {corpus} has no text in field {field!r}")
    special = ["<pad>", "<unk>", "<eos>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=special, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                eos_token="<eos>")
    fast.save_pretrained(out)
    return fast


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
