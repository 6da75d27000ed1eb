"""Run names: the one place that encodes settings into folder and file names.

Names only keep runs apart on disk; what a run did is recorded as data (the ``settings`` object in its results and
the manifest), and reports read that first. A method's part of a name is derived from its declaration: the method
name, then ``_<parameter>_<value>`` for each parameter in the declaration's ``name_order`` (default: declaration
order), which reproduces the original's names (``task_arithmetic_scaling_coefficient_1.0``,
``ties_merging_param_value_mask_rate_0.8_scaling_coefficient_1.0_trim_global``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from model_merging_methods.registry import get_method


def _value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "_".join(_value(v) for v in value)
    return str(value)


def method_run_name(method_name: str, params: Mapping[str, Any]) -> str:
    """``<method>`` followed by ``_<parameter>_<value>`` for each of its parameters (those given in ``params``)."""
    method = get_method(method_name)
    order = method.name_order or tuple(p.name for p in method.params)
    parts = [method.name]
    for name in order:
        if name in params and params[name] is not None:
            param = method.param(name)
            parts.append(f"{param.short or param.name}_{_value(params[name])}")
    return "_".join(parts)
