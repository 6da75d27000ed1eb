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


# The DARE flags' one set of defaults (every script declares them through :func:`add_dare_arguments`).
DARE_SEED_DEFAULT = 0
DARE_RATE_DEFAULTS = {"single": 0.0, "per_model": 0.1, "grid": None}
DARE_DEFAULTS = {"use_weight_rescale": False, "mask_strategy": "random", "weight_format": "delta_weight",
                 "seed": DARE_SEED_DEFAULT}  # fmt: skip
_SEED_HELP = (
    "seed of the random DARE masks (default 0 in every script: the original seeded its GLUE merges and LLM scripts "
    "with 0; its GLUE inference masks came from the HF Trainer's implicit seed 42, which this toolkit's counter-based "
    "masks cannot reproduce anyway; pass --seed 42 to use that number)"
)


def add_dare_arguments(
    group: argparse._ActionsContainer,
    *,
    rate: str = "per_model",
    grid_default: Sequence[float] | None = None,
    seed_also: str | None = None,
) -> None:
    """The DARE flags, declared once for every script: ``--weight_mask_rate``, ``--use_weight_rescale``,
    ``--mask_strategy``, ``--weight_format`` and ``--seed`` (the mask seed), with one set of defaults
    (:data:`DARE_DEFAULTS`).

    ``rate`` says what ``--weight_mask_rate`` is in the script:

    * ``"single"`` (the inference scripts): one rate, default 0 = the model as it is, no DARE (the original's 0.1
      silently masked);
    * ``"per_model"`` (the LLM merge, where DARE is asked for by ``mask_merging`` or DELLA): one rate for every
      model or one per model, default 0.1 (the original's);
    * ``"grid"`` (the GLUE merge): the rates DARE + X searches (default ``grid_default``, the spec's grid).

    ``seed_also``: what else the script seeds with ``--seed`` (added to its help)."""
    if rate == "grid":
        grid = " ".join(map(str, grid_default or ()))
        group.add_argument(
            "--weight_mask_rate", type=float, nargs="+", default=DARE_RATE_DEFAULTS["grid"],
            help=f"DARE drop rates p searched by mask_merging (default: {grid})",
        )  # fmt: skip
    elif rate == "per_model":
        group.add_argument(
            "--weight_mask_rate", type=float, nargs="+", default=[DARE_RATE_DEFAULTS["per_model"]],
            help="DARE drop rate p: one value for every model, or one per model (also DELLA's p; default 0.1, the "
            "original's)",
        )  # fmt: skip
    elif rate == "single":
        group.add_argument(
            "--weight_mask_rate", type=float, default=DARE_RATE_DEFAULTS["single"],
            help="DARE drop rate p in [0, 1] (default 0: the model as it is; the original's default 0.1 silently "
            "masked)",
        )  # fmt: skip
    else:
        raise ValueError(f"rate must be one of {', '.join(DARE_RATE_DEFAULTS)}, not {rate!r}")
    group.add_argument(
        "--use_weight_rescale",
        action="store_true",
        help="rescale the kept entries by 1/(1-p) (DARE; without it: DropOnly)",
    )
    group.add_argument(
        "--mask_strategy", default=DARE_DEFAULTS["mask_strategy"], choices=list(MASK_STRATEGIES),
        help="random: DARE's random drop; magnitude: magnitude pruning (the ablation)",
    )  # fmt: skip
    group.add_argument(
        "--weight_format", default=DARE_DEFAULTS["weight_format"], choices=list(WEIGHT_FORMATS),
        help="delta_weight: mask the delta against the backbone (DARE); finetuned_weight: mask the weights",
    )  # fmt: skip
    group.add_argument(
        "--seed", type=int, default=DARE_DEFAULTS["seed"],
        help=_SEED_HELP + (f"; also {seed_also}" if seed_also else ""),
    )  # fmt: skip


def method_settings(args: argparse.Namespace, method_name: str) -> dict[str, Any]:
    """The parameters of ``method_name`` read from ``args`` (flags it does not have are left to their defaults)."""
    method = get_method(method_name)
    return {p.name: getattr(args, p.name) for p in method.params if getattr(args, p.name, None) is not None}


def grid_values(args: argparse.Namespace, param: Param) -> list:
    """The values of a searched parameter: the ones given on the command line, else its grid."""
    given = getattr(args, param.name, None)
    return list(given) if given is not None else list(param.grid or [param.default])
