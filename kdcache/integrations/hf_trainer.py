"""``transformers.Trainer`` distilling from a kdcache store: swap ``Trainer`` for :class:`DistillationTrainer`
and name a per-token store (``dump-logits`` of an ``hf-text:`` corpus, any layout); an existing Trainer
or TRL script then trains on ``alpha * T^2 * KL + (1 - alpha) * CE`` with the temperature applied at
load time, exactly the loss of ``kdcache train-student``.

Each batch carries the index of each of its sequences in the store's dataset (``sample_id``); the
teacher rows of a batch come from the store by that index and position, a block of sequences at a
time (the blocks ``train-student`` reads), so a batch in the store's order reads each block once per
epoch. Its tokens are checked against the store's next-token labels, so rows never pair with other
text. ``transformers`` is imported on first use of :class:`DistillationTrainer` (``pip install
'kdcache[hf]'``).

- :class:`StoreDataset`: the sequences of the store's dataset as Trainer items
  ``{"input_ids": [n], "sample_id": i}`` (checked to be the store's data).
- :class:`StoreCollator`: pads them on the right: ``input_ids``, ``attention_mask``, ``labels`` (the
  inputs, -100 at padding, as any causal LM takes them) and ``sample_id``.
- :class:`TeacherRows`: the store's rows of a batch of sample ids: targets, labels, lengths.
- :class:`StoreOrder`: a sampler giving the sequences in ``train-student``'s order for a seed.
- :class:`DistillationTrainer`: the Trainer; ``compute_loss`` pairs, checks and distils.
- :func:`train_with_trainer`: ``train-student --engine trainer``: a :class:`TrainConfig` of one ``hf:``
  student run through the DistillationTrainer, its run directory written as ``train-student`` writes one.
"""
from __future__ import annotations

import collections
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from kdcache.errors import ConfigError, KdcacheError, StoreError
from kdcache.losses import check_loss, distillation_loss, teacher_log_probs
from kdcache.store import LogitStore, open_store
from kdcache.stream import DEFAULT_WINDOW_BYTES, DistillStream, check_pairing
from kdcache.train.config import DEFAULT_ALPHA, DEFAULT_TEMPERATURE

SAMPLE_ID = "sample_id"


def _open(store: str | LogitStore) -> LogitStore:
    s = store if isinstance(store, LogitStore) else open_store(str(store))
    if not s.manifest.per_token:
        raise StoreError(f"store {s.path!r} has a row per sample; the DistillationTrainer distils sequence models "
                         f"from a store with a row per token (dump-logits of an hf-text: or text: dataset); train "
                         f"other students with `kdcache train-student`")
    return s


class StoreDataset(Dataset):
    """The sequences a per-token store was dumped from, as Trainer items ``{"input_ids": LongTensor [n],
    "sample_id": i}`` (``n`` the sequence's real positions, which are the store's rows of it).

    Args:
        store: a path or an open :class:`LogitStore`.
        dataset: the dataset spec (``hf-text:...``); by default the one the store records, its paths
            relative to the store. Refused as ``train-student`` refuses it when it is not the store's
            data (length, then fingerprint: another corpus, tokenizer, ``seq`` or order).
    """

    def __init__(self, store: str | LogitStore, dataset: str | None = None) -> None:
        from kdcache.datasets import load_dataset, recorded_spec, with_tokenizer
        s = _open(store)
        spec = dataset or recorded_spec(s.manifest.dataset["spec"], s.path)
        spec = with_tokenizer(spec, None, s.path)
        data = load_dataset(spec)
        check_pairing(s, data, spec)
        self.spec, self.data, self.resolved = spec, data.dataset, data
        self.fingerprint = data.fingerprint
        self.tokenizer = getattr(self.data, "tokenizer", None)
        self.pad_id = int(getattr(self.data, "pad_id", 0))

    def __len__(self) -> int:
        return len(self.data)

    def lengths(self, indices: np.ndarray | None = None) -> np.ndarray:
        return self.data.lengths(indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        x, _ = self.data[int(i)]
        return {"input_ids": x, SAMPLE_ID: int(i)}


@dataclass
class StoreCollator:
    """Items ``{"input_ids": [n], "sample_id": i}`` into a batch padded on the right with ``pad_id``:
    ``input_ids`` and ``attention_mask`` ``[B, L]``, ``labels`` (the inputs, -100 at padding: a causal
    LM's own loss, for evaluation or a Trainer without distillation) and ``sample_id`` ``[B]`` (left
    out when the items have none, as a plain Trainer's unused-column removal leaves them)."""

    pad_id: int = 0

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [torch.as_tensor(it["input_ids"], dtype=torch.long) for it in items]
        width = max(len(t) for t in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for b, t in enumerate(ids):
            input_ids[b, :len(t)] = t
            mask[b, :len(t)] = 1
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask,
                                 "labels": input_ids.masked_fill(mask == 0, -100)}
        if all(SAMPLE_ID in it for it in items):
            batch[SAMPLE_ID] = torch.tensor([int(it[SAMPLE_ID]) for it in items], dtype=torch.long)
        return batch


def _no_ids(keys: str) -> str:
    return (f"the Trainer's batch has no {SAMPLE_ID!r} (it has {keys}); each item must carry the index of its "
            f"sequence in the store's dataset: train on kdcache.integrations.hf_trainer.StoreDataset(store), or "
            f"give your dataset a {SAMPLE_ID!r} column")


class TeacherRows:
    """The rows of a per-token store for a batch of sample ids, in batch order and, within a sequence,
    position order: read a block of sequences at a time (the blocks ``DistillStream`` reads, one
    read per array each) and kept in a small cache of blocks (at most two shuffle windows' worth), so
    a batch in the store's order (:class:`StoreOrder`) reads every block once per epoch, and memory
    stays bounded whatever the order."""

    def __init__(self, store: str | LogitStore, allow_interpolation: bool = False) -> None:
        self.store = _open(store)
        m = self.store.manifest
        ids, self.offsets = self.store.sequence_index()
        self.where = np.full(m.dataset["length"], -1, dtype=np.int64)
        self.where[ids] = np.arange(len(ids))
        plain = DistillStream(self.store, None, shuffle=False, check=False)
        self.bounds = np.array([a for a, _ in plain.blocks()] + [len(ids)], dtype=np.int64)
        self.max_blocks = 2 * plain.window_blocks + 2
        self.allow_interpolation = allow_interpolation
        self._blocks: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._dataset: Any = None

    def row_dataset(self) -> Any:
        """The store's dataset where its rows are not simply each sequence's first positions (an
        ``hf-chat:`` store of assistant positions): loaded once, from the spec the store records. None
        for the others, whose rows are positions ``0..n-1``."""
        m = self.store.manifest
        if self._dataset is None and m.dataset.get("chat") is not None:
            self._dataset = StoreDataset(self.store).data
        return self._dataset

    def use_dataset(self, dataset: Any) -> None:
        """The store's dataset, already loaded (a :class:`StoreDataset`'s), for :meth:`row_dataset`."""
        if self.store.manifest.dataset.get("chat") is not None:
            self._dataset = dataset

    @property
    def path(self) -> str:
        return self.store.path

    def sequences(self, sample_ids: np.ndarray) -> np.ndarray:
        """The store's sequence index of each sample id; ids with no rows are refused."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        inside = (ids >= 0) & (ids < len(self.where))
        seq = np.where(inside, self.where[np.clip(ids, 0, len(self.where) - 1)], -1)
        if (seq < 0).any():
            bad = ids[seq < 0][:5].tolist()
            raise StoreError(f"sample ids {bad} have no rows in store {self.path!r} (sequences 0.."
                             f"{len(self.where) - 1} of {self.store.manifest.dataset['spec']!r}); give the batch the "
                             f"store dataset's indices (StoreDataset)")
        return seq

    def lengths(self, sample_ids: np.ndarray) -> np.ndarray:
        """Rows (real positions) of each sample id's sequence."""
        seq = self.sequences(sample_ids)
        return self.offsets[seq + 1] - self.offsets[seq]

    def rows(self, sample_ids: np.ndarray) -> tuple[Any, torch.Tensor, np.ndarray]:
        """``(targets, labels [rows], lengths [B])`` of the sequences: targets are raw logits ``[rows,
        members, classes]`` float32 (dense) or :class:`kdcache.sparse.SparseTargets`, the rows of each
        sequence in turn, as ``distillation_loss`` takes them with ``student_logits[mask]``."""
        seq = self.sequences(sample_ids)
        which = np.searchsorted(self.bounds, seq, side="right") - 1
        parts = []
        for s, b in zip(seq.tolist(), which.tolist()):
            block = self._block(b)
            a = int(self.offsets[s] - self.offsets[self.bounds[b]])
            parts.append((block, a, a + int(self.offsets[s + 1] - self.offsets[s])))
        m = self.store.manifest
        data = {k: np.concatenate([blk.data[k][a:e] for blk, a, e in parts]) for k in m.logit_arrays}
        labels = torch.from_numpy(np.concatenate([blk.labels[a:e] for blk, a, e in parts]).astype(np.int64))
        targets = m.store_layout.targets(data, self.allow_interpolation, self.path)
        return targets, labels, self.offsets[seq + 1] - self.offsets[seq]

    def _block(self, b: int) -> Any:
        if b in self._blocks:
            self._blocks.move_to_end(b)
            return self._blocks[b]
        block = self.store.read_sequences(int(self.bounds[b]), int(self.bounds[b + 1]))
        self._blocks[b] = block
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)
        return block


class StoreOrder(Sampler):
    """The store dataset's indices in the order ``train-student`` reads the store with ``batch_size``
    and ``seed`` (``--batch-size``, ``--data-seed``): blocks of sequences in a shuffled order, then
    sequences shuffled within a window of blocks (:class:`kdcache.stream.DistillStream`, whose own
    output a test pins this to). ``set_epoch`` picks the epoch's order, as the Trainer calls it."""

    def __init__(self, store: str | LogitStore, batch_size: int, seed: int = 0, *, block_rows: int | None = None,
                 window_bytes: int = DEFAULT_WINDOW_BYTES) -> None:
        self.stream = DistillStream(_open(store), None, batch_size, seed=seed, check=False, block_rows=block_rows,
                                    window_bytes=window_bytes)
        self.batch_size, self.seed = batch_size, seed

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.stream.store.sequence_index()[0])

    def __iter__(self) -> Iterator[int]:
        ids, _ = self.stream.store.sequence_index()
        blocks = self.stream.blocks()
        step = self.stream.window_blocks
        # as DistillStream._iter_sequences draws it (shard 0 of 1): full batches of each window, the rest carried
        rng = np.random.default_rng([self.seed, self.stream.epoch, 0, 1])
        carry = np.zeros(0, dtype=np.int64)
        for w in range(0, len(blocks), step):
            seqs = np.concatenate([carry, *(np.arange(a, b) for a, b in blocks[w:w + step])])
            order = rng.permutation(len(seqs))
            full = len(order) // self.batch_size * self.batch_size
            yield from ids[seqs[order[:full]]].tolist()
            carry = seqs[order[full:]]
        yield from ids[carry].tolist()


def check_settings(store: LogitStore, temperature: float, alpha: float, ensemble: str, members: list[int] | None,
                   loss: str, allow_interpolation: bool) -> None:
    """Refuse, before training, settings the store cannot serve (as ``train-student`` refuses them)."""
    from kdcache.train.config import TrainConfig
    from kdcache.train.source import _check_sparse_settings
    if not temperature > 0:
        raise ConfigError(f"temperature {temperature}: temperatures must be positive")
    if not 0 <= alpha <= 1:
        raise ConfigError(f"alpha {alpha}: alpha must be between 0 and 1")
    check_loss(loss)
    m = store.manifest
    if m.store_layout.keeps_every_logit:  # the ensemble reduction and members are checked on a probe
        teacher_log_probs(torch.zeros(1, m.num_members, m.num_classes), 1.0, ensemble, members)
    _check_sparse_settings(store, TrainConfig(dataset="", student="", out="", store=store.path, losses=[loss],
                                              temperatures=[temperature], alphas=[alpha], members=members,
                                              allow_interpolation=allow_interpolation))


def check_tokenizer(store: LogitStore, tokenizer: Any) -> None:
    """A tokenizer that is not the one the store's token ids came from is refused."""
    want = store.manifest.dataset.get("tokenizer")
    if want is None or tokenizer is None or not callable(getattr(tokenizer, "get_vocab", None)):
        return
    from kdcache.integrations.hf import tokenizer_identity
    got = tokenizer_identity(tokenizer)
    if got["sha256"] != want["sha256"]:
        raise ConfigError(f"the Trainer's tokenizer {got['name']} ({got['size']} tokens, sha256 {got['sha256'][:12]}) "
                          f"is not store {store.path!r}'s {want['name']} ({want['size']} tokens, sha256 "
                          f"{want['sha256'][:12]}); train with the teacher's tokenizer")


def check_model(store: LogitStore, model: Any) -> None:
    """A student whose outputs are not the store's classes is refused."""
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    classes = (head.weight.shape[0] if head is not None and hasattr(head, "weight")
               else getattr(getattr(model, "config", None), "vocab_size", None))
    if classes is not None and int(classes) != store.num_classes:
        raise ConfigError(f"the student has {classes} output classes but store {store.path!r} holds logits over "
                          f"{store.num_classes}; use a student with the teacher's vocabulary")


def batch_ids(inputs: Any) -> torch.Tensor:
    """The batch's ``sample_id`` ``[B]``; a batch without them is refused in one line."""
    if not isinstance(inputs, dict) or SAMPLE_ID not in inputs:
        raise KdcacheError(_no_ids(", ".join(inputs) if isinstance(inputs, dict) else type(inputs).__name__))
    return torch.as_tensor(inputs[SAMPLE_ID]).reshape(-1)


def position_mask(lengths: np.ndarray, input_ids: torch.Tensor, teacher: TeacherRows, labels: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, sample_ids: np.ndarray | None = None) -> torch.Tensor:
    """``[B, L]`` True at the positions of each sequence that are the store's rows of it, after checking
    that the batch holds the store's tokens there: the next token of each row's position, where the
    batch has it, is the store's label of that row, and the attention mask (when given) covers exactly
    the positions the model runs on. The rows are each sequence's first ``lengths`` positions, or (an
    ``hf-chat:`` store, which needs ``sample_ids``) the positions its dataset's ``row_mask`` gives."""
    from kdcache.text import row_mask, widths
    device = input_ids.device
    width = input_ids.shape[1]
    dataset = teacher.row_dataset()
    if dataset is not None and sample_ids is None:
        raise StoreError(f"store {teacher.path!r} keeps rows at some positions only (its dataset's row mask): "
                         f"position_mask needs the batch's sample ids")
    seen = widths(dataset, sample_ids) if dataset is not None else np.asarray(lengths)
    if int(np.max(seen)) > width:
        raise StoreError(f"a batch of {width} positions but store {teacher.path!r} holds sequences of up to "
                         f"{int(np.max(seen))} of them: the batch is not the store's sequences (pass "
                         f"StoreDataset(store))")
    real = torch.arange(width, device=device)[None, :] < torch.from_numpy(seen).to(device)[:, None]
    mask = real if dataset is None else row_mask(dataset, sample_ids, width).to(device)
    if not torch.equal(mask.sum(1).cpu(), torch.as_tensor(np.asarray(lengths), dtype=torch.long)):
        raise StoreError(f"the dataset's rows of sample ids {np.asarray(sample_ids)[:5].tolist()} are not the ones "
                         f"store {teacher.path!r} holds: give the batch the store's dataset")
    stored = torch.full(input_ids.shape, -1, dtype=torch.long, device=device)
    stored[mask] = labels.to(device)
    same = (input_ids[:, 1:] == stored[:, :-1]) | ~(mask[:, :-1] & real[:, 1:])
    if attention_mask is not None:
        same = same & (attention_mask.bool() == real)[:, 1:]
    if not bool(same.all()):
        raise StoreError(f"the batch's tokens are not the ones store {teacher.path!r} holds for its sample ids (whose "
                         f"labels are each position's next token): give the batch the store's dataset "
                         f"({teacher.store.manifest.dataset['spec']!r}), its items' own sample ids, padded on the "
                         f"right")
    return mask


def _make_trainer_class() -> type:
    from kdcache.integrations.hf import _require
    transformers = _require()

    class DistillationTrainer(transformers.Trainer):
        """``transformers.Trainer`` that distils from a per-token kdcache store: the loss of every training
        batch is ``alpha * T^2 * KL(p_T(teacher) || p_T(student)) + (1 - alpha) * CE`` over its real
        positions (:func:`kdcache.losses.distillation_loss`, the store's rows and labels), normalised
        over the rows of the whole accumulated batch, so gradient accumulation gives the gradient of
        the full batch. Evaluation is the model's own loss (the store holds the training rows only).

        Args (keywords; the rest are ``Trainer``'s):
            store: the store's path (or an open :class:`LogitStore`).
            temperature, alpha, ensemble, members, loss, allow_interpolation: as ``train-student``'s
                ``--temperature``, ``--alpha``, ``--ensemble``, ``--members``, ``--loss``,
                ``--allow-interpolation``.
            store_order: read the sequences in ``train-student``'s order (:class:`StoreOrder`, seeded
                by ``args.data_seed``, else ``args.seed``): each store block is read once per epoch.
                False keeps the Trainer's random sampler. Used when the training dataset is the
                store's whole dataset.

        ``train_dataset`` defaults to :class:`StoreDataset` of the store and ``data_collator`` to
        :class:`StoreCollator`. The Trainer's tokenizer (``processing_class``), the student's vocabulary
        and a :class:`StoreDataset` are checked against the store when the Trainer is made, and
        every batch's tokens against the store's rows when it is trained on.
        """

        loss_is_scaled_for_ga = True  # normalised by the accumulated batch's rows here

        def __init__(self, *args: Any, store: str | LogitStore, temperature: float = DEFAULT_TEMPERATURE,
                     alpha: float = DEFAULT_ALPHA, ensemble: str = "mean-prob", members: list[int] | None = None,
                     loss: str = "kd", allow_interpolation: bool = False, store_order: bool = True,
                     **kwargs: Any) -> None:
            self.teacher = TeacherRows(store, allow_interpolation)
            check_settings(self.teacher.store, temperature, alpha, ensemble, members, loss, allow_interpolation)
            self.temperature, self.alpha, self.ensemble, self.members, self.kd_loss = (
                float(temperature), float(alpha), ensemble, members, loss)
            self.store_order = store_order
            if len(args) < 4 and kwargs.get("train_dataset") is None:
                kwargs["train_dataset"] = StoreDataset(self.teacher.store)
            data = kwargs.get("train_dataset")
            if isinstance(data, StoreDataset):
                check_pairing(self.teacher.store, data.data, data.spec)
                self.teacher.use_dataset(data.data)
            tok = kwargs.get("processing_class")
            if len(args) < 3 and kwargs.get("data_collator") is None:
                pad = getattr(tok, "pad_token_id", None)
                kwargs["data_collator"] = StoreCollator(int(pad) if pad is not None else getattr(data, "pad_id", 0))
            # refused before Trainer.__init__, which makes the output directory
            check_tokenizer(self.teacher.store, tok)
            model = args[0] if args else kwargs.get("model")
            if model is not None:
                check_model(self.teacher.store, model)
            if len(args) < 4:
                self._check_items(data)
            super().__init__(*args, **kwargs)
            self.model_accepts_loss_kwargs = True  # transformers < 5 reads this instead of loss_is_scaled_for_ga
            self._loss_sum: torch.Tensor | float = 0.0
            self._rows = 0

        def _check_items(self, dataset: Any) -> None:
            """A map-style dataset whose items carry no sample id is refused before anything runs."""
            if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) or not len(dataset):
                return
            item = dataset[0]
            if not isinstance(item, dict) or SAMPLE_ID not in item:
                raise KdcacheError(_no_ids(", ".join(item) if isinstance(item, dict) else type(item).__name__))

        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()
            if SAMPLE_ID not in self._signature_columns:  # kept through remove_unused_columns
                self._signature_columns.append(SAMPLE_ID)

        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            data = args[0] if args else kwargs.get("train_dataset", self.train_dataset)
            data = self.train_dataset if data is None else data
            if not self.store_order or len(data) != self.teacher.store.manifest.dataset["length"]:
                return super()._get_train_sampler(*args, **kwargs)
            a = self.args
            seed = a.data_seed if a.data_seed is not None else a.seed
            return StoreOrder(self.teacher.store, a.per_device_train_batch_size * a.gradient_accumulation_steps
                              * max(1, a.world_size), seed)

        def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
            """The next ``num_batches`` batches and their store rows in all (over every process)."""
            batches = []
            for _ in range(num_batches):
                try:
                    batches.append(next(epoch_iterator))
                except StopIteration:
                    break
            rows = sum(int(self.teacher.lengths(batch_ids(b).cpu().numpy()).sum()) for b in batches)
            total = torch.tensor([rows], dtype=torch.float32, device=device)
            if self.args.world_size > 1:
                total = self.accelerator.gather(total)
            return batches, total.sum()

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            model_inputs = {k: v for k, v in inputs.items() if k not in (SAMPLE_ID, "labels")}
            if not model.training:  # evaluation: the model's own next-token loss
                outputs = model(**model_inputs, labels=inputs.get("labels"))
                return (outputs.loss, outputs) if return_outputs else outputs.loss
            ids = batch_ids(inputs)
            targets, labels, lengths = self.teacher.rows(ids.cpu().numpy())
            mask = position_mask(lengths, inputs["input_ids"], self.teacher, labels, inputs.get("attention_mask"),
                                 ids.cpu().numpy())
            outputs = model(**model_inputs)
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            device = logits.device
            loss = distillation_loss(logits[mask], targets.to(device), labels.to(device), self.temperature,
                                     self.alpha, self.ensemble, self.members, self.kd_loss)
            rows = int(lengths.sum())
            self._loss_sum = self._loss_sum + loss.detach().double() * rows
            self._rows += rows
            if num_items_in_batch is not None:  # this micro-batch's share of the accumulated batch
                loss = loss * (rows / num_items_in_batch)
                if self.args.world_size > 1:  # DDP averages gradients over processes; the rows are summed
                    loss = loss * self.args.world_size
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            """Adds ``distill_loss``: the mean loss per row since the last log (``train-student``'s epoch
            ``loss`` when logged once an epoch), unrounded, and ``distill_positions``, those rows."""
            if "loss" in logs and self._rows:
                logs["distill_loss"] = float(self._loss_sum) / self._rows
                logs["distill_positions"] = self._rows
                self._loss_sum, self._rows = 0.0, 0
            super().log(logs, *args, **kwargs)

    return DistillationTrainer


_CLASSES: dict[str, type] = {}


def _refusal(c: Any) -> str | None:
    """Why the Trainer engine cannot train ``c`` (a resolved TrainConfig), or None."""
    from kdcache.integrations.hf import is_hf_spec
    combos = (len(c.losses) * len(c.temperatures) * len(c.alphas) * len(c.seeds) * len(c.lrs))
    why = [
        (not c.store, "it distils from a per-token store: give {param:store} (a store-less run trains with the "
                      "default engine)"),
        (not is_hf_spec(c.student), f"it trains hf: students (transformers models), not {c.student!r}"),
        (combos > 1, f"it trains one student, this sweep has {combos}: give one {{param:temperature}}, "
                     f"{{param:alpha}}, {{param:seed}}, {{param:lr}} and {{param:loss}} (the default engine trains a "
                     f"sweep in one pass)"),
        (c.lora is not None, "it has no {param:lora} (give DistillationTrainer a PEFT model in your own script)"),
        (c.max_norm is not None, "it has no {param:max_norm}"),
        (c.amp != "off", "it has no {param:amp} (give TrainingArguments(bf16=True) in your own Trainer script)"),
        (c.checkpoint_every > 0, "it writes no checkpoints during the run (killed, it starts again)"),
        (c.remote_cache is not None, "it has no {param:remote_cache}"),
        (int(os.environ.get("WORLD_SIZE", "1")) > 1, "it runs in one process (under torchrun, use "
                                                     "DistillationTrainer in your own script)"),
    ]
    return next((w for bad, w in why if bad), None)


class _Epochs:
    """Each epoch's metrics as ``train-student`` records them: the mean distillation loss per row (the
    Trainer's ``distill_loss`` logged once an epoch), the rows seen, the epoch's lr and seconds, and
    kdcache's evaluation of the student (``Evaluator``: accuracy, perplexity on the eval rows,
    agreement with the teacher)."""

    def __init__(self, c: Any, evaluator: Any, sequences: int, positions: int) -> None:
        import time
        self.c, self.evaluator, self.sequences, self.positions = c, evaluator, sequences, positions
        self.history: list[dict[str, Any]] = []
        self.clock = time.perf_counter
        self.t0 = self.clock()

    def begin(self) -> None:
        self.t0 = self.clock()

    def log(self, logs: dict[str, Any] | None, model: Any) -> None:
        if not logs or "distill_loss" not in logs:
            return
        from kdcache.integrations.hf import CausalLM
        from kdcache.train.config import lr_at
        seconds = self.clock() - self.t0
        epoch = len(self.history)
        seen = int(logs["distill_positions"])
        m = {"epoch": epoch + 1, "loss": float(logs["distill_loss"]), "train_accuracy": None,
             "samples_seen": self.sequences, "coverage_ok": seen == self.positions,
             "lr": lr_at(self.c.lrs[0], epoch, self.c.epochs, self.c.schedule), "seconds": seconds,
             "positions_seen": seen}
        was_training = model.training
        m.update(self.evaluator(CausalLM(model)))
        model.train(was_training)
        self.history.append(m)


def train_with_trainer(c: Any) -> list[dict[str, Any]]:
    """``train-student --engine trainer``: one ``hf:`` student distilled from a per-token store by
    :class:`DistillationTrainer`, the settings of ``c`` (a :class:`kdcache.train.TrainConfig` as
    ``train_students`` resolved it: call that with ``engine="trainer"``) mapped onto it: the same
    student (``load_model`` with the seed), the same torch optimizer (``--optimizer``, ``--momentum``,
    ``--weight-decay``), the same lr per epoch (``--schedule``, ``--warmup``, as a LambdaLR the Trainer
    steps), ``train-student``'s order (``--data-seed``), no gradient clipping. The run directory is
    written as ``train-student`` writes one (checkpoint, ``hf/``, config.json, metrics.json,
    summary.json), so ``evaluate`` and ``report`` read it.

    What it cannot do is refused in one line (sweeps, students that are not ``hf:``, stores with a row
    per sample, ...). It checks no divergence and writes no checkpoint during the run."""
    import math
    import tempfile
    from pathlib import Path

    from kdcache.distributed import resolve_device
    from kdcache.integrations.hf import CausalLM, _require
    from kdcache.specs import load_model
    from kdcache.train.config import lr_at, warmup_scale
    from kdcache.train.epoch_eval import Evaluator
    from kdcache.train.results import write_run, write_summary
    from kdcache.train.source import store_identity
    from kdcache.train.students import make_optimizer, plan_students

    transformers = _require()
    why = _refusal(c)
    if why:
        raise ConfigError(f"{{param:engine}} trainer: {why}")
    store = _open(c.store)
    student = plan_students(c, Path(c.out))[0]
    if (student.out / "config.json").exists() and not c.overwrite:
        raise KdcacheError(f"{student.out} already holds training results (config.json); pass {{param:overwrite}} to "
                           f"replace them or choose another {{param:out}}")
    device = resolve_device(c.device)
    train_data = StoreDataset(store, c.dataset)
    data = train_data.resolved
    resolved = load_model(c.student, data.input_shape, store.num_classes, c.dropout, c.input_dropout,
                          seed=student.seed)
    model = resolved.module.model
    evaluator = Evaluator(c, device)
    optimizer = make_optimizer(model.parameters(), c, student.lr)
    steps = math.ceil(len(train_data) / c.batch_size)
    warmup_steps = round(c.warmup * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(1.0, min(step // steps, c.epochs - 1), c.epochs, c.schedule)
        * (warmup_scale(step, warmup_steps) if warmup_steps else 1.0))
    epochs = _Epochs(c, evaluator, len(train_data), store.num_samples)
    show = c.progress if c.progress is not None else sys.stderr.isatty()

    class EpochMetrics(transformers.TrainerCallback):
        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            epochs.begin()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, model: Any = None,
                   **kwargs: Any) -> None:
            epochs.log(logs, model)

    with tempfile.TemporaryDirectory(prefix="kdcache-trainer-") as tmp:
        args = transformers.TrainingArguments(
            output_dir=tmp, report_to="none", save_strategy="no", logging_strategy="epoch",
            num_train_epochs=c.epochs, per_device_train_batch_size=c.batch_size, learning_rate=student.lr,
            max_grad_norm=0.0, seed=student.seed, data_seed=c.data_seed, use_cpu=device.type == "cpu",
            dataloader_num_workers=c.workers, disable_tqdm=not show)
        trainer = __getattr__("DistillationTrainer")(
            model=model, args=args, train_dataset=train_data, processing_class=train_data.tokenizer,
            optimizers=(optimizer, schedule), callbacks=[EpochMetrics()], store=store, temperature=student.temperature,
            alpha=student.alpha, ensemble=c.ensemble, members=c.members, loss=student.loss,
            allow_interpolation=c.allow_interpolation)
        trainer.remove_callback(transformers.PrinterCallback)  # the epochs' table is printed at the end
        trainer.train()
    student.history = epochs.history
    module = CausalLM(model.to("cpu"))
    result = write_run(student, module, c, resolved.arch, data.input_shape, store.num_classes,
                       store_identity(c.store), data)
    write_summary(Path(c.out), [result], c)
    store.close()
    return [result]


def __getattr__(name: str) -> Any:
    if name == "DistillationTrainer":  # made on first use: it subclasses transformers.Trainer
        if name not in _CLASSES:
            _CLASSES[name] = _make_trainer_class()
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
