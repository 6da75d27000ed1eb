"""Tiny models and tokenizers built locally (no hub): for tests, the offline quickstart and benchmarks.

Everything here is deterministic given its arguments (explicit seeds) and needs no network.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForSequenceClassification,
)

# Printable ASCII without the rarely useful vertical tab / form feed; enough for GSM8K-style prompts and code.
DEFAULT_ALPHABET: str = string.ascii_letters + string.digits + string.punctuation + " \n\t"

LLAMA_SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def build_char_tokenizer(
    alphabet: str = DEFAULT_ALPHABET, add_pad_token: bool = False, save_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """A LLaMA-style character-level tokenizer: ids 0,1,2 = <unk>, <s>, </s>, then one id per character.

    Encoding prepends <s> (like LLaMA); decoding joins characters without separators. With
    ``add_pad_token`` a ``[PAD]`` token is appended at the end of the vocabulary (as the Wizard models do).
    """
    chars = list(dict.fromkeys(alphabet))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **LLAMA_SPECIALS)
    if add_pad_token:
        fast.add_special_tokens({"pad_token": "[PAD]"})
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast


def build_word_tokenizer(
    texts: Iterable[str], style: str = "bert", vocab_size: int = 2000, save_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer trained on ``texts`` with BERT (``[CLS] a [SEP] b [SEP]``),
    RoBERTa (``<s> a </s></s> b </s>``) or GPT-2 (``gpt2``: no special tokens around the text, a pair is the two
    texts one after the other, ``<|endoftext|>`` as bos/eos and **no pad token**, as GPT-2 ships) tokens."""
    if style == "gpt2":
        return _gpt2_word_tokenizer(texts, vocab_size, save_dir)
    if style == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        names = dict(
            pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
        )
    elif style == "roberta":
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        names = dict(
            bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", cls_token="<s>",
            sep_token="</s>", mask_token="<mask>",
        )  # fmt: skip
    else:
        raise ValueError(f"unknown tokenizer style {style!r} (expected 'bert', 'roberta' or 'gpt2')")
    tok = Tokenizer(models.WordLevel(unk_token=names["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        list(texts), trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials)
    )
    cls, sep = names["cls_token"], names["sep_token"]
    cls_id, sep_id = tok.token_to_id(cls), tok.token_to_id(sep)
    if style == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, cls_id), (sep, sep_id)],
        )
    else:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=f"{cls} $A {sep} {sep} $B {sep}",
            special_tokens=[(cls, cls_id), (sep, sep_id)],
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast


def _gpt2_word_tokenizer(
    texts: Iterable[str], vocab_size: int, save_dir: str | Path | None
) -> PreTrainedTokenizerFast:
    """GPT-2's special tokens (``<|endoftext|>`` as bos/eos, no pad token) over a word vocabulary. Unknown words
    map to a separate ``<unk>`` (GPT-2's byte-level BPE has no unknown words; a word vocabulary needs one, and it
    must not be the token that will pad the batches)."""
    eot, unk = "<|endoftext|>", "<unk>"
    tok = Tokenizer(models.WordLevel(unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        list(texts), trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=[eot, unk])
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=unk, bos_token=eot, eos_token=eot,
        model_input_names=["input_ids", "attention_mask"],
    )  # fmt: skip
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast


def tiny_llama_config(
    vocab_size: int,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 64,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
) -> LlamaConfig:
    """A LLaMA config small enough for CPU tests (ids 0/1/2 = unk/bos/eos, as in LLaMA)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=tie_word_embeddings,
    )


def build_tiny_llama(
    config: LlamaConfig, seed: int = 0, save_dir: str | Path | None = None, tokenizer=None, **save_kwargs
) -> LlamaForCausalLM:
    """A randomly initialised LLaMA (``torch.manual_seed(seed)`` before init), optionally saved with a tokenizer."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    if save_dir is not None:
        model.save_pretrained(str(save_dir), **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(save_dir))
    return model


def build_tiny_encoder(
    style: str,
    vocab_size: int,
    num_labels: int = 2,
    seed: int = 0,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 64,
    pad_token_id: int = 0,
    save_dir: str | Path | None = None,
    tokenizer=None,
):
    """A randomly initialised tiny BERT or RoBERTa sequence classifier."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=160,
        num_labels=num_labels,
        pad_token_id=pad_token_id,
    )
    torch.manual_seed(seed)
    if style == "bert":
        model = BertForSequenceClassification(BertConfig(**common))
    elif style == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(**common, bos_token_id=0, eos_token_id=2))
    else:
        raise ValueError(f"unknown encoder style {style!r} (expected 'bert' or 'roberta')")
    model.eval()
    if save_dir is not None:
        model.save_pretrained(str(save_dir))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(save_dir))
    return model


CLASSIFIER_BACKBONES = ("bert", "roberta", "deberta-v2", "electra", "gpt2")


def build_tiny_classifier(
    backbone: str,
    vocab_size: int,
    num_labels: int = 2,
    seed: int = 0,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 64,
    pad_token_id: int | None = 0,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    max_position_embeddings: int = 160,
    save_dir: str | Path | None = None,
    tokenizer=None,
):
    """A randomly initialised tiny sequence classifier of one of :data:`CLASSIFIER_BACKBONES`
    (``torch.manual_seed(seed)`` before init), optionally saved with a tokenizer.

    ``gpt2`` takes ``pad_token_id=None`` (GPT-2 ships without a pad token) and its bos/eos ids."""
    from transformers import (
        DebertaV2Config,
        DebertaV2ForSequenceClassification,
        ElectraConfig,
        ElectraForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
    )

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings, num_labels=num_labels, pad_token_id=pad_token_id,
    )  # fmt: skip
    if backbone == "bert":
        config = BertConfig(**common)
        cls = BertForSequenceClassification
    elif backbone == "roberta":
        config = RobertaConfig(**common, bos_token_id=bos_token_id or 0, eos_token_id=eos_token_id or 2)
        cls = RobertaForSequenceClassification
    elif backbone == "deberta-v2":
        config = DebertaV2Config(
            **common, relative_attention=True, position_buckets=16, max_relative_positions=-1,
            pos_att_type=["p2c", "c2p"], position_biased_input=False, type_vocab_size=0,
        )  # fmt: skip
        cls = DebertaV2ForSequenceClassification
    elif backbone == "electra":
        config = ElectraConfig(**common, embedding_size=hidden_size)
        cls = ElectraForSequenceClassification
    elif backbone == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_hidden_layers, n_head=num_attention_heads,
            n_inner=intermediate_size, n_positions=max_position_embeddings, num_labels=num_labels,
            pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        )  # fmt: skip
        cls = GPT2ForSequenceClassification
    else:
        raise ValueError(f"unknown backbone {backbone!r} (expected one of {', '.join(CLASSIFIER_BACKBONES)})")
    torch.manual_seed(seed)
    model = cls(config).eval()
    if save_dir is not None:
        model.save_pretrained(str(save_dir))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(save_dir))
    return model


def build_wordpiece_tokenizer(
    texts: Iterable[str], vocab_size: int = 8000, save_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer (lower-cased, accents stripped, ``[CLS] a [SEP] b [SEP]``) whose vocabulary
    is built deterministically from ``texts``: the five special tokens, every character (as a word start and as a
    ``##`` continuation, so no word is unknown), then the most frequent words (ties by spelling) up to
    ``vocab_size``. (The ``tokenizers`` WordPiece trainer breaks ties differently from run to run, so the same
    texts gave a different vocabulary each time.)"""
    from collections import Counter

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter = Counter()
    for text in texts:
        counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    vocab: dict[str, int] = {}
    for token in [*specials, *chars, *(f"##{c}" for c in chars)]:
        vocab.setdefault(token, len(vocab))
    for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )  # fmt: skip
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast
