"""Statistics that Fisher merging and RegMean need, collected from a model and batches of its training data.

Both collectors return plain ``dict[name, Tensor]`` (float32, on the model's device) that the core's
``fisher_merging(models, fisher_weights, ...)`` and ``regmean_merging(models, gram_matrices, ...)`` consume.
The ``*_at`` variants make one pass over the data and return a snapshot for each of several example counts
(the data order is the same for every count, so the statistic for 256 examples is the prefix of the one for
2048, exactly as when the original recomputed it from a freshly reseeded loader for each count).

Fisher (spec §4.3), ``variant="faithful"`` (default), per batch ``b`` of the nominal size ``bs``:

* classification: ``S_b = Σ_{n∈b} Σ_c sqrt(p_nc) · log p_nc`` with ``p = softmax(logits)`` detached in the
  square root; record ``(∇_θ S_b)²``;
* regression (one logit): ``S_b`` = the batch-mean squared error ``mean_n (f_n − y_n)²``; record ``(∇_θ S_b)²``;
* batches are taken while ``counter < num_examples``, the counter growing by ``bs`` per batch, so
  ``⌈num_examples / bs⌉`` batches; ``F = Σ_b (∇S_b)² / (#batches · bs)``.

``variant="per_example"``: exactly ``num_examples`` examples, each on its own,

* classification: ``F = 1/N Σ_n Σ_c p_nc (∇_θ log p_nc)²`` (the Fisher of Matena & Raffel, expectation over the
  model's predicted distribution);
* regression: ``F = 1/N Σ_n (∇_θ (f_n − y_n)²)²`` (the per-example form of the original's estimate).

Both keep a running sum (never a list of per-batch copies), use ``torch.autograd.grad`` (no ``.grad`` is left on
the model) and keep the model in eval mode (no dropout), as the original did.

RegMean (spec §4.4): forward hooks on the ``nn.Linear`` modules (and GPT-2's ``Conv1D``, whose weight is stored
``in × out``: see :func:`transposed_weight_names`) whose weight is merged (not excluded heads);
for each, ``G = Σ XᵀX / (number of rows)`` over the rows ``X`` of the module input reshaped to
``(batch·seq_len, in_features)`` (or ``(batch, in)`` for 2-D inputs such as BERT's pooler). Faithful default:
padded positions are rows too; ``exclude_padding=True`` keeps only positions with ``attention_mask == 1``
(3-D inputs). Batches are taken while the number of examples seen is below ``num_examples``. Linear layers
fed the same input tensor (query/key/value) share one computation. ``gram_matrices[name]`` is keyed by the
Linear's weight name and is ``in_features × in_features``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

FISHER_VARIANTS = ("faithful", "per_example")
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def merged_param_names(model: nn.Module, exclude_param_names_regex: Sequence[str] = ()) -> list[str]:
    """Names from ``named_parameters()`` that no regex matches with ``re.match`` (spec §3.1)."""
    patterns = [re.compile(p) for p in exclude_param_names_regex]
    return [n for n, _ in model.named_parameters() if not any(p.match(n) for p in patterns)]


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``transformers.pytorch_utils.Conv1D``: a linear layer whose weight is stored ``in × out``."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def merged_linear_modules(model: nn.Module, param_names: Iterable[str]) -> dict[str, nn.Module]:
    """``weight name → module`` for the ``nn.Linear`` (and GPT-2 ``Conv1D``) modules whose weight is among
    ``param_names``."""
    wanted = set(param_names)
    return {
        f"{name}.weight": module
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) or _is_conv1d(module)) and f"{name}.weight" in wanted
    }


def transposed_weight_names(model: nn.Module, param_names: Iterable[str] | None = None) -> list[str]:
    """Weights stored ``in × out`` (GPT-2 ``Conv1D``) among ``param_names`` (default: all). The core's RegMean
    expects ``out × in``: transpose these before merging and back after."""
    wanted = None if param_names is None else set(param_names)
    return [
        f"{name}.weight"
        for name, module in model.named_modules()
        if _is_conv1d(module) and (wanted is None or f"{name}.weight" in wanted)
    ]


def _in_features(module: nn.Module) -> int:
    return int(module.weight.shape[0]) if _is_conv1d(module) else int(module.in_features)


def _model_inputs(batch: Mapping, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: batch[k].to(device) for k in MODEL_INPUT_KEYS if k in batch}


def _logits(model: nn.Module, batch: Mapping, device: torch.device) -> torch.Tensor:
    out = model(**_model_inputs(batch, device))
    return out["logits"] if isinstance(out, Mapping) else out.logits


def _batch_size(batch: Mapping) -> int:
    return int(batch["input_ids"].shape[0])


def _check_counts(nums_examples: Sequence[int]) -> list[int]:
    nums = sorted(set(int(n) for n in nums_examples))
    if not nums or nums[0] <= 0:
        raise ValueError(f"example counts must be positive, got {list(nums_examples)}")
    return nums


# ------------------------------------------------------------------------------------------------------ Fisher
def _faithful_scalar(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    if logits.shape[-1] == 1:
        if labels is None:
            raise ValueError("regression Fisher needs labels")
        return torch.nn.functional.mse_loss(logits.reshape(-1), labels.to(logits.device).float().reshape(-1))
    log_p = torch.log_softmax(logits, dim=-1)
    return (torch.sqrt(log_p.exp().detach()) * log_p).sum()


def collect_fisher_weights_at(
    model: nn.Module,
    batches: Iterable[Mapping],
    nums_examples: Sequence[int],
    param_names: Sequence[str] | None = None,
    exclude_param_names_regex: Sequence[str] = (),
    variant: str = "faithful",
    batch_size: int | None = None,
) -> dict[int, dict[str, torch.Tensor]]:
    """Diagonal Fisher weights for each count in ``nums_examples`` (one pass; see the module docstring).

    ``batch_size`` is the nominal batch size of the faithful counter (default: ``batches.batch_size`` when
    it is a DataLoader, else the first batch's size)."""
    if variant not in FISHER_VARIANTS:
        raise ValueError(f"unknown Fisher variant {variant!r} (choose from {', '.join(FISHER_VARIANTS)})")
    nums = _check_counts(nums_examples)
    names = (
        list(param_names) if param_names is not None else merged_param_names(model, exclude_param_names_regex)
    )
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"model has no parameter(s) {missing[:3]}")
    tensors = [params[n] for n in names]
    device = tensors[0].device
    sums = [torch.zeros_like(t, dtype=torch.float32) for t in tensors]
    was_training = model.training
    model.eval()
    results: dict[int, dict[str, torch.Tensor]] = {}

    def add_squared_grads(scalar: torch.Tensor, weight: torch.Tensor | float = 1.0, retain: bool = False):
        grads = torch.autograd.grad(scalar, tensors, retain_graph=retain, allow_unused=True)
        for acc, g in zip(sums, grads):
            if g is not None:
                acc.add_(g.detach().float().square(), alpha=float(weight))

    def snapshot(denominator: float) -> dict[str, torch.Tensor]:
        return {n: (acc / denominator) for n, acc in zip(names, sums)}

    pending = list(nums)
    seen = 0  # faithful: nominal count (#batches · bs); per_example: exact count
    nominal = batch_size if batch_size is not None else getattr(batches, "batch_size", None)
    try:
        with torch.enable_grad():
            for batch in batches:
                if variant == "faithful":
                    bs = nominal if nominal is not None else _batch_size(batch)
                    nominal = bs
                    while pending and seen >= pending[0]:
                        results[pending.pop(0)] = snapshot(seen)
                    if not pending:
                        break
                    add_squared_grads(_faithful_scalar(_logits(model, batch, device), batch.get("labels")))
                    seen += bs
                else:
                    for i in range(_batch_size(batch)):
                        if not pending:
                            break
                        one = {k: v[i : i + 1] for k, v in batch.items() if isinstance(v, torch.Tensor)}
                        logits = _logits(model, one, device)
                        if logits.shape[-1] == 1:
                            err = logits.reshape(()) - one["labels"].to(device).float().reshape(())
                            add_squared_grads(err.square())
                        else:
                            log_p = torch.log_softmax(logits, dim=-1).reshape(-1)
                            probs = log_p.exp().detach()
                            for c in range(log_p.numel()):
                                add_squared_grads(log_p[c], probs[c], retain=c < log_p.numel() - 1)
                        seen += 1
                        while pending and seen >= pending[0]:
                            results[pending.pop(0)] = snapshot(seen)
                    if not pending:
                        break
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("no batches to compute Fisher weights from")
    for n in pending:  # the data ran out before reaching n: use everything seen (as the original did)
        results[n] = snapshot(seen)
    return results


def collect_fisher_weights(
    model: nn.Module,
    batches: Iterable[Mapping],
    num_examples: int,
    param_names: Sequence[str] | None = None,
    exclude_param_names_regex: Sequence[str] = (),
    variant: str = "faithful",
    batch_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher weights ``name → F`` (same shape as the parameter) from ``num_examples`` examples."""
    return collect_fisher_weights_at(
        model, batches, [num_examples], param_names, exclude_param_names_regex, variant, batch_size
    )[int(num_examples)]


# ------------------------------------------------------------------------------------------------------ RegMean
def collect_regmean_grams_at(
    model: nn.Module,
    batches: Iterable[Mapping],
    nums_examples: Sequence[int],
    param_names: Sequence[str] | None = None,
    exclude_param_names_regex: Sequence[str] = (),
    exclude_padding: bool = False,
) -> dict[int, dict[str, torch.Tensor]]:
    """RegMean Gram matrices for each count in ``nums_examples`` (one pass; see the module docstring)."""
    nums = _check_counts(nums_examples)
    names = (
        list(param_names) if param_names is not None else merged_param_names(model, exclude_param_names_regex)
    )
    modules = merged_linear_modules(model, names)
    if not modules:
        return {n: {} for n in nums}
    device = next(iter(modules.values())).weight.device
    sums = {
        name: torch.zeros(_in_features(m), _in_features(m), dtype=torch.float64, device=device)
        for name, m in modules.items()
    }
    rows = dict.fromkeys(modules, 0)
    # "last": (input tensor, XᵀX, rows) of the most recent hook call. Holding the tensor keeps it alive, so an
    # identity match really is the same input (query/key/value share theirs), never reused memory.
    state: dict = {"mask": None, "last": None}

    def make_hook(weight_name: str):
        def hook(module: nn.Module, inputs: tuple, output) -> None:
            x = inputs[0]
            last = state["last"]
            if last is None or last[0] is not x:
                x_ = x.detach()
                if x_.dim() == 3 and exclude_padding:
                    mask = state["mask"]
                    if mask is None or tuple(mask.shape) != tuple(x_.shape[:2]):
                        raise ValueError("exclude_padding needs an attention_mask matching the Linear inputs")
                    flat = x_[mask.to(x_.device).bool()]
                else:
                    flat = x_.reshape(-1, x_.shape[-1])
                flat = flat.double()
                last = state["last"] = (x, flat.T @ flat, flat.shape[0])
            sums[weight_name].add_(last[1])
            rows[weight_name] += last[2]

        return hook

    def snapshot() -> dict[str, torch.Tensor]:
        return {n: (sums[n] / max(rows[n], 1)).float() for n in modules}

    handles = [m.register_forward_hook(make_hook(name)) for name, m in modules.items()]
    was_training = model.training
    model.eval()
    results: dict[int, dict[str, torch.Tensor]] = {}
    pending, seen = list(nums), 0
    try:
        with torch.no_grad():
            for batch in batches:
                while pending and seen >= pending[0]:
                    results[pending.pop(0)] = snapshot()
                if not pending:
                    break
                inputs = _model_inputs(batch, device)
                state["mask"] = inputs.get("attention_mask")
                state["last"] = None
                model(**inputs)
                seen += _batch_size(batch)
    finally:
        for h in handles:
            h.remove()
        state["last"] = None
        model.train(was_training)
    if seen == 0:
        raise ValueError("no batches to compute RegMean Gram matrices from")
    for n in pending:
        results[n] = snapshot()
    return results


def collect_regmean_grams(
    model: nn.Module,
    batches: Iterable[Mapping],
    num_examples: int,
    param_names: Sequence[str] | None = None,
    exclude_param_names_regex: Sequence[str] = (),
    exclude_padding: bool = False,
) -> dict[str, torch.Tensor]:
    """RegMean Gram matrices ``Linear weight name → G`` (in × in) from about ``num_examples`` examples."""
    return collect_regmean_grams_at(
        model, batches, [num_examples], param_names, exclude_param_names_regex, exclude_padding
    )[int(num_examples)]
