"""mergekit configurations in and out: a mergekit YAML recipe run by our streaming engine, and the mergekit YAML
equivalent to one of our merges (written beside its manifest as ``mergekit_config.yml``).

A recipe means what it means in mergekit 0.1.5 (``docs/mergekit.md`` has the mapping table and the measurements):
mergekit's rules that differ from the papers' are options of our methods (``model_weights``, ``density``,
``normalize``/``no_normalize``, ``zero_sign``, ``trim_rule``, ``breadcrumbs_rule``, ``sparsify_rescale``,
``della_rescale``, ``della_linear``, and the DARE pre-step's ``rescale_rule="l1"``), and parameters are resolved as
mergekit resolves them: a model's own ``parameters`` first, then the global ``parameters``; a value is a scalar, a
gradient (a list interpolated over the layers: t = layer / (layers − 1), t = 0 for tensors outside the layers) or a
list of ``{filter, value}`` conditions (the first whose ``filter`` is a substring of the tensor name, or has none).

Supported: ``merge_method`` (linear, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties,
della, della_linear, model_stock, slerp), ``base_model``, ``models`` (``model`` and ``parameters``), ``parameters``,
``dtype``, ``out_dtype`` and ``tokenizer_source`` (``base`` or a model). Everything else (slices, modules,
passthrough and the other methods we lack, ``tokenizer`` blocks, chat templates, LoRA references, unknown keys and
parameters) is refused with one line naming the key. The core never sees YAML: this module turns a recipe into
:func:`model_merging_methods.streaming.merge_checkpoints` arguments.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_merging_methods.errors import MergeError
from model_merging_methods.reader import NameResolver, read_json_object, resolve_model_path
from model_merging_methods.streaming import (
    DareSettings,
    OutputOptions,
    PerTensorSettings,
    merge_checkpoints,
)
from model_merging_methods.validators import check_flag

CONFIG_FILE = "mergekit_config.yml"
MERGEKIT_VERSION = "0.1.5"

# ---------------------------------------------------------------------------------------------------------------
# mergekit's methods and their parameters (mergekit 0.1.5: merge_methods/registry.py and the method modules)
# ---------------------------------------------------------------------------------------------------------------

REQUIRED = object()


@dataclass(frozen=True)
class KParam:
    """One mergekit parameter: its value type, its default (``REQUIRED``: none), and whether it is per model."""

    kind: str  # "float" or "bool"
    default: Any
    per_model: bool


def _gta(normalize: bool, rescale: bool, extra: Mapping[str, KParam] = {}) -> dict[str, KParam]:
    return {
        "int8_mask": KParam("bool", False, False),
        "normalize": KParam("bool", normalize, False),
        "rescale": KParam("bool", rescale, False),
        "lambda": KParam("float", 1.0, False),
        "weight": KParam("float", REQUIRED, True),
        "density": KParam("float", 1.0, True),
        **extra,
    }


GAMMA = {"gamma": KParam("float", 0.01, True)}
EPSILON = {"epsilon": KParam("float", 0.15, True)}

MERGEKIT_METHODS: dict[str, dict[str, KParam]] = {
    "linear": {"weight": KParam("float", REQUIRED, True), "normalize": KParam("bool", True, False)},
    "task_arithmetic": _gta(False, False),
    "ties": _gta(True, False),
    "dare_ties": _gta(False, True),
    "dare_linear": _gta(False, True),
    "breadcrumbs": _gta(False, False, GAMMA),
    "breadcrumbs_ties": _gta(False, False, GAMMA),
    "della": _gta(True, True, EPSILON),
    "della_linear": _gta(False, True, EPSILON),
    "model_stock": {"filter_wise": KParam("bool", False, False)},
    "slerp": {"t": KParam("float", REQUIRED, False)},
}
NEEDS_BASE = {m for m in MERGEKIT_METHODS if m != "linear"}
# mergekit methods we do not run, with the reason given to the user
LACKING = {
    "passthrough": "passthrough copies layers (frankenmerges with slices); there is nothing to merge",
    "nuslerp": "not implemented here (SLERP of task vectors)",
    "multislerp": "not implemented here",
    "karcher": "not implemented here",
    "sce": "not implemented here",
    "ram": "not implemented here",
    "ramplus_tl": "not implemented here",
    "nearswap": "not implemented here",
    "arcee_fusion": "not implemented here",
}
TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source")
REFUSED_TOP = {
    "slices": "layer slices (frankenmerges) are not supported; list whole models under 'models'",
    "modules": "per-module definitions are not supported; list whole models under 'models'",
    "tokenizer": "mergekit's tokenizer block (token sources, added tokens) is not supported; use tokenizer_source: "
    "base or a model",
    "chat_template": "chat templates are not set here; the tokenizer files are copied as they are",
}
DTYPES = ("float32", "float16", "bfloat16")

# ---------------------------------------------------------------------------------------------------------------
# reading YAML
# ---------------------------------------------------------------------------------------------------------------


def _yaml():
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - PyYAML comes with transformers
        raise MergeError("reading a mergekit configuration needs PyYAML (pip install pyyaml)") from exc
    return yaml


def _loader():
    yaml = _yaml()

    class Loader(yaml.SafeLoader):
        """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise MergeError(f"key {key!r} is given twice (line {mark.line + 1})")
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file; a missing file, a syntax error or another top level is one-line error."""
    yaml = _yaml()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MergeError(f"--config: no file {path}") from None
    except IsADirectoryError:
        raise MergeError(f"--config: {path} is a folder, not a YAML file") from None
    except UnicodeDecodeError:
        raise MergeError(f"--config: {path} is not UTF-8 text") from None
    try:
        data = yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise MergeError(f"{path}: not valid YAML{where}: {problem}") from None
    except MergeError as exc:
        raise MergeError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise MergeError(f"{path}: a mergekit configuration is a mapping (merge_method, models, ...)")
    return data


# ---------------------------------------------------------------------------------------------------------------
# parameter settings: scalars, gradients, filters (mergekit's config.evaluate_setting)
# ---------------------------------------------------------------------------------------------------------------


def _check_float(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise MergeError(f"{where}: expected a number, got {value!r}")
    try:
        v = float(value)
    except ValueError:
        raise MergeError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(v):
        raise MergeError(f"{where}: expected a finite number, got {value!r}")
    return v


def _validator(kind: str, where: str) -> Callable[[Any], Any]:
    if kind == "bool":
        return lambda v: check_flag(where, v)
    return lambda v: _check_float(where, v)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, bool | int | float | str)


def check_setting(where: str, setting: Any, validate: Callable[[Any], Any]) -> None:
    """Refuse a malformed setting (one line naming the key) before anything is read."""
    if _is_scalar(setting):
        validate(setting)
        return
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        raise MergeError(f"{where}: expected a value, a list of values (a gradient) or filter/value pairs")
    if all(_is_scalar(e) for e in setting):
        for e in setting:
            validate(e)
        return
    for i, cond in enumerate(setting):
        if not isinstance(cond, dict):
            raise MergeError(
                f"{where}[{i}]: a list is either values (a gradient) or filter/value pairs, not both"
            )
        unknown = sorted(set(cond) - {"filter", "value"})
        if unknown:
            raise MergeError(f"{where}[{i}].{unknown[0]}: unknown key (a condition has 'filter' and 'value')")
        if "value" not in cond:
            raise MergeError(f"{where}[{i}]: a condition needs a 'value'")
        if cond.get("filter") is not None and not isinstance(cond["filter"], str):
            raise MergeError(f"{where}[{i}].filter: expected a string (a part of tensor names)")
        value = cond["value"]
        if not (
            _is_scalar(value) or (isinstance(value, list) and value and all(_is_scalar(e) for e in value))
        ):
            raise MergeError(f"{where}[{i}].value: expected a value or a list of values (a gradient)")
        check_setting(f"{where}[{i}].value", value, validate)


def is_varying(setting: Any) -> bool:
    """Whether a setting can take different values on different tensors (a gradient or a filter)."""
    return not _is_scalar(setting)


def evaluate_setting(tensor_name: str, setting: Any, t: float, validate: Callable[[Any], Any]) -> Any:
    """mergekit's ``evaluate_setting``: a scalar; a gradient interpolated at ``t`` (numbers linearly, exactly as
    mergekit computes it; booleans and strings pick a value); the first condition whose filter is empty, ``*`` or a
    substring of ``tensor_name``; None when nothing applies (the next scope is tried)."""
    if isinstance(setting, dict):
        setting = [setting]
    if _is_scalar(setting):
        return validate(setting)
    if not setting:
        return None
    if all(_is_scalar(e) for e in setting):
        values = [validate(e) for e in setting]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return validate((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return evaluate_setting(tensor_name, cond["value"], t, validate)
    return None


def headline_setting(setting: Any, validate: Callable[[Any], Any]) -> Any:
    """A setting's value for the record (the manifest's ``parameters``): a gradient's first value, the condition
    without a filter (else the first condition). The merge itself resolves every tensor exactly."""
    if isinstance(setting, dict):
        setting = [setting]
    if _is_scalar(setting):
        return validate(setting)
    if not setting:
        return None
    if all(_is_scalar(e) for e in setting):
        return validate(setting[0])
    chosen = next((c for c in setting if c.get("filter") in (None, "*")), setting[0])
    return headline_setting(chosen["value"], validate)


LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_position(tensor_name: str, num_layers: int | None) -> float:
    """mergekit's t of a tensor: layer / (layers − 1) inside the layers (1 with a single layer), 0 outside."""
    m = LAYER_PATTERN.search(tensor_name)
    if m is None:
        return 0.0
    if num_layers is None:
        raise MergeError(
            f"a gradient needs the number of layers, which the base model's config.json does not give "
            f"({' / '.join(LAYER_COUNT_KEYS)})"
        )
    index = int(m.group(1))
    if index >= num_layers:
        raise MergeError(
            f"tensor {tensor_name} is in layer {index}, but config.json gives {num_layers} layers"
        )
    return index / (num_layers - 1) if num_layers > 1 else 1.0


# ---------------------------------------------------------------------------------------------------------------
# a recipe
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Recipe:
    """A checked mergekit configuration and what it becomes here."""

    source: Path
    config: dict[str, Any]  # the configuration as read (model paths as given)
    merge_method: str
    method: str  # our method
    base: str  # the pre-trained model (the first input for linear without base_model)
    base_folder: Path
    models: list[str]  # the models merged, in our order
    folders: list[Path]
    global_settings: dict[str, Any]  # parameter name -> setting
    model_settings: list[dict[str, Any]]  # per merged model: parameter name -> setting (own parameters only)
    has_base_input: list[bool]  # per merged model: whether it is mergekit's base model (linear, slerp)
    dtype: str | None
    tokenizer_source: str | None
    num_layers: int | None
    varying: bool = False
    notes: list[str] = field(default_factory=list)

    # -- resolution per tensor -----------------------------------------------------------------------------------

    def _resolve(self, name: str, param: str, model: int | None, t: float) -> Any:
        spec = MERGEKIT_METHODS[self.merge_method][param]
        scopes = ([self.model_settings[model]] if model is not None else []) + [self.global_settings]
        where = f"{param} of {self.models[model]}" if model is not None else param
        validate = _validator(spec.kind, where)
        for scope in scopes:
            if param in scope:
                value = evaluate_setting(name, scope[param], t, validate)
                if value is not None:
                    return value
        if spec.default is REQUIRED:
            shown = f"{self.models[model]}.{name}" if model is not None else name
            raise MergeError(
                f"missing required parameter {param} for {shown} (mergekit's {self.merge_method})"
            )
        return spec.default

    def _headline(self, param: str, model: int | None) -> Any:
        spec = MERGEKIT_METHODS[self.merge_method][param]
        scopes = ([self.model_settings[model]] if model is not None else []) + [self.global_settings]
        validate = _validator(spec.kind, param)
        for scope in scopes:
            if param in scope:
                value = headline_setting(scope[param], validate)
                if value is not None:
                    return value
        if spec.default is REQUIRED:
            shown = self.models[model] if model is not None else "the merge"
            raise MergeError(
                f"missing required parameter {param} for {shown} (mergekit's {self.merge_method})"
            )
        return spec.default

    def mergekit_values(self, name: str | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(shared values, per-model values) of tensor ``name`` (None: the headline values for the record)."""
        spec = MERGEKIT_METHODS[self.merge_method]
        t = layer_position(name, self.num_layers) if name is not None and self.varying else 0.0

        def value(param: str, model: int | None) -> Any:
            if name is None:
                return self._headline(param, model)
            return self._resolve(name, param, model, t)

        shared = {p: value(p, None) for p, s in spec.items() if not s.per_model}
        per_model = [
            {p: value(p, i) for p, s in spec.items() if s.per_model and not self.has_base_input[i]}
            for i in range(len(self.models))
        ]
        if self.merge_method == "linear":  # weight is per input, the base model included
            per_model = [{"weight": value("weight", i)} for i in range(len(self.models))]
        return shared, per_model

    def ours(self, name: str | None) -> tuple[dict[str, Any], list[float] | None]:
        """(our method's parameters, the DARE drop rates or None) for tensor ``name`` (None: the headline)."""
        shared, per_model = self.mergekit_values(name)
        return to_ours(self.merge_method, shared, per_model, name)

    # -- running -------------------------------------------------------------------------------------------------

    def dare(self, seed: int) -> DareSettings | None:
        if self.merge_method not in ("dare_ties", "dare_linear"):
            return None
        _, rates = self.ours(None)
        shared, _ = self.mergekit_values(None)
        return DareSettings(
            rates, use_weight_rescale=bool(shared["rescale"]), mask_strategy="random", weight_format="delta_weight",
            seed=int(seed), rescale_rule="l1",
        )  # fmt: skip

    def per_tensor(self) -> PerTensorSettings | None:
        if not self.varying:
            return None
        dare = self.merge_method in ("dare_ties", "dare_linear")
        return PerTensorSettings(
            params=lambda name: self.ours(name)[0],
            dare_rates=(lambda name: self.ours(name)[1]) if dare else None,
        )


def to_ours(
    merge_method: str,
    shared: Mapping[str, Any],
    per_model: Sequence[Mapping[str, Any]],
    name: str | None = None,
) -> tuple[dict[str, Any], list[float] | None]:
    """mergekit's resolved values of one tensor → (our method's parameters, DARE drop rates or None)."""
    where = f" (tensor {name})" if name else ""

    def same(param: str) -> float:
        values = {pm[param] for pm in per_model}
        if len(values) > 1:
            raise MergeError(
                f"{param} differs between the models{where} ({', '.join(map(str, sorted(values)))}); here one "
                f"{param} applies to every model"
            )
        return values.pop()

    def unused(param: str, default: Any, why: str) -> None:
        values = [shared[param]] if param in shared else [pm[param] for pm in per_model]
        if any(v != default for v in values):
            raise MergeError(f"{param}: {why}{where}")

    m = merge_method
    weights = [pm["weight"] for pm in per_model] if all("weight" in pm for pm in per_model) else None
    lam = shared.get("lambda", 1.0)
    density = [pm["density"] for pm in per_model] if per_model and "density" in per_model[0] else None
    for d in density or []:
        if not 0.0 <= d <= 1.0:
            raise MergeError(f"density must be in [0, 1], got {d}{where}")
    if m == "linear":
        return {"model_weights": weights, "no_normalize": not shared["normalize"]}, None
    if m == "model_stock":
        if shared["filter_wise"]:
            raise MergeError("filter_wise: Model Stock per row is not supported (only per tensor)")
        return {}, None
    if m == "slerp":
        return {"slerp_t": shared["t"]}, None
    params: dict[str, Any] = {"scaling_coefficient": lam, "model_weights": weights}
    if m == "task_arithmetic":
        unused(
            "density", 1.0, "task_arithmetic does not sparsify, so mergekit ignores density; use dare_linear"
        )
        unused("rescale", False, "task_arithmetic does not sparsify, so mergekit ignores rescale")
        return {**params, "normalize": bool(shared["normalize"])}, None
    if m == "dare_linear":
        return {**params, "normalize": bool(shared["normalize"])}, [1.0 - d for d in density]
    if m == "dare_ties":
        params.update(
            trim_scope="tensor",
            param_value_mask_rate=0.0,
            zero_sign="plus",
            no_normalize=not shared["normalize"],
        )
        return params, [1.0 - d for d in density]
    rescale = "l1" if shared["rescale"] else "none"
    if m == "ties":
        params.update(
            trim_scope="tensor", trim_rule="exact_k", densities=density, zero_sign="plus",
            no_normalize=not shared["normalize"], sparsify_rescale=rescale,
        )  # fmt: skip
        return params, None
    if m in ("breadcrumbs", "breadcrumbs_ties"):
        params.update(
            breadcrumbs_rule="keep_count", densities=density, outlier_mask_rate=same("gamma"),
            normalize=bool(shared["normalize"]), sparsify_rescale=rescale,
        )  # fmt: skip
        if m == "breadcrumbs_ties":
            params.update(breadcrumbs_elect_sign=True, zero_sign="plus")
        return params, None
    if m in ("della", "della_linear"):
        params.update(
            densities=density, weight_mask_rate=[min(1.0, max(0.0, 1.0 - d)) for d in density],
            della_epsilon=same("epsilon"), della_rescale=rescale, zero_sign="plus",
            no_normalize=not shared["normalize"], della_linear=m == "della_linear",
        )  # fmt: skip
        return params, None
    raise MergeError(f"merge_method: {m} is not supported")  # pragma: no cover - checked when reading


OUR_METHOD = {
    "linear": "average_merging",
    "task_arithmetic": "task_arithmetic",
    "ties": "ties_merging",
    "dare_ties": "ties_merging",
    "dare_linear": "task_arithmetic",
    "breadcrumbs": "breadcrumbs_merging",
    "breadcrumbs_ties": "breadcrumbs_merging",
    "della": "della_merging",
    "della_linear": "della_merging",
    "model_stock": "model_stock_merging",
    "slerp": "slerp_merging",
}


def _model_ref(where: str, value: Any) -> str:
    if isinstance(value, dict):
        raise MergeError(
            f"{where}: give the model as a path or hub id (structured model references are not supported)"
        )
    if not isinstance(value, str) or not value.strip():
        raise MergeError(f"{where}: expected a model path or hub id, got {value!r}")
    if "+" in value and not os.path.exists(value):
        raise MergeError(
            f"{where}: {value} applies a LoRA to a model (model+lora), which is not supported here"
        )
    return value


def _resolve(where: str, name: str, resolver: NameResolver | None) -> Path:
    try:
        return resolve_model_path(name, resolver)
    except MergeError as exc:
        raise MergeError(f"{where}: {exc}") from None


def _num_layers(folder: Path) -> int | None:
    path = folder / "config.json"
    if not path.is_file():
        return None
    config = read_json_object(path, "config.json")
    for key in LAYER_COUNT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _check_settings(where: str, settings: Any, merge_method: str, per_model_only: bool) -> dict[str, Any]:
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise MergeError(f"{where}: expected a mapping of parameter names to values")
    spec = MERGEKIT_METHODS[merge_method]
    for key, setting in settings.items():
        if key not in spec:
            raise MergeError(
                f"{where}.{key}: unknown parameter of mergekit's {merge_method} (its parameters: "
                f"{', '.join(sorted(spec)) or 'none'})"
            )
        if per_model_only and not spec[key].per_model:
            raise MergeError(
                f"{where}.{key}: {key} is a global parameter of {merge_method} (mergekit ignores it per model); "
                "move it to the top-level parameters"
            )
        check_setting(f"{where}.{key}", setting, _validator(spec[key].kind, f"{where}.{key}"))
    return dict(settings)


def load_recipe(path: str | Path, name_resolver: NameResolver | None = None) -> Recipe:
    """Read and check a mergekit configuration: every refused key, malformed value and missing model is one
    :class:`MergeError` line, raised before any weight is read."""
    path = Path(path)
    config = read_yaml(path)
    for key in config:
        if key in REFUSED_TOP:
            raise MergeError(f"{key}: {REFUSED_TOP[key]}")
        if key not in TOP_KEYS:
            raise MergeError(
                f"{key}: unknown key of a mergekit configuration (supported: {', '.join(TOP_KEYS)})"
            )
    method = config.get("merge_method")
    if method is None:
        raise MergeError("merge_method: missing (e.g. ties, dare_ties, linear, slerp)")
    if method in LACKING or method not in MERGEKIT_METHODS:
        why = LACKING.get(method, "unknown method")
        raise MergeError(
            f"merge_method: {method} is not supported ({why}); supported: {', '.join(MERGEKIT_METHODS)}"
        )
    models_cfg = config.get("models")
    if not isinstance(models_cfg, list) or not models_cfg:
        raise MergeError("models: expected a list of models (- model: path, with optional parameters)")
    global_settings = _check_settings("parameters", config.get("parameters"), method, per_model_only=False)
    base = config.get("base_model")
    if base is not None:
        base = _model_ref("base_model", base)
    if method in NEEDS_BASE and base is None:
        raise MergeError(f"base_model: mergekit's {method} needs a base model")
    entries: list[tuple[str, dict[str, Any]]] = []
    for i, entry in enumerate(models_cfg):
        where = f"models[{i}]"
        if not isinstance(entry, dict):
            raise MergeError(f"{where}: expected a mapping with 'model' (and optional 'parameters')")
        for key in entry:
            if key not in ("model", "parameters"):
                raise MergeError(f"{where}.{key}: unknown key (a model entry has 'model' and 'parameters')")
        if "model" not in entry:
            raise MergeError(f"{where}.model: missing")
        name = _model_ref(f"{where}.model", entry["model"])
        if any(name == n for n, _ in entries):
            raise MergeError(f"{where}.model: {name} is listed twice")
        settings = _check_settings(
            f"{where}.parameters", entry.get("parameters"), method, per_model_only=True
        )
        if name == base and method != "linear" and settings:
            raise MergeError(
                f"{where}.parameters: the base model's parameters have no effect in mergekit's {method}; remove them"
            )
        entries.append((name, settings))
    # the models merged, in mergekit's input order
    if method == "linear":
        if base is not None and all(n != base for n, _ in entries):
            entries.append((base, {}))  # mergekit adds the base model as one more input
        merged = entries
        is_base = [n == base for n, _ in merged]
        base_name = base if base is not None else merged[0][0]
    elif method == "slerp":
        others = [(n, s) for n, s in entries if n != base]
        if len(others) != 1:
            raise MergeError(
                f"models: slerp interpolates the base model and exactly one other model, got {len(others)} others"
            )
        merged = [(base, {}), others[0]]
        is_base = [True, False]
        base_name = base
    else:
        merged = [(n, s) for n, s in entries if n != base]
        is_base = [False] * len(merged)
        base_name = base
    if len(merged) < 2:
        raise MergeError(
            "models: at least two models are merged here (mergekit also merges one model with its base; give it a "
            "second model with weight 0 for the same result)"
        )
    dtype, out_dtype = config.get("dtype"), config.get("out_dtype")
    for key, value in (("dtype", dtype), ("out_dtype", out_dtype)):
        if value is not None:
            if not isinstance(value, str) or value.removeprefix("torch.") not in DTYPES:
                raise MergeError(f"{key}: expected one of {', '.join(DTYPES)}, got {value!r}")
    chosen = out_dtype or dtype
    chosen = chosen.removeprefix("torch.") if chosen else None
    tok = config.get("tokenizer_source")
    if tok is not None:
        if tok == "union":
            raise MergeError(
                "tokenizer_source: union (a merged vocabulary) is not supported; use base or a model"
            )
        tok = base_name if tok == "base" else _model_ref("tokenizer_source", tok)
    # every model must exist before anything is read
    base_folder = _resolve("base_model" if base is not None else "models[0].model", base_name, name_resolver)
    folders = []
    position = {e["model"]: k for k, e in enumerate(models_cfg)}
    for name, _ in merged:
        where = f"models[{position[name]}].model" if name in position else "base_model"
        folders.append(_resolve(where, name, name_resolver))
    if tok is not None:
        _resolve("tokenizer_source", tok, name_resolver)
    if method in ("dare_ties", "dare_linear") and is_varying(global_settings.get("rescale", False)):
        raise MergeError(f"parameters.rescale: one value for the whole merge here ({method}'s DARE rescale)")
    settings_all = [global_settings, *(s for _, s in merged)]
    varying = any(is_varying(v) for s in settings_all for v in s.values())
    recipe = Recipe(
        source=path, config=config, merge_method=method, method=OUR_METHOD[method], base=base_name,
        base_folder=base_folder, models=[n for n, _ in merged], folders=folders, global_settings=global_settings,
        model_settings=[s for _, s in merged], has_base_input=is_base, dtype=chosen, tokenizer_source=tok,
        num_layers=_num_layers(base_folder), varying=varying,
    )  # fmt: skip
    recipe.ours(None)  # required parameters and their combinations, checked now
    if (
        varying
        and recipe.num_layers is None
        and any(
            isinstance(v, list) and v and all(_is_scalar(e) for e in v)
            for s in settings_all
            for v in s.values()
        )
    ):
        layer_position("layers.0.", None)  # raises: a gradient needs the number of layers
    if method in ("dare_ties", "dare_linear", "della", "della_linear"):
        recipe.notes.append(
            "random masks: ours are seeded per tensor (--seed); mergekit draws from its global RNG "
            "(--random-seed), so the masks differ while their distribution is the same"
        )
    return recipe


def run_recipe(
    recipe: Recipe,
    output_path: str,
    options: OutputOptions,
    seed: int = 0,
) -> dict[str, Any]:
    """Merge with our streaming engine as the recipe says; the recipe is written beside the manifest."""
    params, _ = recipe.ours(None)
    dare = recipe.dare(seed)
    text = dump_config(recipe_config(recipe), comments=header(seed, recipe.notes))
    record = {
        "mergekit": {
            "config": CONFIG_FILE, "source": str(recipe.source), "merge_method": recipe.merge_method,
            "notes": recipe.notes,
        }
    }  # fmt: skip
    return merge_checkpoints(
        recipe.base, recipe.models, output_path, recipe.method, params, dare, options, seed=seed,
        per_tensor=recipe.per_tensor(), extra_files={CONFIG_FILE: text}, manifest_extra=record,
    )  # fmt: skip


def output_options(
    recipe: Recipe, dtype: str | None = None, tokenizer_source: str | None = None, **kwargs: Any
) -> OutputOptions:
    """The recipe's dtype (else ``dtype``) and tokenizer source (else ``tokenizer_source``, else mergekit's default:
    the base model's), with the other output options in ``kwargs``."""
    return OutputOptions(
        dtype=recipe.dtype or dtype,
        tokenizer_source=recipe.tokenizer_source or tokenizer_source or recipe.base,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------------------------
# writing YAML
# ---------------------------------------------------------------------------------------------------------------


def _path_for_yaml(name: str, name_resolver: NameResolver | None = None) -> str:
    """A local model as an absolute path (the file is read from the output folder), anything else as a hub id."""
    if os.path.isdir(name):
        return os.path.abspath(name)
    return name_resolver(name) if name_resolver is not None else name


def recipe_config(recipe: Recipe) -> dict[str, Any]:
    """The recipe's configuration as read, with local model paths made absolute."""
    config = dict(recipe.config)
    if "base_model" in config:
        config["base_model"] = _path_for_yaml(config["base_model"])
    config["models"] = [
        {**entry, "model": _path_for_yaml(entry["model"])} for entry in config["models"]
    ]  # fmt: skip
    tok = config.get("tokenizer_source")
    if isinstance(tok, str) and tok not in ("base", "union"):
        config["tokenizer_source"] = _path_for_yaml(tok)
    return config


def header(seed: int, notes: Sequence[str]) -> list[str]:
    lines = [
        f"mergekit configuration of this merge (mergekit {MERGEKIT_VERSION} semantics), written by the DARE toolkit.",
        "Reproduce it with: mergekit-yaml mergekit_config.yml OUT_DIR",
        "or: python merge_llms_instruct_math_code.py --config mergekit_config.yml --merged_model_path OUT_DIR "
        f"--seed {seed} --skip_evaluation",
    ]
    return lines + list(notes)


def dump_config(config: Mapping[str, Any], comments: Sequence[str] = ()) -> str:
    """YAML text of a configuration (key order kept; lists of numbers in flow style, as mergekit writes them)."""
    yaml = _yaml()

    class Dumper(yaml.SafeDumper):
        pass

    def represent_list(dumper, data):
        flow = all(isinstance(e, int | float) and not isinstance(e, bool) for e in data)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    Dumper.add_representer(list, represent_list)
    text = yaml.dump(
        dict(config), Dumper=Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True
    )
    return "".join(f"# {line}\n" for line in comments) + text


def _density_for_rate(rate: float) -> float:
    """A density d with 1 − d == rate exactly in floating point when there is one near 1 − rate (so that reading the
    YAML back gives the same drop rate), else 1 − rate."""
    d = 1.0 - rate
    candidates = [d]
    for direction in (math.inf, -math.inf):
        x = d
        for _ in range(4):
            x = math.nextafter(x, direction)
            candidates.append(x)
    for c in candidates:
        if 0.0 <= c <= 1.0 and 1.0 - c == rate:
            return c
    return d


@dataclass
class Equivalent:
    """The mergekit configuration equivalent to a merge, or why there is none."""

    config: dict[str, Any] | None
    reason: str | None = None
    notes: list[str] = field(default_factory=list)

    def manifest_entry(self) -> dict[str, Any]:
        if self.config is None:
            return {"config": None, "reason": self.reason}
        return {"config": CONFIG_FILE, "merge_method": self.config["merge_method"], "notes": self.notes}


def equivalent_config(
    method: str,
    params: Mapping[str, Any],
    pretrained: str,
    finetuned: Sequence[str],
    dare: DareSettings | None = None,
    dtype: str | None = None,
    name_resolver: NameResolver | None = None,
) -> Equivalent:
    """The mergekit configuration that means the same merge as ``method`` with the validated ``params`` (and the
    DARE pre-step), or the reason there is none. Random masks (DARE, DELLA) are equivalent in distribution only."""
    M = len(finetuned)
    weights = params.get("model_weights") or [1.0] * M
    base = _path_for_yaml(pretrained, name_resolver)
    models = [_path_for_yaml(f, name_resolver) for f in finetuned]
    notes: list[str] = []
    global_params: dict[str, Any] = {}
    per_model: list[dict[str, Any]] = [{} for _ in range(M)]

    def none(why: str) -> Equivalent:
        return Equivalent(None, why)

    def config(merge_method: str, with_base: bool = True) -> Equivalent:
        out: dict[str, Any] = {"merge_method": merge_method}
        if with_base:
            out["base_model"] = base
        out["models"] = [
            {"model": m, **({"parameters": p} if p else {})} for m, p in zip(models, per_model)
        ]  # fmt: skip
        if global_params:
            out["parameters"] = global_params
        if dtype not in (None, "auto"):
            out["dtype"] = dtype
        return Equivalent(out, None, notes)

    random_note = (
        "random masks: ours are seeded per tensor (--seed); mergekit draws from its global RNG (--random-seed), so "
        "the masks differ while their distribution is the same"
    )
    lam = params.get("scaling_coefficient", 1.0)
    if dare is not None:
        if dare.mask_strategy != "random":
            return none("magnitude DARE (mask_strategy magnitude) has no mergekit equivalent")
        if dare.weight_format != "delta_weight":
            return none(
                "DARE on the weights themselves (weight_format finetuned_weight) has no mergekit equivalent"
            )
        if dare.use_weight_rescale and dare.rescale_rule != "l1":
            return none(
                "DARE rescales survivors by 1/(1 − p) here; mergekit's dare_* rescale a tensor by its L1 norm ratio "
                "(rescale_rule l1) or not at all (rescale: false)"
            )
        rates = dare.weight_mask_rates
        rates = list(rates) if isinstance(rates, list | tuple) else [rates] * M
        rates = rates * M if len(rates) == 1 else rates
        for i in range(M):
            per_model[i] = {"weight": weights[i], "density": _density_for_rate(float(rates[i]))}
        global_params["rescale"] = bool(dare.use_weight_rescale)
        if lam != 1.0:
            global_params["lambda"] = lam
        notes.append(random_note)
        if method == "task_arithmetic":
            global_params["normalize"] = bool(params.get("normalize"))
            return config("dare_linear")
        if method == "ties_merging":
            if params.get("trim_scope") != "tensor":
                return none(
                    "DARE followed by the global TIES trim has no mergekit equivalent (dare_ties: per tensor)"
                )
            if params.get("zero_sign") != "plus":
                return none(
                    "TIES elects the majority sign where the sign sum is 0; mergekit's dare_ties elects +1"
                )
            trims = params.get("densities") or [1.0 - params["param_value_mask_rate"]] * M
            if any(d < 1.0 for d in trims) or params.get("sparsify_rescale", "none") != "none":
                return none(
                    "DARE followed by a TIES trim has no mergekit equivalent (dare_ties does not trim)"
                )
            global_params["normalize"] = not params.get("no_normalize")
            return config("dare_ties")
        return none(f"DARE followed by {method} has no mergekit equivalent (only dare_linear and dare_ties)")
    if method == "average_merging":
        for i in range(M):
            per_model[i] = {"weight": weights[i]}
        if params.get("no_normalize"):
            global_params["normalize"] = False
        return config("linear", with_base=False)
    if method == "task_arithmetic":
        for i in range(M):
            per_model[i] = {"weight": weights[i]}
        global_params.update(
            normalize=bool(params.get("normalize")), **({"lambda": lam} if lam != 1.0 else {})
        )
        return config("task_arithmetic")
    if method == "ties_merging":
        if params.get("trim_scope") != "tensor":
            return none(
                "the paper's TIES trims by one threshold over the whole model (trim_scope global); mergekit trims per tensor"
            )
        if params.get("zero_sign") != "plus":
            return none(
                "TIES here elects the majority sign where the sign sum is 0 (zero_sign majority); mergekit elects +1"
            )
        densities = params.get("densities")
        if params.get("trim_rule") != "exact_k":
            effective = densities or [1.0 - params["param_value_mask_rate"]] * M
            if any(d < 1.0 for d in effective):
                return none(
                    "TIES here keeps every |τ| at or above the k-th smallest (trim_rule threshold), one entry more than "
                    "mergekit's exactly k (trim_rule exact_k)"
                )
            densities = [1.0] * M
        densities = densities or [1.0 - params["param_value_mask_rate"]] * M
        for i in range(M):
            per_model[i] = {"weight": weights[i], "density": densities[i]}
        global_params.update(
            normalize=not params.get("no_normalize"), **({"lambda": lam} if lam != 1.0 else {})
        )
        if params.get("sparsify_rescale", "none") == "l1":
            global_params["rescale"] = True
        return config("ties")
    if method == "breadcrumbs_merging":
        elect = bool(params.get("breadcrumbs_elect_sign"))
        if params.get("breadcrumbs_rule") != "keep_count":
            return none(
                "Breadcrumbs here drops int(r·n) smallest and int(β·n) largest |τ| (breadcrumbs_rule drop_counts); "
                "mergekit keeps int(d·n) entries (breadcrumbs_rule keep_count)"
            )
        if elect and params.get("zero_sign") != "plus":
            return none(
                "the sign election here picks the majority sign at a zero sum; mergekit's breadcrumbs_ties +1"
            )
        beta = params["outlier_mask_rate"]
        densities = params.get("densities") or [(1.0 - params["param_value_mask_rate"]) - beta] * M
        for i in range(M):
            per_model[i] = {"weight": weights[i], "density": densities[i], "gamma": beta}
        global_params.update(
            normalize=bool(params.get("normalize")), **({"lambda": lam} if lam != 1.0 else {})
        )
        if params.get("sparsify_rescale", "none") == "l1":
            global_params["rescale"] = True
        return config("breadcrumbs_ties" if elect else "breadcrumbs")
    if method == "della_merging":
        linear = bool(params.get("della_linear"))
        if params.get("della_rescale") not in ("l1", "none"):
            return none(
                "DELLA here divides each kept entry by its keep probability (della_rescale probability); mergekit "
                "rescales a tensor by its L1 norm ratio (l1) or not at all"
            )
        if not linear and params.get("zero_sign") != "plus":
            return none("DELLA here elects the majority sign at a zero sign sum; mergekit's della elects +1")
        eps = params["della_epsilon"]
        densities = params.get("densities") or [1.0 - p for p in params["weight_mask_rate"]]
        for d in densities:
            if 0.0 < d < 1.0 and not (d - eps > 0.0 and d + eps < 1.0):
                return none(f"mergekit needs density ± epsilon strictly inside (0, 1), here {d:g} ± {eps:g}")
        for i in range(M):
            per_model[i] = {"weight": weights[i], "density": densities[i], "epsilon": eps}
        global_params.update(
            normalize=not params.get("no_normalize"), rescale=params["della_rescale"] == "l1",
            **({"lambda": lam} if lam != 1.0 else {}),
        )  # fmt: skip
        notes.append(random_note)
        return config("della_linear" if linear else "della")
    if method == "model_stock_merging":
        notes.append(
            "mergekit divides each cosine by max(‖τ_i‖‖τ_j‖, 1e-6); the same bytes unless a pair's norm product is "
            "below 1e-6"
        )
        return config("model_stock")
    if method == "slerp_merging":
        if M != 2:
            return none("SLERP interpolates two models")
        out = config("slerp")
        out.config["base_model"] = models[0]
        out.config["parameters"] = {"t": params["slerp_t"]}
        return out
    if method == "magmax_merging":
        return none("mergekit has no MagMax")
    if method == "consensus_merging":
        return none("mergekit 0.1.5 has no consensus (TALL-mask) merging")
    return none(f"{method} has no mergekit equivalent")


def equivalent_files(equivalent: Equivalent, seed: int) -> tuple[dict[str, str], dict[str, Any]]:
    """(``extra_files``, ``manifest_extra``) of :func:`~model_merging_methods.streaming.merge_checkpoints` for a
    merge whose mergekit equivalent is ``equivalent``."""
    entry = {"mergekit": equivalent.manifest_entry()}
    if equivalent.config is None:
        return {}, entry
    return {CONFIG_FILE: dump_config(equivalent.config, comments=header(seed, equivalent.notes))}, entry
