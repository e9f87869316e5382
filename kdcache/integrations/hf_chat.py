"""Chat corpora (``hf-chat:``): records of role/content messages, rendered with a chat template and
tokenized with the teacher's tokenizer. A per-token store keeps a row for each position whose *target*
is an assistant token (``rows=assistant``, the default: the prompt is fed as context and stores no
row), or for every position (``rows=all``, the rows of an ``hf-text:`` store).

Assistant tokens are found by the rule ``ASSISTANT_RULE`` (kdcache/store/FORMAT.md, "Chat
conversations of hf-chat: corpora", says it step by step): render the conversation, then for each
assistant message the conversation before it with the generation prompt and the conversation up to
it; the characters between the two are that message's span (its content and the template's
end-of-turn text), and a token is an assistant token when its characters overlap a span, as
``transformers`` marks ``{% generation %}`` spans. This needs no ``{% generation %}`` tags, so it works
with the templates models ship; a template that renders a conversation's beginning differently from
the conversation's own beginning (one that rewrites earlier turns) is refused.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kdcache.errors import SpecError
from kdcache.integrations.hf import _first, _kv, _records, _require, load_tokenizer, tokenizer_identity
from kdcache.text import TokenWindows

ASSISTANT_RULE = "prefix-render-1"
ROWS = ("assistant", "all")
DEFAULT_SEQ = 1024
USAGE = "hf-chat:PATH[,tokenizer=DIR][,messages=messages][,template=FILE][,seq=N][,rows=assistant|all]"


def chat_template(tokenizer: Any, path: str | None, spec: str) -> str:
    """The Jinja chat template: the file ``path`` names, else the tokenizer's own (its default one)."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise SpecError(f"dataset spec {spec!r}: template={path} is not a file; give a Jinja chat template file")
        return p.read_text(encoding="utf-8")
    own = tokenizer.chat_template
    if isinstance(own, dict):
        own = own.get("default")
    if not own:
        name = tokenizer_identity(tokenizer)["name"]
        raise SpecError(f"dataset spec {spec!r}: tokenizer {name} has no chat template; give template=FILE, a Jinja "
                        f"chat template (the one the model was trained with)")
    return own


def template_sha256(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


class NotAPrefix(Exception):
    """The template renders the conversation up to message ``index`` differently from the whole's beginning."""

    def __init__(self, index: int) -> None:
        super().__init__(f"message {index}")
        self.index = index


def assistant_spans(messages: list[dict[str, Any]], render: Callable[[list[dict[str, Any]], bool], str]
                    ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the ``[start, stop)`` character spans of its assistant messages.

    ``render(messages, add_generation_prompt)`` renders with the template. Message ``i`` (an assistant
    one) spans from the end of ``render(messages[:i], True)`` (empty for ``i = 0``) to the end of
    ``render(messages[:i + 1], False)``; each must be a prefix of the next and of the whole, else
    :class:`NotAPrefix` names the message."""
    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], True) if i else ""
        upto = render(messages[:i + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise NotAPrefix(i)
        if len(upto) > len(before):
            spans.append((len(before), len(upto)))
    return full, spans


def assistant_tokens(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Which tokens are assistant tokens: those whose characters ``offsets [tokens, 2]`` overlap a span."""
    flags = np.zeros(len(offsets), dtype=bool)
    for a, b in spans:
        flags |= (offsets[:, 1] > a) & (offsets[:, 0] < b)
    return flags


def _messages(value: Any, record: int, field: str, spec: str) -> list[dict[str, Any]]:
    """A record's messages as dicts (keys holding None dropped, as ``datasets`` fills absent ones)."""
    if not isinstance(value, list):
        raise SpecError(f"dataset spec {spec!r}: record {record}'s {field!r} holds {type(value).__name__}, not a list "
                        f"of messages; give messages=FIELD, the field holding them")
    out = []
    for m in value:
        m = {k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            got = f"keys {', '.join(sorted(m))}" if isinstance(m, dict) else f"a {type(m).__name__}"
            raise SpecError(f"dataset spec {spec!r}: record {record} has a message with {got}; hf-chat reads messages "
                            f"with a text 'role' and 'content' (convert other schemas, e.g. ShareGPT's from/value)")
        out.append(m)
    return out


class HFChat(TokenWindows):
    """``hf-chat:PATH[,tokenizer=DIR][,messages=messages][,template=FILE][,seq=1024][,rows=assistant|all]
    [,split=train][,holdout=N]``: a corpus read as ``hf-text:`` reads one, each record's ``messages``
    (a list of ``{"role", "content"}``) rendered with the chat template (``template=FILE``, else the
    tokenizer's), tokenized without adding special tokens (the template writes them) and truncated
    to its first ``seq + 1`` tokens: one sequence per record.

    ``lengths()`` counts the rows of each sequence and :meth:`row_mask` says which positions they are:
    with ``rows=assistant`` the positions whose target is an assistant token, whose labels are the
    next token (the other positions' labels are -1); with ``rows=all`` every position, as ``hf-text:``.
    Records with no row are skipped and counted (no assistant message, or none of its tokens within
    ``seq``), one line on stderr for each kind, and in the manifest (:meth:`identity`)."""

    def __init__(self, spec: str) -> None:
        _require()
        path, kv = _kv(spec[len("hf-chat:"):], spec)
        tok_path, template_path = kv.pop("tokenizer", None), kv.pop("template", None)
        field, split, rows = kv.pop("messages", "messages"), kv.pop("split", "train"), kv.pop("rows", "assistant")
        try:
            seq, holdout = int(kv.pop("seq", str(DEFAULT_SEQ))), int(kv.pop("holdout", "0"))
        except ValueError:
            raise SpecError(f"dataset spec {spec!r}: seq and holdout are integers") from None
        if kv:
            raise SpecError(f"dataset spec {spec!r}: unknown keys {sorted(kv)}; known: tokenizer, messages, template, "
                            f"seq, rows, split, holdout")
        if rows not in ROWS:
            raise SpecError(f"dataset spec {spec!r}: rows={rows}; use rows=assistant (a row per assistant token) or "
                            f"rows=all")
        if holdout == 1 or holdout < 0 or (holdout and split not in ("train", "test")):
            raise SpecError(f"dataset spec {spec!r}: holdout=N takes every N-th record (N >= 2) as split=test, the "
                            f"rest as split=train")
        if seq < 1:
            raise SpecError(f"dataset spec {spec!r}: seq must be at least 1")
        if not tok_path:
            raise SpecError(f"dataset spec {spec!r}: give tokenizer=PATH (dump-logits takes the one saved beside an "
                            f"hf: teacher)")
        self.tokenizer = load_tokenizer(tok_path, spec)
        self.template = chat_template(self.tokenizer, template_path, spec)
        if rows == "assistant" and not self.tokenizer.is_fast:
            raise SpecError(f"dataset spec {spec!r}: rows=assistant needs a fast tokenizer (one with tokenizer.json), "
                            f"for the characters of each token")
        self.rows_rule, self.seq = rows, seq
        records = _records(path, split, spec, single_split=bool(holdout))
        if field not in records.column_names:
            raise SpecError(f"dataset spec {spec!r}: the corpus has no field {field!r}; its fields are "
                            f"{', '.join(records.column_names)} (give messages=NAME)")
        chosen = [(r, v) for r, v in enumerate(records[field])
                  if not holdout or (r % holdout == holdout - 1) == (split == "test")]
        self._build(chosen, field, spec)

    def _render(self, messages: list[dict[str, Any]], generation: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=generation)

    def _build(self, chosen: list[tuple[int, Any]], field: str, spec: str) -> None:
        texts, spans, kept = [], [], []
        short = "no_assistant_token_within_seq" if self.rows_rule == "assistant" else "fewer_than_two_tokens"
        self.skipped = {"no_assistant_turn": 0, short: 0} if self.rows_rule == "assistant" else {short: 0}
        first_skipped: dict[str, int] = {}
        for r, value in chosen:
            messages = _messages(value, r, field, spec)
            if self.rows_rule == "assistant" and not any(m["role"] == "assistant" for m in messages):
                self.skipped["no_assistant_turn"] += 1
                first_skipped.setdefault("no_assistant_turn", r)
                continue
            try:
                if self.rows_rule == "assistant":
                    text, s = assistant_spans(messages, self._render)
                else:
                    text, s = (self._render(messages, False) if messages else ""), []
            except NotAPrefix as e:
                raise SpecError(f"dataset spec {spec!r}: record {r}, message {e.index}: the template renders the "
                                f"conversation up to this assistant message differently from the whole conversation's "
                                f"beginning (it rewrites earlier turns), so its tokens cannot be told apart; give "
                                f"template=FILE with a template that renders each turn the same wherever") from None
            except Exception as e:
                raise SpecError(f"dataset spec {spec!r}: record {r}: the chat template fails ({_first(e)})") from None
            texts.append(text)
            spans.append(s)
            kept.append(r)
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=self.rows_rule == "assistant")
        windows, flags, records = [], [], []
        self.truncated = self.assistant_tokens_cut = 0
        for k, ids in enumerate(enc["input_ids"]):
            ids = np.asarray(ids, dtype=np.int64)
            flag = (assistant_tokens(np.asarray(enc["offset_mapping"][k], dtype=np.int64).reshape(-1, 2), spans[k])
                    if self.rows_rule == "assistant" else np.ones(len(ids), dtype=bool))
            if len(ids) > self.seq + 1:
                self.truncated += 1
                self.assistant_tokens_cut += int(flag[self.seq + 1:].sum()) if self.rows_rule == "assistant" else 0
            ids, flag = ids[:self.seq + 1], flag[:self.seq + 1]
            if len(ids) < 2 or not flag[1:].any():
                self.skipped[short] += 1
                first_skipped.setdefault(short, kept[k])
                continue
            windows.append(ids)
            flags.append(flag)
            records.append(kept[k])
        if not windows:
            raise SpecError(f"dataset spec {spec!r}: no record of the corpus gives a row (records with an assistant "
                            f"turn: {len(kept)}, of {len(chosen)}); check messages={field} and seq={self.seq}")
        self._warn(len(chosen), first_skipped)
        self.num_classes = len(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.record_ids = np.asarray(records, dtype=np.int64)  # item i is record record_ids[i] of the corpus
        self._set_windows(windows)
        self._target = torch.from_numpy(np.concatenate(flags))  # per token: is it a target that has a row
        self._rows = np.array([int(f[1:].sum()) for f in flags], dtype=np.int64)

    def _warn(self, records: int, first: dict[str, int]) -> None:
        why = {"no_assistant_turn": "have no assistant message", "fewer_than_two_tokens": "have fewer than two tokens",
               "no_assistant_token_within_seq": f"have no assistant token within their first {self.seq + 1} tokens"}
        for key, n in self.skipped.items():
            if n:
                print(f"hf-chat: {n} of {records} records {why[key]} and are skipped (first: record {first[key]})",
                      file=sys.stderr)
        if self.truncated:
            cut = f", {self.assistant_tokens_cut} assistant tokens dropped" if self.rows_rule == "assistant" else ""
            print(f"hf-chat: {self.truncated} of {records} conversations are longer than seq={self.seq} and are cut to "
                  f"their first {self.seq + 1} tokens{cut}; raise seq= to keep them", file=sys.stderr)

    def lengths(self, indices: np.ndarray | None = None) -> np.ndarray:
        """Rows per sequence: its positions whose target is an assistant token (every position, ``rows=all``)."""
        return self._rows if indices is None else self._rows[np.asarray(indices)]

    def row_mask(self, indices: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``[B, L]`` bool, ``L`` the width of ``get_batch(indices)``: True at the positions that have a row."""
        idx = np.asarray(indices, dtype=np.int64)
        n = self._lengths[idx]
        width = int(n.max()) if len(idx) else 0
        pos = np.arange(width)
        valid = torch.from_numpy(pos[None, :] < n[:, None])
        at = torch.from_numpy(self._starts[idx][:, None] + np.minimum(pos[None, :], n[:, None] - 1))
        return valid & self._target[at + 1]

    def get_batch(self, indices: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``[B, L]`` as :class:`TokenWindows` gives them; labels the next token at the positions
        with a row, -1 elsewhere (so the dataset fingerprint covers which positions have rows)."""
        x, y = super().get_batch(indices)
        return x, torch.where(self.row_mask(indices), y, -1)

    def widths(self, indices: np.ndarray | None = None) -> np.ndarray:
        """Positions per sequence fed to a model, rows or not (what a batch of them is padded to)."""
        return self._lengths if indices is None else self._lengths[np.asarray(indices)]

    def rule(self) -> dict[str, str]:
        """What decides the rows: mixed into the dataset fingerprint."""
        return {"rows": self.rows_rule, "rule": ASSISTANT_RULE, "template_sha256": template_sha256(self.template)}

    def fingerprint_extra(self) -> str:
        return json.dumps({"chat": self.rule()}, sort_keys=True, separators=(",", ":"))

    def identity(self) -> dict[str, Any]:
        return {"tokenizer": tokenizer_identity(self.tokenizer),
                "chat": {**self.rule(), "skipped": dict(self.skipped), "truncated": self.truncated}}
