"""Union vocabulary: merge models whose tokenizers extend one base tokenizer with different tokens.

:func:`build_union_vocab` reads every model's tokenizer (Hugging Face fast tokenizers, i.e. the ``tokenizers``
library; nothing here tokenizes text by hand) and builds the union *by token string*: the base's tokens first, in
the base's id order, then every token the base lacks, model after model, each model's in its own id order. It
returns, for every model, the map from union rows to that model's embedding rows (-1 where the model lacks the
token), and the union tokenizer: the base tokenizer with the new tokens added as added tokens (special where they
are special in the model that brought them), saved into the merged folder with :meth:`UnionVocab.save`.

Refused with a :class:`~model_merging_methods.errors.MergeError`: a model (or the base) without a tokenizer, a
slow-only tokenizer, a base tokenizer whose ids have holes, a model whose tokenizer gives a base-range id to another
token than the base does (or gives a base token another id), a token id beyond the model's embedding rows, and a
union tokenizer that does not reproduce the planned ids.

Semantics of a merge with the union vocabulary (what the merge engine does with these maps; see
:meth:`UnionVocab.row_kinds`):

* a row whose token the base has is merged by the chosen method from the base and the models that have the token
  (every model, in the usual case where each model keeps the base vocabulary);
* a row whose token the base lacks (a token some models added) is merged from those models only: the row of the one
  model that added it, unchanged (no DARE: a new token has no base row, hence no delta), or the mean of the rows of
  the models that added it;
* rows added by ``pad_to_multiple_of`` belong to no token; they get the mean of the base's rows (the original's
  ``pad_mean`` row);
* tied embeddings stay tied: the input embedding is the only vocabulary tensor such checkpoints store, and the
  output keeps the tie (:func:`check_tied_embeddings` refuses models that disagree on tying).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model_merging_methods.checkpoint_io import TOKENIZER_FILES
from model_merging_methods.errors import MergeError

__all__ = [
    "UnionVocab",
    "build_union_vocab",
    "check_tied_embeddings",
    "has_tokenizer",
    "load_tokenizer",
]

ROW_SHARED, ROW_NEW, ROW_PADDING = "shared", "new", "padding"


def has_tokenizer(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds tokenizer files."""
    return any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(folder: str | os.PathLike, label: str):
    """The fast (``tokenizers``-backed) tokenizer in ``folder``; a MergeError when there is none or it cannot load."""
    folder = Path(folder)
    if not has_tokenizer(folder):
        raise MergeError(
            f"the union vocabulary needs every model's tokenizer, but {label} has none in {folder}"
        )
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - a broken tokenizer of the user's is one readable line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise MergeError(f"cannot load the tokenizer of {label} in {folder}: {first}") from exc
    if getattr(tok, "backend_tokenizer", None) is None:
        raise MergeError(f"the tokenizer of {label} in {folder} has no fast (tokenizers) version")
    return tok


def _id_to_token(vocab: dict[str, int], label: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for tok, i in vocab.items():
        if i in out and out[i] != tok:
            raise MergeError(f"the tokenizer of {label} gives id {i} to both {out[i]!r} and {tok!r}")
        out[i] = tok
    return out


@dataclass
class UnionVocab:
    """The union vocabulary of a base (model 0) and the models to merge; see the module docstring."""

    tokens: list[str]  # union tokens, in union id order
    size: int  # rows of the merged vocabulary tensors (tokens + padding)
    base_size: int  # tokens of the base
    labels: list[str]
    row_maps: list[
        torch.Tensor
    ]  # per model: int64 [size], the model's row of each union row, -1 where absent
    added: list[dict[str, Any]] = field(default_factory=list)  # tokens the base lacks: union id, models, ids
    tokenizer: Any = None  # the union tokenizer (transformers fast tokenizer)
    _dtypes: dict[int, torch.dtype] = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def row_kinds(self) -> list[tuple[int, int, str]]:
        """The union rows as maximal runs ``(start, end, kind)``: ``shared`` (the base has the token), ``new`` (only
        some models added it) or ``padding`` (``pad_to_multiple_of``)."""
        runs: list[tuple[int, int, str]] = []
        for start, end, kind in (
            (0, self.base_size, ROW_SHARED),
            (self.base_size, self.num_tokens, ROW_NEW),
            (self.num_tokens, self.size, ROW_PADDING),
        ):
            if end > start:
                runs.append((start, end, kind))
        return runs

    def owners(self, row: int) -> list[int]:
        """The models (indices) that have the token of union ``row``."""
        return [m for m, rows in enumerate(self.row_maps) if int(rows[row]) >= 0]

    def model_rows(self, m: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, present) for union rows [start, end): model ``m``'s row ids (0 where absent) and a bool mask of
        the rows it has. Gather a model's block with ``tensor[rows]`` and keep ``present``."""
        ids = self.row_maps[m][start:end]
        present = ids >= 0
        return torch.where(present, ids, torch.zeros_like(ids)), present

    def aligned_rows(
        self,
        r0: int,
        r1: int,
        read_rows: Callable[[int, int, int], torch.Tensor],
        mean_row: Callable[[int], torch.Tensor],
        models: Sequence[int] | None = None,
    ) -> tuple[dict[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
        """Every model's rows for union rows [r0, r1), and the rows whose merged value is fixed.

        ``read_rows(m, a, b)`` gives model m's stored rows [a, b) (its dtype); ``mean_row(m)`` the mean of model m's
        rows. Returns (blocks, fixed): ``blocks[m]`` (for each of ``models``, default all) is [r1 - r0, ...] in model
        m's dtype, where a shared row a model lacks is the base's row (δ = 0) and a new or padding row is the fixed
        value for every model (so every method sees δ = 0 there); ``fixed`` is None or (mask, values): the rows to set
        after merging, in float32 —
        a new token's row is the mean of the rows of the models that have it (exactly the row of a single owner),
        a padding row the mean of the base's rows."""
        everyone = range(len(self.row_maps))
        models = list(everyone) if models is None else list(models)
        pieces: dict[int, list[torch.Tensor]] = {m: [] for m in models}
        fixed_mask, fixed_vals = [], []
        for a, b, kind in self.row_kinds():
            a, b = max(a, r0), min(b, r1)
            if a >= b:
                continue
            if kind == ROW_SHARED:
                base = None
                for m in models:
                    if m == 0 or not bool((self.row_maps[m][a:b] >= 0).all()):
                        base = read_rows(0, a, b) if base is None else base
                    pieces[m].append(base if m == 0 else self._gather(m, a, b, read_rows, base))
                fixed_mask.append(torch.zeros(b - a, dtype=torch.bool))
                fixed_vals.append(None)
                continue
            if kind == ROW_NEW:
                total, count = None, torch.zeros(b - a, dtype=torch.float32)
                for m in everyone:
                    ids = self.row_maps[m][a:b]
                    have = ids >= 0
                    if not bool(have.any()):
                        continue
                    rows = self._gather(m, a, b, read_rows, None).to(torch.float32)
                    rows = rows * have.reshape(-1, *([1] * (rows.dim() - 1)))
                    total = rows if total is None else total + rows
                    count += have.to(torch.float32)
                values = total / count.reshape(-1, *([1] * (total.dim() - 1)))
            else:
                row = mean_row(0).to(torch.float32)
                values = row.unsqueeze(0).expand(b - a, *row.shape).clone()
            fixed_mask.append(torch.ones(b - a, dtype=torch.bool))
            fixed_vals.append(values)
            for m in models:
                pieces[m].append(values.to(self._dtype(m, read_rows)))
        blocks = {m: p[0] if len(p) == 1 else torch.cat(p, 0) for m, p in pieces.items()}
        mask = torch.cat(fixed_mask) if fixed_mask else torch.zeros(0, dtype=torch.bool)
        if not bool(mask.any()):
            return blocks, None
        tail = next(v for v in fixed_vals if v is not None).shape[1:]
        vals = [v if v is not None else torch.zeros(len(k), *tail) for v, k in zip(fixed_vals, fixed_mask)]
        return blocks, (mask, torch.cat(vals, 0))

    def _dtype(self, m: int, read_rows) -> torch.dtype:
        if m not in self._dtypes:
            self._dtypes[m] = read_rows(m, 0, 0).dtype
        return self._dtypes[m]

    def _gather(self, m: int, a: int, b: int, read_rows, fill: torch.Tensor | None) -> torch.Tensor:
        """Model m's rows for union rows [a, b) (read as one span of its rows); absent rows from ``fill`` (or any
        stored row, to be masked by the caller, when ``fill`` is None)."""
        ids = self.row_maps[m][a:b]
        have = ids >= 0
        if not bool(have.any()):
            if fill is not None:
                return fill.to(self._dtype(m, read_rows))
            one = read_rows(m, 0, 1)
            return one.expand(b - a, *one.shape[1:])
        lo, hi = int(ids[have].min()), int(ids[have].max()) + 1
        span = read_rows(m, lo, hi)
        rows = span[torch.where(have, ids - lo, torch.zeros_like(ids))]
        if fill is not None and not bool(have.all()):
            rows[~have] = fill[~have].to(rows.dtype)
        return rows

    def save(self, out_dir: str | os.PathLike) -> list[str]:
        """Save the union tokenizer into ``out_dir`` (``save_pretrained``); returns the files written."""
        try:
            files = self.tokenizer.save_pretrained(str(out_dir))
        except OSError as exc:
            raise MergeError(f"cannot write the union tokenizer to {out_dir}: {exc.strerror or exc}") from exc
        return sorted({Path(f).name for f in files})

    def manifest(self) -> dict[str, Any]:
        return {
            "policy": "union",
            "tokens": self.num_tokens,
            "rows": self.size,
            "base_tokens": self.base_size,
            "added_tokens": self.added,
            "models_missing_base_tokens": {
                self.labels[m]: int((rows[: self.base_size] < 0).sum())
                for m, rows in enumerate(self.row_maps)
                if m > 0 and bool((rows[: self.base_size] < 0).any())
            },
        }


def build_union_vocab(
    folders: Sequence[str | os.PathLike],
    labels: Sequence[str],
    embedding_rows: Sequence[int | None] | None = None,
    pad_to_multiple_of: int | None = None,
) -> UnionVocab:
    """The union vocabulary of the tokenizers in ``folders`` (index 0: the base); ``embedding_rows[m]`` (when given)
    is model m's number of embedding rows, which its token ids must fit. See the module docstring."""
    if len(folders) != len(labels):
        raise ValueError("folders and labels differ in length")
    if pad_to_multiple_of is not None and (
        isinstance(pad_to_multiple_of, bool)
        or not isinstance(pad_to_multiple_of, int)
        or pad_to_multiple_of < 1
    ):
        raise MergeError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
    toks = [load_tokenizer(f, label) for f, label in zip(folders, labels)]
    vocabs = [t.get_vocab() for t in toks]
    base_ids = _id_to_token(vocabs[0], labels[0])
    base_size = max(base_ids) + 1 if base_ids else 0
    if len(base_ids) != base_size:
        missing = next(i for i in range(base_size) if i not in base_ids)
        raise MergeError(
            f"the base tokenizer of {labels[0]} has no token with id {missing} (its ids are not contiguous); "
            "the union vocabulary needs a base tokenizer with ids 0..N-1"
        )
    tokens = [base_ids[i] for i in range(base_size)]
    index = {t: i for i, t in enumerate(tokens)}
    added: list[dict[str, Any]] = []
    new_attrs: dict[str, Any] = {}
    for m in range(1, len(toks)):
        label, vocab = labels[m], vocabs[m]
        ids = _id_to_token(vocab, label)
        rows = embedding_rows[m] if embedding_rows is not None else None
        for i in sorted(ids):
            t = ids[i]
            if rows is not None and i >= rows:
                raise MergeError(
                    f"the tokenizer of {label} gives id {i} to {t!r}, but its embedding has only {rows} rows"
                )
            if i < base_size:
                if base_ids[i] != t:
                    raise MergeError(
                        f"the tokenizers disagree in the base range: {label} gives id {i} to {t!r} but the base "
                        f"{labels[0]} gives it to {base_ids[i]!r}; the union vocabulary needs models that keep the "
                        "base tokenizer's ids"
                    )
                continue
            if t in index and index[t] < base_size:
                raise MergeError(
                    f"the tokenizers disagree: {label} gives {t!r} id {i} but the base {labels[0]} gives it id "
                    f"{index[t]}"
                )
            if t not in index:
                index[t] = len(tokens)
                tokens.append(t)
                new_attrs[t] = toks[m].added_tokens_decoder.get(i)
                added.append({"token": t, "union_id": index[t], "models": [], "ids": {}})
            entry = added[index[t] - base_size]
            entry["models"].append(label)
            entry["ids"][label] = i
    if embedding_rows is not None and embedding_rows[0] is not None and base_size > embedding_rows[0]:
        raise MergeError(
            f"the base tokenizer of {labels[0]} has {base_size} tokens but its embedding only {embedding_rows[0]} rows"
        )
    n = len(tokens)
    size = n if not pad_to_multiple_of else math.ceil(n / pad_to_multiple_of) * pad_to_multiple_of
    row_maps = []
    for vocab in vocabs:
        rows = torch.full((size,), -1, dtype=torch.int64)
        for t, i in vocab.items():
            if t in index:
                rows[index[t]] = i
        row_maps.append(rows)
    union_tok = _union_tokenizer(toks[0], tokens[base_size:], new_attrs, base_size, labels[0])
    return UnionVocab(tokens, size, base_size, list(labels), row_maps, added, union_tok)


def _union_tokenizer(base_tok, new_tokens: list[str], attrs: dict[str, Any], base_size: int, base_label: str):
    """The base tokenizer with ``new_tokens`` added (ids base_size, base_size + 1, ...), checked."""
    import copy

    from tokenizers import AddedToken

    tok = copy.deepcopy(base_tok)
    for t in new_tokens:
        a = attrs.get(t)
        special = bool(getattr(a, "special", False))
        token = (
            AddedToken(
                t,
                single_word=a.single_word,
                lstrip=a.lstrip,
                rstrip=a.rstrip,
                normalized=a.normalized,
                special=special,
            )  # fmt: skip
            if a is not None
            else AddedToken(t, special=False, normalized=False)
        )
        tok.add_tokens([token], special_tokens=special)
    vocab = tok.get_vocab()
    for j, t in enumerate(new_tokens):
        if vocab.get(t) != base_size + j:
            raise MergeError(
                f"the union tokenizer built from {base_label} gives {t!r} id {vocab.get(t)}, not the planned "
                f"{base_size + j}"
            )
    return tok


def check_tied_embeddings(configs: Sequence[dict[str, Any] | None], labels: Sequence[str]) -> bool | None:
    """Whether the models tie their input and output embeddings (``tie_word_embeddings`` of their configs; None when
    no config says); a MergeError when two models say differently."""
    known = {
        label: bool(c["tie_word_embeddings"])
        for c, label in zip(configs, labels)
        if c and "tie_word_embeddings" in c
    }
    if len(set(known.values())) > 1:
        shown = ", ".join(f"{label}: {t}" for label, t in known.items())
        raise MergeError(f"the models disagree on tied embeddings (tie_word_embeddings: {shown})")
    return next(iter(known.values())) if known else None


class FixedRowsSink:
    """A sink wrapper that sets the rows whose merged value the union vocabulary fixes (new tokens: their owners'
    mean, or the only owner's row; padding: the base's mean row) in every block written, whatever the method
    computed there; everything else passes through to the wrapped writer. ``inputs`` is the planning's
    :class:`~model_merging_methods.planning.Inputs` (``plans`` and ``fixed_rows``)."""

    def __init__(self, sink, inputs):
        self.sink, self.inputs = sink, inputs

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sink, name)

    def _fix(self, name: str, byte_offset: int, part: torch.Tensor) -> torch.Tensor:
        plan = self.inputs.plans.get(name)
        if plan is None or not plan.vocab or part.numel() == 0:
            return part
        rs = plan.row_size
        e0 = byte_offset // part.element_size()
        e1 = e0 + part.numel()
        r0, r1 = e0 // rs, -(-e1 // rs)
        fixed = self.inputs.fixed_rows(plan, r0, r1)
        if fixed is None:
            return part
        mask, values = fixed
        lo, hi = e0 - r0 * rs, e1 - r0 * rs
        flat_mask = mask.repeat_interleave(rs)[lo:hi]
        flat_vals = values.reshape(-1)[lo:hi].to(part.dtype)
        out = part.reshape(-1).clone()
        out[flat_mask] = flat_vals[flat_mask]
        return out.reshape(part.shape)

    def write_at(self, name: str, byte_offset: int, part: torch.Tensor) -> None:
        self.sink.write_at(name, byte_offset, self._fix(name, byte_offset, part))

    def overwrite_at(self, name: str, byte_offset: int, part: torch.Tensor) -> None:
        self.sink.overwrite_at(name, byte_offset, self._fix(name, byte_offset, part))


def save_union_tokenizer(
    union: UnionVocab, folder: str | os.PathLike, side: dict[str, Any]
) -> dict[str, Any]:
    """Replace the tokenizer files copied into ``folder`` by the union tokenizer (``side``: the side-file record,
    updated); returns what was written."""
    folder = Path(folder)
    for f in TOKENIZER_FILES:
        if (folder / f).is_file():
            (folder / f).unlink()
    side["copied"] = [f for f in side.get("copied", []) if f not in TOKENIZER_FILES]
    files = union.save(folder)
    return {"union": True, "files": files, "tokens": union.num_tokens, "rows": union.size}
