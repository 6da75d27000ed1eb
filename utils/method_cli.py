"""Command-line flags derived from the merging-method registry: the method choices, every method parameter (one flag
per parameter name, shared by the methods that use it), the GLUE search grids, and the DARE pre-step flags.

Both merge scripts build their method flags here, so a method declared in ``model_merging_methods/methods/`` is on
the command line without any script change. Conventions: a boolean parameter is a ``store_true`` flag (absent =
False, as the original's flags); a per-model parameter takes one value or one per model; with ``grid=True`` (GLUE) a
parameter that has a search grid takes several values (default: its grid).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from model_merging_methods.mask_weights_utils import MASK_STRATEGIES, WEIGHT_FORMATS
from model_merging_methods.registry import (
    MergeMethod,
    Param,
    all_methods,
    get_method,
    methods_using,
    shared_params,
)

DARE_FLAGS = ("weight_mask_rate", "use_weight_rescale", "mask_strategy", "weight_format", "seed")


def script_methods(streamable_only: bool) -> list[MergeMethod]:
    """The methods a script offers: every registered one, or those the streaming engine runs."""
    return [m for m in all_methods() if m.streamable or not streamable_only]


def add_method_arguments(
    group: argparse._ActionsContainer,
    *,
    streamable_only: bool,
    grid: bool = False,
    aliases: Mapping[str, Sequence[str]] | None = None,
    default_method: str = "average_merging",
) -> None:
    """``--merging_method_name``, ``--mask_apply_method`` and one flag per parameter of the offered methods (the
    DARE flags excepted: :func:`add_dare_arguments`)."""
    methods = script_methods(streamable_only)
    names = [m.name for m in methods]
    group.add_argument(
        "--merging_method_name", default=default_method, choices=[*names, "mask_merging"],
        help="the merging method; mask_merging = DARE first, then --mask_apply_method",
    )  # fmt: skip
    group.add_argument(
        "--mask_apply_method", default=default_method, choices=[m.name for m in methods if m.dare_prestep],
        help="the method applied after DARE (with --merging_method_name mask_merging)",
    )  # fmt: skip
    aliases = aliases or {}
    for param in shared_params(methods).values():
        if not param.flag or param.name in DARE_FLAGS:
            continue
        flags = [f"--{param.name}", *aliases.get(param.name, ())]
        users = ", ".join(n for n in methods_using(param.name) if n in names) or "data statistics"
        _add_param(group, flags, param, grid, users)


def _add_param(group, flags: list[str], param: Param, grid: bool, users: str) -> None:
    text = f"{param.help} ({users})"
    if grid and param.grid is not None:
        group.add_argument(
            *flags, dest=param.name, type=param.type, nargs="+", default=None,
            help=f"{text}; grid values (default: {' '.join(map(str, param.grid))})",
        )  # fmt: skip
    elif param.type is bool:
        group.add_argument(*flags, dest=param.name, action="store_true", help=text)
    elif param.per_model:
        default = None if param.default is None else [param.default]
        group.add_argument(
            *flags, dest=param.name, type=param.type, nargs="+", default=default,
            help=f"{text}; one value for every model, or one per model",
        )  # fmt: skip
    else:
        group.add_argument(
            *flags, dest=param.name, type=param.type, default=param.default, choices=param.choices,
            help=f"{text} (default: {param.default})",
        )  # fmt: skip


def add_dare_arguments(
    group: argparse._ActionsContainer,
    *,
    grid: bool = False,
    rate_default: float | None = None,
    seed_default: int = 0,
) -> None:
    """The DARE pre-step flags, declared once: ``--weight_mask_rate`` (one per model, or a GLUE grid),
    ``--use_weight_rescale``, ``--mask_strategy``, ``--weight_format``, ``--seed``."""
    if grid:
        group.add_argument(
            "--weight_mask_rate", type=float, nargs="+", default=None,
            help="DARE drop rates p searched on GLUE (default: 0.1 0.3 0.5 0.7 0.9)",
        )  # fmt: skip
    else:
        group.add_argument(
            "--weight_mask_rate", type=float, nargs="+", default=[rate_default if rate_default is not None else 0.1],
            help="DARE drop rate p: one value for every model, or one per model (also DELLA's p)",
        )  # fmt: skip
    group.add_argument("--use_weight_rescale", action="store_true", help="rescale survivors by 1/(1-p)")
    group.add_argument("--mask_strategy", default="random", choices=list(MASK_STRATEGIES))
    group.add_argument("--weight_format", default="delta_weight", choices=list(WEIGHT_FORMATS))
    group.add_argument(
        "--seed", type=int, default=seed_default, help="seed of the random masks (DARE, DELLA)"
    )


def method_settings(args: argparse.Namespace, method_name: str) -> dict[str, Any]:
    """The parameters of ``method_name`` read from ``args`` (flags it does not have are left to their defaults)."""
    method = get_method(method_name)
    return {p.name: getattr(args, p.name) for p in method.params if getattr(args, p.name, None) is not None}


def grid_values(args: argparse.Namespace, param: Param) -> list:
    """The values of a searched parameter: the ones given on the command line, else its grid."""
    given = getattr(args, param.name, None)
    return list(given) if given is not None else list(param.grid or [param.default])
