"""The merging-method registry: every method is declared once, in its own module under
:mod:`model_merging_methods.methods`, as a :class:`MergeMethod`; everything per-method elsewhere is derived from it.

A declaration holds the method's name and label, a one-line formula and a reference, its typed parameters
(:class:`Param`: default, validator, GLUE search grid, help), whether it needs the pre-trained model, how many models
it takes, its per-tensor ``kernel`` and its ``scope``:

``element``  the kernel is element-wise: it is called on aligned row blocks of the tensors (any block size gives the
             same bytes), so a streamed merge never holds more than a block per model;
``tensor``   the kernel needs whole tensors (per-tensor ranks, norms or cosines);
``model``    like ``element``, after :attr:`MergeMethod.model_statistics` has computed model-wide statistics in
             passes of its own (TIES's global trim threshold and majority sign).

Methods that need data statistics (Fisher weights, RegMean Gram matrices) declare them as :class:`DataStatistic`;
they run in memory only, where the caller collected the statistics.

The two executors (:mod:`model_merging_methods.engine`: in memory, and the streaming engine) run any declared method
through the same driver, so their bytes are identical; a method may add a streamed fast path
(:attr:`MergeMethod.stream_pass`) that must give the same bytes (the contract test checks every method).

DARE and its ablations are not methods: they are a pre-step (:mod:`model_merging_methods.mask_weights_utils`)
composable with every method whose ``dare_prestep`` is true (``mask_merging`` + ``mask_apply_method``).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from model_merging_methods.errors import MergeError

SCOPES = ("element", "tensor", "model")


@dataclass(frozen=True)
class Param:
    """One typed hyper-parameter of a method (also the name of its keyword argument and command-line flag)."""

    name: str
    # a validator of model_merging_methods.validators: (name, value) -> normalised value
    check: Callable[[str, Any], Any]
    default: Any
    help: str
    type: type = float  # the type of one value on the command line
    choices: tuple | None = None
    grid: tuple | None = None  # the GLUE hyper-parameter search grid (None: not searched)
    per_model: bool = False  # one value for every model, or one per model
    flag: bool = True  # exposed on the command line
    short: str | None = None  # its name in run names (default: ``name``)

    def validate(self, value: Any, num_models: int | None = None) -> Any:
        if self.per_model:
            values = list(value) if isinstance(value, list | tuple) else [value]
            n = num_models if num_models is not None else len(values)
            if len(values) == 1:
                values = values * n
            if len(values) != n:
                raise MergeError(f"got {len(values)} values of {self.name} for {n} models")
            return [self._one(v) for v in values]
        return self._one(value)

    def _one(self, value: Any) -> Any:
        if self.choices is not None:
            from model_merging_methods.validators import check_choice

            return check_choice(self.name, value, self.choices)
        return self.check(self.name, value)


@dataclass(frozen=True)
class DataStatistic:
    """Per-model statistics a method needs beyond the weights (collected from data by the caller), passed to the
    in-memory functions as the keyword ``name`` (one ``{parameter name: tensor}`` dict per model)."""

    name: str
    help: str
    params: tuple[
        Param, ...
    ] = ()  # settings of the collection (e.g. the number of examples), searched on GLUE


@dataclass(frozen=True)
class TensorContext:
    """What a kernel may know besides the tensors: which tensor and which rows, which models, the seed, model-wide
    statistics, and the data statistics of this tensor (``data[statistic] = [one tensor or None per model]``)."""

    name: str
    shape: tuple[int, ...]
    row_start: int = 0
    model_indices: tuple[int, ...] = ()
    seed: int = 0
    stats: Any = None
    data: Mapping[str, Sequence[torch.Tensor | None]] = field(default_factory=dict)


Kernel = Callable[
    [torch.Tensor | None, Sequence[torch.Tensor], Mapping[str, Any], TensorContext], torch.Tensor
]


@dataclass(frozen=True)
class MergeMethod:
    """The declaration of one merging method.

    ``kernel(base, tensors, params, ctx)`` gets the pre-trained tensor (None unless ``needs_base``) and the models'
    tensors, all in the compute dtype (float32; float64 stays float64) and on one device, and returns the merged
    tensor in that dtype. It must not modify its inputs. ``params`` is the validated parameter dict.
    """

    name: str
    label: str
    formula: str
    reference: str
    params: tuple[Param, ...]
    kernel: Kernel
    needs_base: bool = True
    scope: str | Callable[[Mapping[str, Any]], str] = "element"
    min_models: int = 1
    max_models: int | None = None
    copy_from: str = (
        "base"  # where excluded and non-float tensors come from: "base" or "first" (fine-tuned model)
    )
    model_statistics: Callable[[Mapping[str, Any], Any], Any] | None = None
    data_statistics: tuple[DataStatistic, ...] = ()
    dare_prestep: bool = True
    stream_pass: Callable[..., dict[str, Any]] | None = None
    random: bool = False  # draws random numbers (seeded by the ``seed`` parameter and the model and tensor)
    order: int = 100  # position in listings (the paper's five methods first)
    # checks across parameters (and the number of models), run before anything is read
    check: Callable[[Mapping[str, Any], int], None] | None = None
    name_order: tuple[str, ...] | None = None  # parameter order in run names (default: declaration order)

    def scope_for(self, params: Mapping[str, Any]) -> str:
        scope = self.scope(params) if callable(self.scope) else self.scope
        if scope not in SCOPES:
            raise MergeError(f"{self.name}: unknown scope {scope!r}")
        return scope

    @property
    def streamable(self) -> bool:
        """Whether the streaming engine can run it (methods that need data statistics run in memory only)."""
        return not self.data_statistics

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def validate(self, values: Mapping[str, Any], num_models: int, strict: bool = True) -> dict[str, Any]:
        """Fill in defaults and check every parameter; with ``strict``, unknown keywords are an error."""
        if num_models < self.min_models:
            raise MergeError(f"{self.name} needs at least {self.min_models} models, got {num_models}")
        if self.max_models is not None and num_models > self.max_models:
            raise MergeError(f"{self.name} takes at most {self.max_models} models, got {num_models}")
        known = {p.name for p in self.params}
        if strict:
            unknown = sorted(set(values) - known)
            if unknown:
                raise MergeError(
                    f"{self.name} has no parameter {unknown[0]!r} (its parameters: {', '.join(sorted(known)) or 'none'})"
                )
        out = {}
        for p in self.params:
            value = values.get(p.name, p.default)
            out[p.name] = None if value is None and p.default is None else p.validate(value, num_models)
        if self.check is not None:
            self.check(out, num_models)
        return out

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def grid_params(self) -> tuple[Param, ...]:
        """The parameters searched on GLUE (the method's own, then its data statistics'), outer loop first."""
        own = tuple(p for p in self.params if p.grid is not None)
        return own + tuple(p for s in self.data_statistics for p in s.params if p.grid is not None)


_REGISTRY: dict[str, MergeMethod] = {}
_LOADED = False


def register(method: MergeMethod) -> MergeMethod:
    """Add a method (called at import time by its module). Parameters with the same name across methods must agree
    on default, type and choices, because they share one command-line flag."""
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise MergeError(f"merging method {method.name!r} is registered twice")
    if method.data_statistics and method.scope not in ("tensor",):
        raise MergeError(f"{method.name}: methods with data statistics must have tensor scope")
    for other in _REGISTRY.values():
        for p in method.params:
            for q in other.params:
                if p.name == q.name and (p.default, p.type, p.choices, p.per_model) != (
                    q.default, q.type, q.choices, q.per_model,
                ):  # fmt: skip
                    raise MergeError(
                        f"parameter {p.name} of {method.name} differs from the one of {other.name} "
                        "(same name, different default, type or choices)"
                    )
    _REGISTRY[method.name] = method
    return method


def _load() -> None:
    """Import every module of :mod:`model_merging_methods.methods` (each registers its method): adding a method is
    adding a module, nothing else."""
    global _LOADED
    if not _LOADED:
        import model_merging_methods.methods as package

        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            importlib.import_module(f"{package.__name__}.{info.name}")
        _LOADED = True


def get_method(name: str) -> MergeMethod:
    """The declaration of method ``name``; an unknown name is a :class:`MergeError` listing the known ones."""
    _load()
    if name not in _REGISTRY:
        raise MergeError(
            f"unknown merging method {name!r}; expected one of {', '.join(m.name for m in all_methods())}"
        )
    return _REGISTRY[name]


def all_methods() -> list[MergeMethod]:
    """Every registered method, by ``order`` (the paper's five first), then name."""
    _load()
    return sorted(_REGISTRY.values(), key=lambda m: (m.order, m.name))


def method_names(*, streamable: bool | None = None, dare_prestep: bool | None = None) -> list[str]:
    """Names of the registered methods, optionally only those the streaming engine runs and/or that take DARE as a
    pre-step."""
    return [
        m.name
        for m in all_methods()
        if (streamable is None or m.streamable == streamable)
        and (dare_prestep is None or m.dare_prestep == dare_prestep)
    ]


def shared_params(methods: Sequence[MergeMethod] | None = None) -> dict[str, Param]:
    """Every parameter of ``methods`` (default: all) by name, once: the command-line flags of a merge script."""
    out: dict[str, Param] = {}
    for m in methods if methods is not None else all_methods():
        for p in m.params:
            out.setdefault(p.name, p)
        for s in m.data_statistics:
            for p in s.params:
                out.setdefault(p.name, p)
    return out


def methods_using(param_name: str) -> list[str]:
    """Names of the methods with a parameter ``param_name`` (for help texts)."""
    return [m.name for m in all_methods() if any(p.name == param_name for p in m.params)]
