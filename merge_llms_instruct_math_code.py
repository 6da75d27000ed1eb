"""Merge homologous LLMs out of core (one tensor at a time, disk to disk), keep the merged model, then evaluate it.

The original's flags keep working (``--merge_instruct --merge_math --merge_code`` with the paper's 13B models,
``--merging_method_name``, ``--scaling_coefficient``, ``--weight_mask_rate``, ``--use_weight_rescale``,
``--mask_strategy``, ``--weight_format``, ``--mask_apply_method``, ``--tensor_parallel_size``); any homologous family
can be merged with ``--pretrained_model_name`` and ``--finetuned_model_names`` (local folders or hub ids).

Examples::

    python merge_llms_instruct_math_code.py --merge_instruct --merge_math --merging_method_name mask_merging \\
        --mask_apply_method task_arithmetic --scaling_coefficient 1.0 --weight_mask_rate 0.2 --use_weight_rescale
    python merge_llms_instruct_math_code.py --pretrained_model_name ./base --finetuned_model_names ./a ./b \\
        --merging_method_name ties_merging --param_value_mask_rate 0.8 --skip_evaluation
    python merge_llms_instruct_math_code.py --config recipe.yml --merged_model_path ./merged --skip_evaluation

``--config`` runs a mergekit YAML recipe with its mergekit meaning (``docs/mergekit.md``); only the output and
evaluation flags and ``--seed`` may be added. Every merge writes the equivalent mergekit YAML beside its manifest
(``mergekit_config.yml``) where one exists; otherwise the manifest's ``mergekit`` entry says why.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from utils.cli import UserError, run_main, setup_logging
from utils.method_cli import add_dare_arguments, add_method_arguments, method_settings
from utils.run_names import llm_merge_name
from utils.run_settings import dare_settings, run_settings

TASKS = ("instruct", "math", "code")
# fallback when utils.llm_evaluation is not importable (same mapping as its TASK_DATASETS)
_TASK_DATASETS = {"instruct": ["alpaca_eval"], "math": ["gsm8k", "MATH"], "code": ["human_eval", "mbpp"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Merge LLMs (any streamable method of the registry, optionally after DARE) out of core and "
        "evaluate the result.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    models = p.add_argument_group("models")
    models.add_argument("--merge_instruct", action="store_true", help="merge WizardLM-13B-V1.2 (instruct)")
    models.add_argument("--merge_math", action="store_true", help="merge WizardMath-13B-V1.0 (math)")
    models.add_argument("--merge_code", action="store_true", help="merge llama-2-13b-code-alpaca (code)")
    models.add_argument(
        "--pretrained_model_name", default=None, metavar="NAME_OR_PATH",
        help="pre-trained backbone (default: the registry backbone of the fine-tuned models, or the "
             "base_model_name_or_path of LoRA adapters)",
    )  # fmt: skip
    models.add_argument(
        "--finetuned_model_names", nargs="+", default=None, metavar="NAME_OR_PATH",
        help="models to merge (registry names, hub ids, local folders or PEFT LoRA adapter folders); replaces "
             "--merge_*",
    )  # fmt: skip

    recipe = p.add_argument_group("mergekit configuration")
    recipe.add_argument(
        "--config", default=None, metavar="RECIPE_YML",
        help="run a mergekit YAML recipe (merge_method, base_model, models, parameters, dtype, tokenizer_source) "
        "instead of the model and method flags; see docs/mergekit.md",
    )  # fmt: skip

    method = p.add_argument_group("merging method (every streamable method of the registry)")
    add_method_arguments(method, streamable_only=True)
    add_dare_arguments(
        method, rate="per_model", seed_also="the random draws of DELLA and other random methods"
    )

    out = p.add_argument_group("output")
    out.add_argument(
        "--merged_model_path", default=None, metavar="PATH",
        help="where the merged model is written (default: ./save_merge_models/<models>/<every setting>)",
    )  # fmt: skip
    out.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    out.add_argument("--max_shard_size", default="5GB", help="largest output shard (e.g. 5GB, 500MB)")
    out.add_argument(
        "--vocab_policy", default="auto", choices=["auto", "pad_mean", "truncate", "error", "union"],
        help="vocabulary alignment; auto = pad_mean for LLaMA-family models, error otherwise; union = the union of "
             "the tokenizers by token string (docs/adapters.md)",
    )  # fmt: skip
    out.add_argument(
        "--pad_to_multiple_of", type=int, default=None, help="with --vocab_policy union: round the rows up"
    )
    out.add_argument(
        "--output_format", default="model", choices=["model", "lora"],
        help="model: a full model folder; lora: the merged delta as a PEFT LoRA adapter of the base (--lora_rank)",
    )  # fmt: skip
    out.add_argument(
        "--lora_rank", type=int, default=None, help="rank of the LoRA output (--output_format lora)"
    )
    out.add_argument(
        "--lora_svd", default="auto", choices=["auto", "full", "randomized"],
        help="truncated SVD of the LoRA output: exact, seeded randomized, or auto",
    )  # fmt: skip
    out.add_argument(
        "--pad_token", default=None, help="pad token added to a padded tokenizer (default: [PAD])"
    )
    out.add_argument(
        "--tokenizer_source", default=None, metavar="NAME_OR_PATH",
        help="model whose config/tokenizer files are copied (default: the first fine-tuned model)",
    )  # fmt: skip
    out.add_argument(
        "--overwrite", action="store_true",
        help="replace an existing --merged_model_path, only if this toolkit wrote it (never a folder of yours)",
    )  # fmt: skip
    out.add_argument(
        "--num_threads", type=int, default=None,
        help="worker threads, one tensor each (default: the usable CPUs, at most 8); the bytes do not depend on it",
    )  # fmt: skip
    out.add_argument(
        "--device", default="cpu",
        help="where the merge arithmetic runs: cpu or cuda (cuda:N); the inputs are still streamed from disk and "
        "the bytes are those of the CPU (see docs/performance.md for the methods this holds for)",
    )  # fmt: skip

    # ---------------------------------------- evaluation flags (one block) ----------------------------------------
    ev = p.add_argument_group("evaluation (utils.llm_evaluation)")
    ev.add_argument(
        "--evaluate_tasks", nargs="+", choices=list(TASKS), default=None,
        help="tasks to evaluate (instruct: AlpacaEval; math: GSM8K + MATH; code: HumanEval + MBPP; default: the "
             "merged tasks with --merge_*, none with --finetuned_model_names)",
    )  # fmt: skip
    ev.add_argument(
        "--evaluate_only", action="store_true",
        help="do not merge: evaluate the merged model already at --merged_model_path (or the default path)",
    )  # fmt: skip
    ev.add_argument(
        "--evaluation_output_dir", default="save_merge_llm_results",
        help="root of the generation/results folders ({root}/{dataset}/{models}/{save name}/)",
    )  # fmt: skip
    ev.add_argument(
        "--skip_evaluation", action="store_true", help="only merge; do not evaluate the merged model"
    )
    try:
        from utils.llm_evaluation import add_evaluation_args
    except ImportError:  # evaluation not installed: keep the original's flags
        ev.add_argument("--tensor_parallel_size", type=int, default=1)
        ev.add_argument("--start_index", type=int, default=0)
        ev.add_argument("--end_index", type=int, default=sys.maxsize)
    else:  # --skip_scoring, --inference_backend, --tensor_parallel_size, --start/end_index, --resume, ...
        add_evaluation_args(p)
    # ---------------------------------------------------------------------------------------------------------------
    return p


def _safe(name: str) -> str:
    return re.sub(r"[^\w.\-]+", "-", Path(name.rstrip("/")).name or name).strip("-") or "model"


def save_model_name(args: argparse.Namespace, rates: list[float]) -> str:
    """The merged model's folder name (:func:`utils.run_names.llm_merge_name`): the original's name plus every
    setting it left out (strategy, weight format, seed, dtype, vocabulary policy, overridden backbone), so variants
    never overwrite each other."""
    dare = args.merging_method_name == "mask_merging"
    method = args.mask_apply_method if dare else args.merging_method_name
    return llm_merge_name(
        args.merging_method_name, method_settings(args, method), mask_apply_method=args.mask_apply_method if dare else None,
        weight_mask_rates=rates, use_weight_rescale=args.use_weight_rescale, mask_strategy=args.mask_strategy,
        weight_format=args.weight_format, seed=args.seed, dtype=args.dtype, vocab_policy=args.vocab_policy,
        pad_to_multiple_of=getattr(args, "pad_to_multiple_of", None),
        lora=getattr(args, "output_format", "model") == "lora", lora_rank=args.lora_rank,
        base=None if args.pretrained_model_name is None else _safe(args.pretrained_model_name),
    )  # fmt: skip


def select_models(args: argparse.Namespace) -> tuple[list[str], list[str], str, str]:
    """(tasks, fine-tuned names, pretrained name, folder group) from the flags and the registry (§6.1)."""
    from utils.llm_registry import MERGE_TASK_MODELS, backbone_of

    flagged = [t for t in TASKS if getattr(args, f"merge_{t}")]
    if args.finetuned_model_names is not None:
        if flagged:
            raise UserError(
                "give either --merge_instruct/--merge_math/--merge_code or --finetuned_model_names"
            )
        names = list(args.finetuned_model_names)
        tasks: list[str] = []
        group = "_".join(_safe(n) for n in names)
    else:
        if len(flagged) < 2:
            raise UserError("select at least two of --merge_instruct, --merge_math, --merge_code")
        tasks = flagged
        names = [MERGE_TASK_MODELS[t] for t in tasks]
        group = "_".join(tasks)
    if len(names) < 2:
        raise UserError(f"merging needs at least two fine-tuned models, got {len(names)}")
    pretrained = args.pretrained_model_name
    if pretrained is None:
        pretrained = _adapter_base(names)
    if pretrained is None:
        backbones = {backbone_of(n) for n in names}
        if None in backbones:
            unknown = [n for n in names if backbone_of(n) is None]
            raise UserError(f"--pretrained_model_name is required: {unknown[0]} is not in the model registry")
        if len(backbones) != 1:
            raise UserError(
                f"the models have different backbones ({', '.join(sorted(backbones))}); they cannot be merged"
            )
        pretrained = backbones.pop()
    return tasks, names, pretrained, group


def _adapter_base(names: list[str]) -> str | None:
    """The base model the LoRA adapters among ``names`` name (None when there is no adapter)."""
    from model_merging_methods.checkpoint_io import find_local_model
    from model_merging_methods.lora import is_lora_folder, resolve_base_model
    from utils.llm_registry import hub_id

    folders = [find_local_model(n, hub_id) for n in names]
    if not any(f is not None and is_lora_folder(f) for f in folders):
        return None
    return resolve_base_model(None, [str(f) for f in folders if f is not None and is_lora_folder(f)], hub_id)


def _evaluate(
    args: argparse.Namespace,
    merged_path: Path,
    tasks: list[str],
    save_name: str,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Evaluate the merged model on the datasets of ``tasks`` with ``utils.llm_evaluation.evaluate_model``."""
    if not tasks:
        print("no tasks to evaluate (pass --evaluate_tasks)", file=sys.stderr)
        return None
    try:
        from utils.llm_evaluation import evaluate_model
    except ImportError:
        print("evaluation is not available yet (utils.llm_evaluation is missing); the merged model is kept at "
              f"{merged_path}", file=sys.stderr)  # fmt: skip
        return None
    datasets = _evaluation_datasets(tasks)
    output_root = getattr(args, "evaluation_output_dir", None) or "save_merge_llm_results"
    return evaluate_model(
        str(merged_path),
        datasets,
        save_name,
        output_root,
        args,
        generator_name=str(merged_path),
        settings=settings,
    )


def _merged_settings(merged_path: Path) -> dict[str, Any] | None:
    """The settings a merged model was made with (its manifest's ``settings``), for --evaluate_only."""
    try:
        settings = json.loads((merged_path / "merge_manifest.json").read_text(encoding="utf-8")).get(
            "settings"
        )
    except (OSError, ValueError, AttributeError):
        return None
    return settings if isinstance(settings, dict) else None


def _evaluation_datasets(tasks: list[str]) -> list[str]:
    try:
        from utils.llm_evaluation import TASK_DATASETS
    except ImportError:
        TASK_DATASETS = _TASK_DATASETS
    return [d for t in tasks for d in TASK_DATASETS.get(t, _TASK_DATASETS[t])]


def guard_paths(
    args: argparse.Namespace,
    pretrained: str,
    names: list[str],
    merged_path: Path,
    eval_tasks: list[str],
    eval_save_name: str,
    evaluate: bool,
) -> None:
    """Refuse, before anything is read or written, outputs (the merged model, the evaluation folders) that equal,
    contain or lie inside an input (the models after resolving registry names and hub ids to their local folders,
    the data files), and evaluation folders that overlap the merged model."""
    from model_merging_methods.paths import guard_outputs
    from utils.cli import llm_data_inputs, local_model_inputs
    from utils.llm_registry import hub_id

    models = {"--pretrained_model_name": pretrained, "--tokenizer_source": args.tokenizer_source}
    models.update({f"--finetuned_model_names {n}": n for n in names})
    inputs: dict[str, Path | str] = dict(local_model_inputs(models, hub_id))
    eval_dirs: dict[str, Path] = {}
    if evaluate:
        datasets = _evaluation_datasets(eval_tasks)
        inputs.update(llm_data_inputs(args, datasets))
        root = Path(getattr(args, "evaluation_output_dir", None) or "save_merge_llm_results")
        eval_dirs = {f"--evaluation_output_dir ({d})": root / d / eval_save_name for d in datasets}
    if getattr(args, "evaluate_only", False):
        guard_outputs(eval_dirs, {**inputs, "--merged_model_path": merged_path})
        return
    guard_outputs({"--merged_model_path": merged_path, **eval_dirs}, inputs)
    guard_outputs(eval_dirs, {"--merged_model_path": merged_path})


# flags that may come with --config: those of these groups, and the seed of random masks (mergekit: --random-seed)
CONFIG_GROUPS = ("output", "evaluation", "generation", "mergekit configuration")
CONFIG_FLAGS = ("seed",)


def check_device(device: str) -> None:
    """--device names a usable device (cuda without CUDA is one error line, before anything is read)."""
    from model_merging_methods.devices import resolve_device

    try:
        resolve_device(device)
    except ValueError as exc:
        raise UserError(f"--device: {exc}") from exc


def given_flags(argv: list[str]) -> set[str]:
    """The destinations of the flags given on the command line (whatever their values)."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def check_config_flags(argv: list[str]) -> set[str]:
    """Refuse model and method flags next to --config (the recipe sets those); return the flags given."""
    parser = build_parser()
    allowed = set(CONFIG_FLAGS)
    for group in parser._action_groups:
        if (group.title or "").startswith(CONFIG_GROUPS):
            allowed.update(a.dest for a in group._group_actions)
    given = given_flags(argv)
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    for dest in sorted(given - allowed):
        raise UserError(
            f"{flags.get(dest, dest)} cannot be combined with --config: the configuration sets the models and the "
            "method (only output and evaluation flags and --seed may be added)"
        )
    return given


def main_config(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """--config: run a mergekit recipe with the streaming engine (``utils.mergekit_config``), then evaluate."""
    from model_merging_methods.checkpoint_io import parse_size
    from utils.cli import check_evaluation_args
    from utils.llm_registry import hub_id, pad_token_for
    from utils.mergekit_config import load_recipe, output_options, run_recipe

    given = check_config_flags(argv)
    recipe = load_recipe(args.config, name_resolver=hub_id)
    for dest, key in (("dtype", recipe.dtype), ("tokenizer_source", recipe.tokenizer_source)):
        if key is not None and dest in given:
            raise UserError(f"--{dest}: the configuration sets {dest} already ({key})")
    parse_size(args.max_shard_size)
    if args.num_threads is not None and args.num_threads < 1:
        raise UserError(f"--num_threads must be >= 1, got {args.num_threads}")
    check_device(args.device)
    evaluate = bool(getattr(args, "evaluate_only", False)) or not args.skip_evaluation
    if evaluate:
        check_evaluation_args(args)
    group, save_name = "mergekit", _safe(Path(args.config).stem)
    merged_path = Path(args.merged_model_path or Path("save_merge_models") / group / save_name)
    eval_tasks = list(args.evaluate_tasks or [])
    args.tokenizer_source = recipe.tokenizer_source or args.tokenizer_source
    guard_paths(args, recipe.base, recipe.models, merged_path, eval_tasks, f"{group}/{save_name}", evaluate)
    if evaluate and eval_tasks:
        try:
            from utils.llm_evaluation import check_data
        except ImportError:
            check_data = None
        if check_data is not None:
            check_data(_evaluation_datasets(eval_tasks), args)
    if getattr(args, "evaluate_only", False):
        if not (merged_path / "config.json").is_file():
            raise UserError(f"--evaluate_only: no merged model at {merged_path}")
        return {
            "evaluation": _evaluate(
                args, merged_path, eval_tasks, f"{group}/{save_name}", _merged_settings(merged_path)
            )
        }
    # mergekit refuses models whose vocabularies differ unless a tokenizer source is named
    vocab_policy = args.vocab_policy if "vocab_policy" in given or recipe.tokenizer_source else "error"
    options = output_options(
        recipe, dtype=args.dtype, tokenizer_source=args.tokenizer_source, max_shard_size=args.max_shard_size,
        vocab_policy=vocab_policy, pad_token=args.pad_token or pad_token_for(recipe.models),
        overwrite=args.overwrite, num_threads=args.num_threads, name_resolver=hub_id, device=args.device,
    )  # fmt: skip
    manifest = run_recipe(recipe, str(merged_path), options, seed=args.seed)
    run = run_settings(
        args, script="merge_llms_instruct_math_code.py", kind="merge", model=group,
        merge={"method": recipe.method, "mergekit_method": recipe.merge_method, "config": recipe.config,
               "models": recipe.models, "pretrained": recipe.base},
    )  # fmt: skip
    for line in manifest.get("housekeeping", []):
        print(line, file=sys.stderr)
    for warning in manifest.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"merged model: {merged_path}")
    if not args.skip_evaluation:
        manifest["evaluation"] = _evaluate(args, merged_path, eval_tasks, f"{group}/{save_name}", run)
    return manifest


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.config is not None:
        return main_config(args, argv)
    from model_merging_methods.checkpoint_io import parse_size
    from model_merging_methods.registry import get_method
    from model_merging_methods.streaming import stream_merge
    from utils.cli import check_evaluation_args, check_rate
    from utils.llm_registry import hub_id, pad_token_for

    tasks, names, pretrained, group = select_models(args)
    rates = list(args.weight_mask_rate)
    if len(rates) == 1:
        rates = rates * len(names)
    if len(rates) != len(names):
        raise UserError(f"--weight_mask_rate: got {len(rates)} rates for {len(names)} models")
    # every flag is checked before any path is touched
    for r in rates:
        check_rate("--weight_mask_rate", r)
    method_name = (
        args.mask_apply_method if args.merging_method_name == "mask_merging" else args.merging_method_name
    )
    settings = get_method(method_name).validate(method_settings(args, method_name), len(names))
    parse_size(args.max_shard_size)
    from model_merging_methods.lora import check_output_format

    if check_output_format(args.output_format, args.lora_rank) and not args.skip_evaluation:
        raise UserError(
            "--output_format lora writes an adapter, which is not evaluated here: pass --skip_evaluation, then "
            "evaluate it with inference_llms_instruct_math_code.py --finetuned_model_name <adapter>"
        )
    if args.num_threads is not None and args.num_threads < 1:
        raise UserError(f"--num_threads must be >= 1, got {args.num_threads}")
    check_device(args.device)
    evaluate = bool(getattr(args, "evaluate_only", False)) or not args.skip_evaluation
    if evaluate:
        check_evaluation_args(args)
    save_name = save_model_name(args, rates)
    merged_path = Path(args.merged_model_path or Path("save_merge_models") / group / save_name)
    eval_tasks = args.evaluate_tasks if args.evaluate_tasks is not None else tasks
    guard_paths(args, pretrained, names, merged_path, eval_tasks, f"{group}/{save_name}", evaluate)
    if evaluate and eval_tasks:
        try:
            from utils.llm_evaluation import check_data
        except ImportError:
            check_data = None
        if check_data is not None:  # missing data fails now, not after an hours-long merge
            check_data(_evaluation_datasets(eval_tasks), args)
    if getattr(args, "evaluate_only", False):  # the original's direct_inference_merged_llms_* script
        if not (merged_path / "config.json").is_file():
            raise UserError(f"--evaluate_only: no merged model at {merged_path}")
        return {
            "evaluation": _evaluate(
                args, merged_path, eval_tasks, f"{group}/{save_name}", _merged_settings(merged_path)
            )
        }
    from model_merging_methods.streaming import DareSettings
    from utils.mergekit_config import equivalent_config, equivalent_files

    dare = None
    if args.merging_method_name == "mask_merging":
        dare = DareSettings(rates, args.use_weight_rescale, args.mask_strategy, args.weight_format, args.seed)
    equivalent = equivalent_config(
        method_name, settings, pretrained, names, dare=dare, dtype=args.dtype, name_resolver=hub_id
    )
    extra_files, manifest_extra = equivalent_files(equivalent, args.seed)
    run = run_settings(
        args, script="merge_llms_instruct_math_code.py", kind="merge", model=group,
        merge={"method": method_name, "params": settings, "models": names, "pretrained": pretrained},
        dare=dare_settings(rates, args.use_weight_rescale, args.mask_strategy, args.weight_format, args.seed)
        if dare is not None else None,
    )  # fmt: skip
    manifest_extra = {**(manifest_extra or {}), "settings": run}
    manifest = stream_merge(
        pretrained, names, str(merged_path), extra_files=extra_files, manifest_extra=manifest_extra,
        merging_method_name=args.merging_method_name, **settings,
        mask_apply_method=args.mask_apply_method if args.merging_method_name == "mask_merging" else None,
        weight_mask_rates=rates, use_weight_rescale=args.use_weight_rescale, mask_strategy=args.mask_strategy,
        weight_format=args.weight_format, seed=args.seed, dtype=args.dtype, max_shard_size=args.max_shard_size,
        vocab_policy=args.vocab_policy, pad_token=args.pad_token or pad_token_for(names),
        tokenizer_source=args.tokenizer_source, overwrite=args.overwrite, num_threads=args.num_threads,
        name_resolver=hub_id, output_format=args.output_format, lora_rank=args.lora_rank, lora_svd=args.lora_svd,
        pad_to_multiple_of=args.pad_to_multiple_of, device=args.device,
    )  # fmt: skip
    for line in manifest.get("housekeeping", []):
        print(line, file=sys.stderr)
    for warning in manifest.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"merged {'LoRA adapter' if args.output_format == 'lora' else 'model'}: {merged_path}")
    if not args.skip_evaluation:
        manifest["evaluation"] = _evaluate(args, merged_path, eval_tasks, f"{group}/{save_name}", run)
    return manifest


if __name__ == "__main__":
    run_main(main)
