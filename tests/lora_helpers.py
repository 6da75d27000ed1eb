"""Tiny LLaMA bases and random PEFT LoRA adapters, built offline, for the adapter and vocabulary tests."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from utils.tiny_models import build_char_tokenizer, build_tiny_llama, tiny_llama_config


def build_base(
    folder: Path, seed: int = 0, attention_bias: bool = True, tie: bool = False, dtype=None
) -> Path:
    """A 2-layer LLaMA (hidden 32, vocabulary 100, biases on the attention projections) with its tokenizer."""
    tok = build_char_tokenizer()
    config = tiny_llama_config(len(tok), tie_word_embeddings=tie)
    config.attention_bias = attention_bias
    model = build_tiny_llama(config, seed=seed)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def load_model(folder: Path, dtype=None):
    from transformers import LlamaForCausalLM

    kwargs = {"dtype": dtype} if dtype is not None else {}
    return LlamaForCausalLM.from_pretrained(str(folder), **kwargs).eval()


def make_adapter(
    base: Path, folder: Path, seed: int = 0, scale: float = 0.1, resize_to: int | None = None, **lora
):
    """A LoRA adapter of ``base`` with every trainable tensor randomised (``init_lora_weights=False`` plus
    N(0, scale²) on each trainable parameter, so B is non-zero and modules_to_save copies differ from the base)."""
    from peft import LoraConfig, get_peft_model

    model = load_model(base)
    if resize_to is not None:
        model.resize_token_embeddings(resize_to)
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in peft_model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * scale)
        peft_model.save_pretrained(str(folder))
    return folder


def merged_reference(
    base: Path, adapter: Path, dtype=None, resize_to: int | None = None
) -> dict[str, torch.Tensor]:
    """PEFT's own answer: ``PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()``."""
    from peft import PeftModel

    model = load_model(base, dtype)
    if resize_to is not None:
        model.resize_token_embeddings(resize_to)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
