"""Task vectors and the name-based merging dispatcher the entry scripts use.

A task vector is τ = θ_ft − θ_pre over the parameters that are not excluded. ``TaskVector`` supports ``+`` (name by
name, same keys), scaling by a number (``λ * τ``), and ``combine_with_pretrained_model(θ_pre, λ)`` = θ_pre + λ τ.
``MergingMethod`` maps a method name to the pure functions of :mod:`model_merging_methods.merging_methods` and
copies a merged state dict into an ``nn.Module``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from model_merging_methods.mask_weights_utils import (
    StateDict,
    check_same_parameters,
    compute_dtype,
    is_excluded,
)
from model_merging_methods.merging_methods import MERGING_METHODS, merge_state_dicts


def parameters_of(model: nn.Module | Mapping[str, torch.Tensor]) -> StateDict:
    """``name → tensor`` for an ``nn.Module`` (its ``named_parameters()``: no buffers, tied parameters once) or a
    mapping (returned as a dict)."""
    if isinstance(model, nn.Module):
        return {name: p.detach() for name, p in model.named_parameters()}
    return dict(model)


class TaskVector:
    """τ = θ_ft − θ_pre (float32 math, stored in θ_ft's dtype), or a wrapper around a given ``name → tensor`` dict."""

    def __init__(
        self,
        pretrained: nn.Module | Mapping[str, torch.Tensor] | None = None,
        finetuned: nn.Module | Mapping[str, torch.Tensor] | None = None,
        exclude_param_names_regex: Iterable[str] = (),
        task_vector_param_dict: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if task_vector_param_dict is not None:
            self.task_vector_param_dict: StateDict = dict(task_vector_param_dict)
            return
        if pretrained is None or finetuned is None:
            raise ValueError("TaskVector needs (pretrained, finetuned) or task_vector_param_dict")
        pre, ft = parameters_of(pretrained), parameters_of(finetuned)
        check_same_parameters([pre, ft], ["the pretrained model", "the fine-tuned model"])
        exclude = tuple(exclude_param_names_regex)
        self.task_vector_param_dict = {
            n: (ft[n].to(compute_dtype(ft[n].dtype)) - pre[n].to(compute_dtype(ft[n].dtype))).to(ft[n].dtype)
            for n in pre
            if not is_excluded(n, exclude)
        }

    def __add__(self, other: TaskVector) -> TaskVector:
        if set(self.task_vector_param_dict) != set(other.task_vector_param_dict):
            raise ValueError("task vectors with different parameter names cannot be added")
        return TaskVector(
            task_vector_param_dict={
                n: (t.float() + other.task_vector_param_dict[n].float()).to(t.dtype)
                for n, t in self.task_vector_param_dict.items()
            }
        )

    def __radd__(self, other: object) -> TaskVector:
        if other == 0:  # so that sum([...]) works
            return self
        return NotImplemented

    def __mul__(self, scaling_coefficient: float) -> TaskVector:
        return TaskVector(
            task_vector_param_dict={
                n: (float(scaling_coefficient) * t.float()).to(t.dtype)
                for n, t in self.task_vector_param_dict.items()
            }
        )

    __rmul__ = __mul__

    def combine_with_pretrained_model(
        self, pretrained: nn.Module | Mapping[str, torch.Tensor], scaling_coefficient: float = 1.0
    ) -> StateDict:
        """θ_pre + λ τ for the names in the task vector."""
        pre = parameters_of(pretrained)
        out: StateDict = {}
        for n, tau in self.task_vector_param_dict.items():
            cdtype = compute_dtype(pre[n].dtype)
            out[n] = (
                pre[n].to(cdtype) + float(scaling_coefficient) * tau.to(device=pre[n].device, dtype=cdtype)
            ).to(pre[n].dtype)
        return out


def copy_params_to_model(params: Mapping[str, torch.Tensor], model: nn.Module) -> nn.Module:
    """Copy every tensor of ``params`` into the parameter of ``model`` with the same name (in place)."""
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in params.items():
            if name not in own:
                raise ValueError(f"parameter {name} is not in the model")
            own[name].copy_(tensor.to(device=own[name].device, dtype=own[name].dtype))
    return model


class MergingMethod:
    """Merge by method name: one of ``average_merging``, ``task_arithmetic``, ``fisher_merging``,
    ``regmean_merging``, ``ties_merging`` or ``mask_merging`` (DARE + ``mask_apply_method``)."""

    def __init__(self, merging_method_name: str) -> None:
        if merging_method_name not in MERGING_METHODS + ("mask_merging",):
            raise ValueError(
                f"unknown merging method {merging_method_name!r}; "
                f"expected one of {MERGING_METHODS + ('mask_merging',)}"
            )
        self.merging_method_name = merging_method_name

    def merging_models(
        self,
        merged_model: nn.Module | Mapping[str, torch.Tensor] | None,
        models_to_merge: Sequence[nn.Module | Mapping[str, torch.Tensor]],
        exclude_param_names_regex: Iterable[str] = (),
        **method_kwargs,
    ) -> StateDict:
        """The merged ``name → tensor`` dict; ``merged_model`` is the pretrained model (None for methods without)."""
        pretrained = None if merged_model is None else parameters_of(merged_model)
        models = [parameters_of(m) for m in models_to_merge]
        return merge_state_dicts(
            self.merging_method_name, pretrained, models, exclude_param_names_regex, **method_kwargs
        )

    def get_merged_model(
        self,
        merged_model: nn.Module,
        models_to_merge: Sequence[nn.Module | Mapping[str, torch.Tensor]],
        exclude_param_names_regex: Iterable[str] = (),
        **method_kwargs,
    ) -> nn.Module:
        """Merge and copy the result into ``merged_model`` (the pretrained model, modified in place and returned);
        excluded parameters keep the pretrained values."""
        merged = self.merging_models(
            merged_model, models_to_merge, exclude_param_names_regex, **method_kwargs
        )
        exclude = tuple(exclude_param_names_regex)
        return copy_params_to_model(
            {n: t for n, t in merged.items() if not is_excluded(n, exclude)}, merged_model
        )
