"""Text generation behind one small interface: vLLM on GPUs, Hugging Face ``generate`` anywhere (CPU included).

Both decode greedily (temperature 0, top_p 1), stop at EOS, at ``max_tokens`` new tokens or just before the
first stop string (the returned text never contains it, as in vLLM), and return one string per prompt in input
order. An engine is created once and must be torn down with :meth:`GenerationBackend.close` (or a ``with``
block): evaluating several datasets in one run therefore needs the GPUs of one engine only.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence

from utils.cli import UserError

logger = logging.getLogger(__name__)

BACKEND_CHOICES: tuple[str, ...] = ("auto", "vllm", "hf")


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend_name(name: str) -> str:
    """``auto`` -> ``vllm`` when vLLM is importable and a CUDA GPU is present, else ``hf``."""
    if name not in BACKEND_CHOICES:
        raise UserError(f"unknown inference backend {name!r} (expected one of {', '.join(BACKEND_CHOICES)})")
    if name == "auto":
        return "vllm" if vllm_importable() and _cuda_available() else "hf"
    return name


def _release_torch_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


class GenerationBackend(ABC):
    """``generate(prompts, max_tokens, stop) -> list[str]`` (greedy) and ``close()``."""

    name: str = "abstract"

    @abstractmethod
    def generate(self, prompts: Sequence[str], max_tokens: int, stop: Sequence[str] = ()) -> list[str]: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> GenerationBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HFBackend(GenerationBackend):
    """Hugging Face ``generate``: batches of ``batch_size`` prompts (sorted by length), left padding, greedy.

    A tokenizer without a pad token gets ``pad_token = eos_token``. ``dtype="auto"`` means float32 on CPU and the
    checkpoint's dtype on GPU. Stop strings end a sequence as soon as they appear in its generated text.
    """

    name = "hf"

    def __init__(self, model_path: str, batch_size: int = 8, dtype: str = "auto", device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise UserError(f"generation batch size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            torch_dtype = "auto" if self.device.type == "cuda" else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
            self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
        except OSError as exc:
            raise UserError(f"cannot load model {model_path}: {str(exc).splitlines()[0]}") from exc
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = self.model.generation_config.eos_token_id
        self.eos_token_id = eos if eos is not None else self.tokenizer.eos_token_id

    def _generate_batch(self, prompts: list[str], max_tokens: int, stop: Sequence[str]) -> list[str]:
        import torch
        from transformers import GenerationConfig, StoppingCriteriaList

        enc = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        prompt_len = enc["input_ids"].shape[1]
        config = GenerationConfig(
            max_new_tokens=int(max_tokens),
            do_sample=False,
            num_beams=1,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eos_token_id,
        )
        criteria = (
            StoppingCriteriaList([_stop_on_strings(self.tokenizer, stop, prompt_len)]) if stop else None
        )
        with torch.inference_mode():
            out = self.model.generate(**enc, generation_config=config, stopping_criteria=criteria)
        texts = self.tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
        return [truncate_at_stop(t, stop) for t in texts]

    def generate(self, prompts: Sequence[str], max_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        if self.model is None:
            raise RuntimeError("HFBackend.generate called after close()")
        prompts = list(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        results: list[str] = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            for i, text in zip(idx, self._generate_batch([prompts[i] for i in idx], max_tokens, tuple(stop))):
                results[i] = text
        return results

    def close(self) -> None:
        self.model = None
        _release_torch_memory()


def _stop_on_strings(tokenizer, stop: Sequence[str], prompt_len: int):
    """A ``StoppingCriteria``: per row, True once a stop string appears in the generated text (decoded tail)."""
    import torch
    from transformers import StoppingCriteria

    stops = [s for s in stop if s]
    tail = max(len(s) for s in stops) + 2  # every token decodes to >= 1 character

    class StopOnStrings(StoppingCriteria):
        def __call__(self, input_ids, scores=None, **kwargs):
            generated = input_ids[:, prompt_len:]
            texts = tokenizer.batch_decode(generated[:, -tail:], skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stops) for t in texts], device=input_ids.device)

    return StopOnStrings()


class VLLMBackend(GenerationBackend):
    """vLLM: ``LLM(model=..., tensor_parallel_size=...)``; every ``generate`` call submits all its prompts at once
    with ``SamplingParams(temperature=0, top_p=1, max_tokens=..., stop=...)``. :meth:`close` deletes the engine,
    runs vLLM's distributed clean-up and frees the CUDA cache."""

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        seed: int = 0,
        max_model_len: int | None = None,
    ):
        try:
            import vllm
        except ImportError as exc:
            raise UserError(
                "--inference_backend vllm needs vLLM: pip install -r requirements-vllm.txt"
            ) from exc
        self._vllm = vllm
        kwargs = dict(
            model=str(model_path),
            tensor_parallel_size=int(tensor_parallel_size),
            dtype=dtype,
            gpu_memory_utilization=float(gpu_memory_utilization),
            seed=int(seed),
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        self.llm = vllm.LLM(**kwargs)

    def generate(self, prompts: Sequence[str], max_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        if self.llm is None:
            raise RuntimeError("VLLMBackend.generate called after close()")
        params = self._vllm.SamplingParams(
            temperature=0.0, top_p=1.0, max_tokens=int(max_tokens), stop=list(stop)
        )
        outputs = self.llm.generate(list(prompts), params)
        return [o.outputs[0].text for o in outputs]

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        shutdown = getattr(core, "shutdown", None)
        if callable(shutdown):  # vLLM V1: stop the engine-core process now rather than at garbage collection
            try:
                shutdown()
            except Exception as exc:  # noqa: BLE001 - teardown must go on
                logger.warning("vLLM engine shutdown raised %s", exc)
        del llm, engine, core, shutdown
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        except ImportError:
            cleanup_dist_env_and_memory = None
        if cleanup_dist_env_and_memory is not None:
            cleanup_dist_env_and_memory()
        else:
            try:
                from vllm.distributed.parallel_state import (
                    destroy_distributed_environment,
                    destroy_model_parallel,
                )

                destroy_model_parallel()
                destroy_distributed_environment()
            except ImportError:
                pass
        _release_torch_memory()


def create_backend(
    name: str,
    model_path: str,
    *,
    tensor_parallel_size: int = 1,
    batch_size: int | None = None,
    dtype: str = "auto",
    gpu_memory_utilization: float = 0.9,
    max_model_len: int | None = None,
    seed: int = 0,
) -> GenerationBackend:
    """Build the backend ``name`` (``auto`` resolved by :func:`resolve_backend_name`)."""
    resolved = resolve_backend_name(name)
    logger.info("generation backend: %s (model %s)", resolved, model_path)
    if resolved == "vllm":
        return VLLMBackend(
            model_path,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            max_model_len=max_model_len,
        )
    return HFBackend(model_path, batch_size=batch_size or 8, dtype=dtype)
