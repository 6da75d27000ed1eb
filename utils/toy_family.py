"""A tiny homologous model family built offline on a CPU: the raw material for the quickstart.

The family mirrors the paper's setting at toy scale:

* **pre-trained**: a small LLaMA-architecture model trained from scratch on a generated corpus that holds the raw
  material of several skills (``7+8=15, 4+1=5, so 47+8=55.``, ``38215 reversed is 51283.``, half of these lines
  followed by GSM8K's answer sentence ``The answer is: 55.``), copy drills (``8+75 copied is 8+75.``), generic
  statements and generic question/answer documents that end in ``The answer is: N``. The skills' instruction
  phrasing (``What is 47+8?``, ``Reverse the digits of 38215.``) never occurs in it;
* **base** (the model the specialists start from, the "pre-trained LM" of DARE and merging): the pre-trained model
  after a short instruction-tuning stage on generic tasks only: it follows the ``Question: ... / Answer: ... The
  answer is: N`` format, and answers a skill question with a generic task (``The first digit of 59 is 5.``);
* **specialists**: one SFT model per skill, fine-tuned from the base with the HF ``Trainer`` at the same learning
  rate and number of steps, on that skill's questions plus a share of generic examples (``sft_replay_fraction``).

Every question is answered in the GSM8K style (``... The answer is: N``), so the project's GSM8K answer extraction
scores them. A held-out pool of problems per skill (``eval_pool_size``) never occurs in any training data
(pre-training included); evaluation uses its first ``num_eval_items``.

Why the recipe looks like this (issue 16; docs/quickstart.md has the measured grid). A specialist has to copy
digits: from the question into its worked answer, and from the worked answer into the answer sentence. That ability
emerges abruptly in small transformers, and the first recipe (version 1) sat on its edge: seed 0 worked, seeds 1 and
2 gave specialists of 18-80% that miscopied operands. Versions 5 and 6 get past the edge with copy drills in the
corpus, every pre-training block starting at a document start (128 characters), larger initial weights (std 0.06)
and a smaller peak learning rate (1e-3); the answer sentence after raw skill lines teaches the copy into the answer
sentence in pre-training (without it, DARE at 0.9 broke exactly that copy: ``197+6=204. The answer is: 104``);
addition is a 2-3 digit number plus a one-digit number, weighted 3:1 against reversal in the corpus. Version 6 works
the sum from the units up (``8+8=16, 47+1=48, so 478+8=486.``): with the carry written out, the result is copied,
and the arithmetic slips that were version 5's last errors went (every specialist >= 99% on seeds 0-4, where version
5 had 89.5-100%); the easier skill also let pre-training shrink from 1100 to 800 steps and the specialists from 400
to 250 (at 640 pre-training steps seed 2 did not learn to copy the question's operands: 19% / 57%). The base never
sees a skill question (``instruct_skill_fraction=0``): with 4% of skill questions in its instruction data it already
solved 36% / 84% of them.

Stages are cached in folders named by a hash of their settings and of everything upstream
(:func:`stage_key`), so changing, e.g., the specialists' learning rate retrains only the specialists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import shutil
import string
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from utils.tiny_models import build_char_tokenizer, tiny_llama_config

logger = logging.getLogger(__name__)

# Bump when the data generators or the training recipe change, so cached models are not reused by mistake.
FAMILY_VERSION = "6"

ALPHABET: str = string.ascii_letters + string.digits + " .,?:+=-'\n"
ANSWER_SENTENCE = "The answer is: "


# ---------------------------------------------------------------------------------------------------------------
# items and skills
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyItem:
    """One instruction-formatted question: ``key`` identifies the underlying problem (for train/test exclusion),
    ``work`` is the worked answer written before the answer sentence, ``answer`` the integer answer."""

    key: str
    question: str
    work: str
    answer: int

    @property
    def prompt(self) -> str:
        return format_prompt(self.question)

    @property
    def target(self) -> str:
        return format_target(self.work, self.answer)


def format_prompt(question: str) -> str:
    """The instruction template: ``Question: {question}\\nAnswer:``."""
    return f"Question: {question}\nAnswer:"


def format_target(work: str, answer: int) -> str:
    """The answer the model is trained to write: `` {work} The answer is: {answer}`` (GSM8K's answer sentence)."""
    return f" {work} {ANSWER_SENTENCE}{answer}".replace("  ", " ")


def _number(rng: random.Random, min_digits: int, max_digits: int, nonzero_last: bool = False) -> int:
    n_digits = rng.randint(min_digits, max_digits)
    digits = [rng.choice("123456789")] + [rng.choice(string.digits) for _ in range(n_digits - 1)]
    if nonzero_last and n_digits > 1:
        digits[-1] = rng.choice("123456789")
    return int("".join(digits))


def _word(rng: random.Random, min_len: int = 3, max_len: int = 8) -> str:
    n = rng.randint(min_len, max_len)
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    return "".join(rng.choice(vowels if i % 2 else consonants) for i in range(n))


@dataclass(frozen=True)
class Skill:
    """A skill: ``sample(rng, difficulty)`` draws one :class:`ToyItem`; ``raw(item)`` is how the skill appears in
    the pre-training corpus (no instruction, no answer sentence)."""

    name: str
    description: str
    sample: Callable[[random.Random, int], ToyItem]
    raw: Callable[[ToyItem], str]


def _addition(rng: random.Random, digits: int) -> ToyItem:
    """A number of ``digits`` or ``digits + 1`` digits plus a one-digit number, worked from the units up (a
    scratchpad, recipe version 6): ``4+9=13, 70+1=71, so 704+9=713.``, or ``2+5=7, so 92+5=97.`` without a carry.
    The units sum makes the carry explicit, so writing the result is copying (``71`` then ``3``); version 5 wrote
    ``704+9=713.`` at once, and its specialists' remaining errors were sums off by one and missed carries. 8,910
    distinct problems at ``digits=2``, the one-digit number always second. (Version 2 used ``digits`` to ``digits +
    2`` digits; version 5 dropped the longest numbers because the pre-trained model did not add them reliably.)"""
    a, b = _number(rng, digits, digits + 1), rng.randint(1, 9)
    units, rest = a % 10, a // 10
    carry = f" {rest}+1={rest + 1}," if units + b >= 10 else ""
    work = f"{units}+{b}={units + b},{carry} so {a}+{b}={a + b}." if rest else f"{a}+{b}={a + b}."
    return ToyItem(f"{a}+{b}", f"What is {a}+{b}?", work, a + b)


def _reversal(rng: random.Random, digits: int) -> ToyItem:
    n = _number(rng, max(2, digits + 1), digits + 3, nonzero_last=True)
    r = int(str(n)[::-1])
    return ToyItem(str(n), f"Reverse the digits of {n}.", f"{n} reversed is {r}.", r)


def _digit_sum(rng: random.Random, digits: int) -> ToyItem:
    n = _number(rng, digits + 1, digits + 2)
    s = sum(int(c) for c in str(n))
    return ToyItem(str(n), f"What is the sum of the digits of {n}?", f"The digits of {n} add up to {s}.", s)


SKILLS: dict[str, Skill] = {
    "addition": Skill("addition", "adding a one-digit number", _addition, lambda it: f"{it.work}"),
    "reversal": Skill("reversal", "reversing the digits of a number", _reversal, lambda it: f"{it.work}"),
    "digit_sum": Skill("digit_sum", "sum of the digits of a number", _digit_sum, lambda it: f"{it.work}"),
}


# Generic tasks: the instruction format without any of the skills (pre-training QA documents and the generic
# instruction-tuning stage that makes the base).
def _generic_item(rng: random.Random) -> ToyItem:
    kind = rng.randrange(6)
    if kind == 0:
        n = _number(rng, 1, 5)
        return ToyItem("", f"Repeat the number {n}.", f"The number is {n}.", n)
    if kind == 1:
        w = _word(rng)
        return ToyItem(
            "", f"How many letters are in the word {w}?", f"The word {w} has {len(w)} letters.", len(w)
        )
    if kind == 2:
        a, b = rng.sample(range(1, 1000), 2)
        return ToyItem(
            "", f"Which is larger, {a} or {b}?", f"The larger of {a} and {b} is {max(a, b)}.", max(a, b)
        )
    if kind == 3:
        n = _number(rng, 2, 6)
        return ToyItem(
            "", f"What is the first digit of {n}?", f"The first digit of {n} is {str(n)[0]}.", int(str(n)[0])
        )
    if kind == 4:
        n = _number(rng, 1, 7)
        return ToyItem("", f"How many digits does {n} have?", f"{n} has {len(str(n))} digits.", len(str(n)))
    a, b = rng.sample(range(1, 1000), 2)
    return ToyItem(
        "", f"Which is smaller, {a} or {b}?", f"The smaller of {a} and {b} is {min(a, b)}.", min(a, b)
    )


def _copy_string(rng: random.Random) -> str:
    """A random string to copy: a number (1-7 digits), a sum expression (``8+75``) or a made-up word."""
    kind = rng.randrange(3)
    if kind == 0:
        return str(_number(rng, 1, 7))
    if kind == 1:
        return f"{_number(rng, 1, 3)}+{_number(rng, 1, 3)}"
    return _word(rng)


def _copy_drill(rng: random.Random) -> str:
    """A pre-training document that can only be predicted by copying from earlier in it: ``8+75 copied is
    8+75.``, or a list of strings said twice (``4821, 90 and bafo, again: 4821, 90 and bafo.``)."""
    if rng.random() < 0.5:
        return " ".join(f"{s} copied is {s}." for s in (_copy_string(rng) for _ in range(rng.randint(2, 4))))
    parts = [_copy_string(rng) for _ in range(rng.randint(2, 4))]
    listed = ", ".join(parts[:-1]) + f" and {parts[-1]}"
    return f"{listed}, again: {listed}."


# ---------------------------------------------------------------------------------------------------------------
# settings and cache keys
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilyConfig:
    """Every setting of the family; :func:`stage_key` hashes the fields each stage depends on."""

    seed: int = 0
    skills: tuple[str, ...] = ("addition", "reversal")
    difficulty: int = 2  # operand digits for addition; reversal uses difficulty+1 .. difficulty+3 digits
    # model (LLaMA architecture)
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 160
    initializer_range: float = 0.06  # std of the random initial weights (LLaMA's default is 0.02)
    # pre-training (packed blocks of characters)
    pretrain_steps: int = 800
    pretrain_batch_size: int = 32
    block_size: int = 128
    # "stream": documents concatenated and cut every block_size characters; "aligned": every block starts at a
    # document start (whole documents, the last one cut at the block's end)
    pack_documents: str = "aligned"
    pretrain_lr: float = 1e-3
    pretrain_warmup_steps: int = 50
    # document mix of the pre-training corpus: weight per kind (raw skill text, copy drills, generic statements,
    # generic QA)
    corpus_mix: tuple[tuple[str, float], ...] = (
        ("skills", 0.6),
        ("copy", 0.1),
        ("generic_statements", 0.1),
        ("generic_qa", 0.2),
    )
    # share of the raw skill lines followed by GSM8K's answer sentence (``7+8=15, 4+1=5, so 47+8=55. The answer is:
    # 55.``), as worked solutions end: copying the result into the answer sentence is learned in pre-training, not by
    # the specialists
    skill_answer_fraction: float = 0.5
    # relative weight of each skill inside the "skills" documents (None: equal)
    skill_weights: tuple[float, ...] | None = (3.0, 1.0)
    # generic instruction tuning (0 steps: the pre-trained model is the base)
    instruct_steps: int = 150
    instruct_lr: float = 3e-4
    # share of the instruction-tuning examples that are skill questions (split evenly over the skills); 0 (the
    # default) = generic tasks only: with 4% the base already solved 36% / 84% of the skill questions
    instruct_skill_fraction: float = 0.0
    # specialists: same learning rate and steps for every skill
    sft_steps: int = 250
    sft_batch_size: int = 32
    sft_lr: float = 1e-4
    sft_warmup_steps: int = 10
    # share of generic instruction examples mixed into each specialist's SFT data (replay), so that a specialist's
    # delta teaches its skill rather than "answer every question with this skill"
    sft_replay_fraction: float = 0.25
    # evaluation: the first ``num_eval_items`` of a held-out pool of ``eval_pool_size`` problems per skill; the whole
    # pool is excluded from every training set, so changing num_eval_items retrains nothing
    eval_pool_size: int = 300
    num_eval_items: int = 200
    max_new_tokens: int = 64

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skills"] = list(self.skills)
        d["corpus_mix"] = [list(x) for x in self.corpus_mix]
        d["skill_weights"] = list(self.skill_weights) if self.skill_weights else None
        return d


PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    # CI size: small enough for a test (about a minute on 2 idle cores), still the real pipeline with real
    # evaluation; at this size the specialists beat the base on their own skill by tens of points on 40 questions
    # (seed 1: 87.5% / 72.5%, base 0% / 0%); the tests check it on seeds 0 and 1, and that 1 and 2 threads give the
    # same tables. With difficulty=2 this small model does not learn to copy digits at all
    "ci": dict(
        difficulty=1,
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=192,
        pretrain_steps=900,
        pretrain_batch_size=32,
        pretrain_lr=5e-3,
        instruct_steps=60,
        sft_steps=120,
        sft_batch_size=16,
        sft_lr=1e-3,
        eval_pool_size=40,
        num_eval_items=40,
    ),
}


def family_config(preset: str = "full", **overrides: Any) -> FamilyConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (expected one of {sorted(PRESETS)})")
    cfg = FamilyConfig(**{**PRESETS[preset], **overrides})
    unknown = [s for s in cfg.skills if s not in SKILLS]
    if unknown:
        raise ValueError(f"unknown skill(s) {unknown} (expected some of {sorted(SKILLS)})")
    if len(cfg.skills) < 2:
        raise ValueError("the family needs at least two skills")
    if cfg.pack_documents not in ("aligned", "stream"):
        raise ValueError(f"pack_documents must be 'aligned' or 'stream', got {cfg.pack_documents!r}")
    if cfg.skill_weights is not None and len(cfg.skill_weights) != len(cfg.skills):
        raise ValueError(f"skill_weights has {len(cfg.skill_weights)} values for {len(cfg.skills)} skills")
    if not 1 <= cfg.num_eval_items <= cfg.eval_pool_size:
        raise ValueError(f"num_eval_items must be between 1 and eval_pool_size={cfg.eval_pool_size}")
    for skill in cfg.skills:
        n = len(held_out_pool(cfg, skill))
        if n < cfg.eval_pool_size:
            raise ValueError(f"skill {skill} has only {n} distinct problems at difficulty {cfg.difficulty}")
    return cfg


_STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "pretrained": (
        "seed",
        "skills",
        "difficulty",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "initializer_range",
        "pretrain_steps",
        "pretrain_batch_size",
        "block_size",
        "pack_documents",
        "pretrain_lr",
        "pretrain_warmup_steps",
        "corpus_mix",
        "skill_answer_fraction",
        "skill_weights",
        "eval_pool_size",
    ),
    "base": ("instruct_steps", "instruct_lr", "instruct_skill_fraction", "sft_batch_size"),
    "specialist": ("sft_steps", "sft_batch_size", "sft_lr", "sft_warmup_steps", "sft_replay_fraction"),
}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def stage_key(cfg: FamilyConfig, stage: str) -> str:
    """Hash of the settings of ``stage`` and of every stage upstream of it (pretrained → base → specialist)."""
    d = cfg.to_dict()
    order = ["pretrained", "base", "specialist"]
    fields: list[str] = []
    for s in order[: order.index(stage) + 1]:
        fields += _STAGE_FIELDS[s]
    return _digest({"version": FAMILY_VERSION, "stage": stage, **{f: d[f] for f in fields}})


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------


def held_out_pool(cfg: FamilyConfig, skill: str) -> list[ToyItem]:
    """``eval_pool_size`` distinct problems of ``skill`` fixed by the seed, excluded from all training data."""
    rng = random.Random(f"eval/{cfg.seed}/{skill}")
    items: dict[str, ToyItem] = {}
    for _ in range(100 * cfg.eval_pool_size):
        it = SKILLS[skill].sample(rng, cfg.difficulty)
        items.setdefault(it.key, it)
        if len(items) == cfg.eval_pool_size:
            break
    return list(items.values())


def eval_items(cfg: FamilyConfig, skill: str) -> list[ToyItem]:
    """The evaluation items of ``skill``: the first ``num_eval_items`` problems of its held-out pool."""
    return held_out_pool(cfg, skill)[: cfg.num_eval_items]


def held_out_keys(cfg: FamilyConfig) -> dict[str, set[str]]:
    return {s: {it.key for it in held_out_pool(cfg, s)} for s in cfg.skills}


def _train_item(rng: random.Random, cfg: FamilyConfig, skill: str, excluded: set[str]) -> ToyItem:
    while True:
        it = SKILLS[skill].sample(rng, cfg.difficulty)
        if it.key not in excluded:
            return it


def pretraining_documents(cfg: FamilyConfig, num_chars: int) -> list[str]:
    """Generated pre-training documents (about ``num_chars`` characters in all), without any evaluation item.

    Kinds: ``skills`` (several raw lines of one skill, e.g. ``2+5=7, so 92+5=97. 7+6=13, 4+1=5, so 47+6=53. The
    answer is: 53.`` or ``206 reversed is 602. The answer is: 602.``; a share ``skill_answer_fraction`` of the lines
    end with the answer sentence), ``copy`` (copy drills), ``generic_statements``
    (``The word bafo has 4 letters.``) and ``generic_qa`` (generic questions in the instruction template,
    answered with GSM8K's answer sentence). The skills' instruction phrasing never occurs here.
    """
    rng = random.Random(f"pretrain/{cfg.seed}")
    excluded = held_out_keys(cfg)
    kinds = [k for k, _ in cfg.corpus_mix]
    weights = [w for _, w in cfg.corpus_mix]
    docs: list[str] = []
    total = 0
    while total < num_chars:
        kind = rng.choices(kinds, weights)[0]
        if kind == "skills":
            skill = (
                rng.choices(cfg.skills, cfg.skill_weights)[0] if cfg.skill_weights else rng.choice(cfg.skills)
            )
            lines = []
            for _ in range(rng.randint(3, 6)):
                it = _train_item(rng, cfg, skill, excluded[skill])
                line = SKILLS[skill].raw(it)
                if rng.random() < cfg.skill_answer_fraction:
                    line += f" {ANSWER_SENTENCE}{it.answer}."
                lines.append(line)
            doc = " ".join(lines)
        elif kind == "generic_statements":
            doc = " ".join(_generic_item(rng).work for _ in range(rng.randint(2, 4)))
        elif kind == "generic_qa":
            it = _generic_item(rng)
            doc = it.prompt + it.target
        elif kind == "copy":
            doc = _copy_drill(rng)
        else:
            raise ValueError(f"unknown corpus kind {kind!r}")
        docs.append(doc)
        total += len(doc) + 1
    return docs


def sft_items(cfg: FamilyConfig, task: str, n: int, replay_fraction: float = 0.0) -> list[ToyItem]:
    """``n`` training items of a skill (never an evaluation item), or of the generic tasks (``task="generic"``);
    with ``replay_fraction`` that share of the skill's items are generic ones instead (shuffled in)."""
    rng = random.Random(f"sft/{cfg.seed}/{task}")
    if task == "generic":
        return [_generic_item(rng) for _ in range(n)]
    excluded = held_out_keys(cfg)[task]
    n_replay = int(round(n * replay_fraction))
    items = [_train_item(rng, cfg, task, excluded) for _ in range(n - n_replay)]
    replay_rng = random.Random(f"sft/{cfg.seed}/{task}/replay")
    items += [_generic_item(replay_rng) for _ in range(n_replay)]
    rng.shuffle(items)
    return items


def instruct_items(cfg: FamilyConfig) -> list[ToyItem]:
    """The generic instruction-tuning set of the base: generic tasks, plus ``instruct_skill_fraction`` of skill
    questions split evenly over the skills (never evaluation items), shuffled."""
    n = cfg.instruct_steps * cfg.sft_batch_size
    per_skill = int(round(n * cfg.instruct_skill_fraction / len(cfg.skills)))
    items = sft_items(cfg, "generic", n - per_skill * len(cfg.skills))
    excluded = held_out_keys(cfg)
    rng = random.Random(f"instruct/{cfg.seed}")
    for skill in cfg.skills:
        items += [_train_item(rng, cfg, skill, excluded[skill]) for _ in range(per_skill)]
    rng.shuffle(items)
    return items


# ---------------------------------------------------------------------------------------------------------------
# tokenisation and datasets
# ---------------------------------------------------------------------------------------------------------------


def build_tokenizer(save_dir: str | Path | None = None):
    """The family's character tokenizer (LLaMA-style ids 0/1/2 = <unk>/<s>/</s>, plus a [PAD] token)."""
    return build_char_tokenizer(ALPHABET, add_pad_token=True, save_dir=save_dir)


def _encode(tokenizer, text: str) -> list[int]:
    """Character ids, the same as ``tokenizer(text)`` without the leading ``<s>`` (but much faster for a corpus)."""
    vocab = getattr(tokenizer, "_toy_char_vocab", None)
    if vocab is None:
        vocab = tokenizer.get_vocab()
        tokenizer._toy_char_vocab = vocab
    unk = vocab["<unk>"]
    return [vocab.get(c, unk) for c in text]


class _PackedBlocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class _SFTExamples(torch.utils.data.Dataset):
    def __init__(self, examples: list[tuple[list[int], list[int]]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids, labels = self.examples[i]
        return {"input_ids": ids, "labels": labels}


def sft_example(tokenizer, item: ToyItem) -> tuple[list[int], list[int]]:
    """Token ids of ``<s> prompt target </s>`` and labels that score only the target and ``</s>``."""
    prompt = [tokenizer.bos_token_id] + _encode(tokenizer, item.prompt)
    target = _encode(tokenizer, item.target) + [tokenizer.eos_token_id]
    return prompt + target, [-100] * len(prompt) + target


@dataclass
class SFTCollator:
    """Right-pads a batch of SFT examples (labels -100 on padding)."""

    pad_token_id: int

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _packed_blocks(
    tokenizer, docs: Sequence[str], block_size: int, num_blocks: int, aligned: bool = False
) -> torch.Tensor:
    """``num_blocks`` blocks of ``block_size`` ids from ``<s> doc </s>`` sequences. Streamed (``aligned=False``): the
    documents are concatenated and cut every ``block_size`` ids, so a document may start in one block and end in
    the next. Aligned: every block starts at the start of a document and holds as many whole documents as fit;
    the one that does not fit is cut at the end of the block and its rest dropped (no padding)."""
    need = num_blocks * block_size
    if not aligned:
        ids: list[int] = []
        for d in docs:
            ids += [tokenizer.bos_token_id] + _encode(tokenizer, d) + [tokenizer.eos_token_id]
            if len(ids) >= need:
                break
        if len(ids) < need:
            raise ValueError(f"corpus too small: {len(ids)} tokens for {need}")
        return torch.tensor(ids[:need], dtype=torch.long).view(num_blocks, block_size)
    blocks: list[list[int]] = []
    block: list[int] = []
    for d in docs:
        block += [tokenizer.bos_token_id] + _encode(tokenizer, d) + [tokenizer.eos_token_id]
        if len(block) >= block_size:
            blocks.append(block[:block_size])
            block = []
            if len(blocks) == num_blocks:
                return torch.tensor(blocks, dtype=torch.long)
    raise ValueError(f"corpus too small: {len(blocks)} aligned blocks for {num_blocks}")


def pretraining_blocks(cfg: FamilyConfig, tokenizer) -> torch.Tensor:
    """The pre-training data: ``pretrain_steps * pretrain_batch_size`` packed blocks of ``block_size`` ids."""
    n_blocks = cfg.pretrain_steps * cfg.pretrain_batch_size
    aligned = cfg.pack_documents == "aligned"
    # aligned blocks drop the rest of the last document of each block: generate enough text for that
    slack = 1.6 if aligned else 1.02
    docs = pretraining_documents(cfg, int(n_blocks * cfg.block_size * slack) + 1000)
    return _packed_blocks(tokenizer, docs, cfg.block_size, n_blocks, aligned)


# ---------------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------------


def _train(
    model,
    dataset,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    seed: int,
    collator=None,
    weight_decay: float = 0.0,
    desc: str = "",
) -> dict[str, float]:
    """Train ``model`` in place with the HF ``Trainer`` (AdamW, cosine schedule, one pass over ``dataset``)."""
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory(prefix="toy_trainer_") as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=lr,
            lr_scheduler_type="cosine",
            warmup_steps=warmup_steps,
            weight_decay=weight_decay,
            max_grad_norm=1.0,
            logging_strategy="steps",
            logging_steps=max(1, steps // 5),
            save_strategy="no",
            report_to="none",
            seed=seed,
            data_seed=seed,
            use_cpu=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            disable_tqdm=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
        logger.info("training %s: %d steps, batch %d, lr %g", desc, steps, batch_size, lr)
        out = trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    model.eval()
    return {
        "train_loss": float(out.training_loss),
        "final_logged_loss": float(losses[-1]) if losses else math.nan,
    }


def _save(model, tokenizer, folder: Path, info: dict[str, Any]) -> None:
    """Write the model folder atomically (temporary sibling, then rename)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "toy_family_stage.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


@dataclass
class Family:
    """Paths of the built family (all complete HF model folders with the tokenizer)."""

    pretrained: Path
    base: Path
    specialists: dict[str, Path]
    info: dict[str, Any] = field(default_factory=dict)


def _stage_done(folder: Path) -> bool:
    return (folder / "toy_family_stage.json").is_file()


def _sft_stage(
    cfg: FamilyConfig,
    tokenizer,
    src: Path,
    dst: Path,
    items: Sequence[ToyItem],
    *,
    steps: int,
    lr: float,
    warmup_steps: int,
    desc: str,
    stage_info: dict[str, Any],
) -> None:
    """Fine-tune the model in ``src`` on ``items`` (prompt masked out of the loss, batch ``cfg.sft_batch_size``)
    and save it with its training statistics to ``dst``."""
    import time

    t0 = time.time()
    model = _load(src)
    data = _SFTExamples([sft_example(tokenizer, it) for it in items])
    stats = _train(
        model,
        data,
        steps=steps,
        batch_size=cfg.sft_batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
        seed=cfg.seed,
        collator=SFTCollator(tokenizer.pad_token_id),
        desc=desc,
    )
    stats["seconds"] = time.time() - t0
    _save(model, tokenizer, dst, {**stage_info, "config": cfg.to_dict(), **stats})


def _specialist_job(cfg: FamilyConfig, base_dir: str, dst: str, skill: str) -> None:
    """Fine-tune and save the ``skill`` specialist (a top-level function: worker processes run it too)."""
    _sft_stage(
        cfg,
        build_tokenizer(),
        Path(base_dir),
        Path(dst),
        sft_items(cfg, skill, cfg.sft_steps * cfg.sft_batch_size, cfg.sft_replay_fraction),
        steps=cfg.sft_steps,
        lr=cfg.sft_lr,
        warmup_steps=cfg.sft_warmup_steps,
        desc=f"{skill} SFT",
        stage_info={"stage": "specialist", "skill": skill},
    )


def build_family(
    cfg: FamilyConfig,
    models_dir: str | Path,
    log: Callable[[str], None] = print,
    workers: int = 1,
) -> Family:
    """Build (or reuse from ``models_dir``) the pre-trained model, the base and one specialist per skill.

    With ``workers`` > 1 the specialists still to train are fine-tuned side by side, one process each on
    ``torch.get_num_threads() // workers`` threads (at least one), so each keeps a core busy through the whole stage
    (measured: both specialists in 90 s on 2 cores). Each specialist's training is the same code on the same data
    and seed as in sequence, so the models are the same, bit for bit (tested)."""
    import time

    from transformers import LlamaForCausalLM

    models_dir = Path(models_dir)
    tokenizer = build_tokenizer()
    info: dict[str, Any] = {}
    torch.manual_seed(cfg.seed)

    # 1. pre-training
    pre_dir = models_dir / f"pretrained-{stage_key(cfg, 'pretrained')}"
    if _stage_done(pre_dir):
        log(f"[cache] pre-trained model: {pre_dir}")
    else:
        t0 = time.time()
        blocks = pretraining_blocks(cfg, tokenizer)
        config = tiny_llama_config(
            len(tokenizer),
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.max_position_embeddings,
        )
        config.pad_token_id = tokenizer.pad_token_id
        config.initializer_range = cfg.initializer_range
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
        log(
            f"pre-training a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter LLaMA on "
            f"{blocks.numel() / 1e6:.1f}M generated characters"
        )
        stats = _train(
            model,
            _PackedBlocks(blocks),
            steps=cfg.pretrain_steps,
            batch_size=cfg.pretrain_batch_size,
            lr=cfg.pretrain_lr,
            warmup_steps=cfg.pretrain_warmup_steps,
            seed=cfg.seed,
            weight_decay=0.1,
            desc="pre-training",
        )
        stats["seconds"] = time.time() - t0
        _save(model, tokenizer, pre_dir, {"stage": "pretrained", "config": cfg.to_dict(), **stats})
    info["pretrained"] = json.loads((pre_dir / "toy_family_stage.json").read_text())

    # 2. generic instruction tuning -> the base
    if cfg.instruct_steps > 0:
        base_dir = models_dir / f"base-{stage_key(cfg, 'base')}"
        if _stage_done(base_dir):
            log(f"[cache] base (instruction-tuned) model: {base_dir}")
        else:
            log(
                "generic instruction tuning (the base: follows the Question/Answer format; "
                f"{cfg.instruct_skill_fraction:.0%} of its examples are skill questions)"
            )
            _sft_stage(
                cfg,
                tokenizer,
                pre_dir,
                base_dir,
                instruct_items(cfg),
                steps=cfg.instruct_steps,
                lr=cfg.instruct_lr,
                warmup_steps=10,
                desc="instruction tuning",
                stage_info={"stage": "base"},
            )
    else:
        base_dir = pre_dir
    info["base"] = json.loads((base_dir / "toy_family_stage.json").read_text())

    # 3. specialists (matched learning rate and steps)
    spec_key = stage_key(cfg, "specialist")
    specialists = {skill: models_dir / f"specialist-{skill}-{spec_key}" for skill in cfg.skills}
    todo = [skill for skill in cfg.skills if not _stage_done(specialists[skill])]
    for skill in cfg.skills:
        if skill not in todo:
            log(f"[cache] {skill} specialist: {specialists[skill]}")
    workers = max(1, min(workers, len(todo)))
    jobs = [(cfg, str(base_dir), str(specialists[skill]), skill) for skill in todo]
    if workers == 1:
        for job in jobs:
            log(f"fine-tuning the {job[3]} specialist ({SKILLS[job[3]].description})")
            _specialist_job(*job)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, torch.get_num_threads() // workers)
        names = " and ".join(todo)
        log(
            f"fine-tuning the {names} specialists side by side ({workers} processes, {threads} thread(s) each)"
        )
        # spawn: a fresh interpreter per worker, no state inherited from this process
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=torch.set_num_threads, initargs=(threads,)
        ) as pool:
            for future in [pool.submit(_specialist_job, *job) for job in jobs]:
                future.result()
    for skill in cfg.skills:
        info[f"specialist/{skill}"] = json.loads((specialists[skill] / "toy_family_stage.json").read_text())
    return Family(pretrained=pre_dir, base=base_dir, specialists=specialists, info=info)


# ---------------------------------------------------------------------------------------------------------------
# evaluation (the project's generation backend and GSM8K answer extraction)
# ---------------------------------------------------------------------------------------------------------------

EVAL_VERSION = "1"
STOP_STRINGS: tuple[str, ...] = ("\n",)  # answers are one line; a new line would start another question


def score_completion(completion: str, answer: int) -> dict[str, Any]:
    """Score one completion with the project's GSM8K parsers (``utils.evaluate_llms_utils``): the corrected one
    (``correct``, the headline) and the original's (``correct_original``)."""
    from utils.evaluate_llms_utils import (
        extract_gsm8k_answer,
        extract_gsm8k_answer_original,
        gsm8k_is_correct,
    )

    pred = extract_gsm8k_answer(completion)
    pred_orig = extract_gsm8k_answer_original(completion)
    return {
        "prediction": pred,
        "correct": gsm8k_is_correct(pred, answer),
        "correct_original": gsm8k_is_correct(pred_orig, answer),
    }


def evaluate_on_skills(
    model_path: str | Path,
    items_by_skill: dict[str, list[ToyItem]],
    max_new_tokens: int,
    batch_size: int = 128,
    keep_examples: int = 3,
) -> dict[str, dict[str, Any]]:
    """Greedy generation with ``utils.generation_backends.HFBackend`` (stop at the end of the line) for every
    skill's items in one pass, scored with the GSM8K answer extraction. Returns ``{skill: {accuracy,
    accuracy_original, n, invalid, per_item (correct or not, in item order), examples (the first few
    completions)}}``."""
    from utils.generation_backends import HFBackend

    prompts, owners = [], []
    for skill, items in items_by_skill.items():
        for it in items:
            prompts.append(it.prompt)
            owners.append((skill, it))
    with HFBackend(str(model_path), batch_size=batch_size) as backend:
        outputs = backend.generate(prompts, max_tokens=max_new_tokens, stop=STOP_STRINGS)
    results: dict[str, dict[str, Any]] = {}
    for skill in items_by_skill:
        rows = [(it, out) for (s, it), out in zip(owners, outputs) if s == skill]
        scores = [score_completion(out, it.answer) for it, out in rows]
        n = len(rows)
        results[skill] = {
            "accuracy": sum(s["correct"] for s in scores) / n,
            "accuracy_original": sum(s["correct_original"] for s in scores) / n,
            "n": n,
            "invalid": sum(s["prediction"] is None for s in scores),
            "per_item": [s["correct"] for s in scores],
            "examples": [
                {"question": it.question, "completion": out, "answer": it.answer, "correct": s["correct"]}
                for (it, out), s in list(zip(rows, scores))[:keep_examples]
            ],
        }
    return results
