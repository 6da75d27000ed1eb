"""Evaluate one decoder LLM on AlpacaEval, GSM8K, MATH, HumanEval or MBPP, optionally after DARE (spec §2.4).

    python inference_llms_instruct_math_code.py --finetuned_model_name WizardMath-7B-V1.0 --dataset_name gsm8k \\
        [--weight_mask_rate 0.9 --use_weight_rescale] [--inference_backend auto|vllm|hf] [--resume]

* ``--weight_mask_rate 0`` (the default here; the original defaulted to 0.1): plain inference of the model.
* rate > 0: the model's delta against its backbone is DARE'd tensor by tensor
  (``model_merging_methods.streaming.stream_mask_model``) into ``--save_model_path`` (default
  ``save_models/{dataset}/{save_name}``), which is then evaluated (and kept unless ``--remove_saved_model``).
* ``WizardLM-7B-V1.0`` is released as a weight delta: it is first recovered as llama-7b + delta
  (``stream_recover_from_delta``) into ``--recovered_model_path``.

Models: registry short names (see ``utils/llm_registry.py``), hub ids or local folders. Outputs go to
``{--output_dir}/{dataset}/{save_name}/`` (generations.jsonl, harness files, results.json, run.log).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from model_merging_methods import rng
from model_merging_methods.devices import resolve_device
from model_merging_methods.paths import (
    MANIFEST,
    canonical,
    guard_outputs,
    is_toolkit_output,
    remove_toolkit_output,
)
from model_merging_methods.publish import os_error_message
from utils.cli import (
    UserError,
    check_evaluation_args,
    check_rate,
    llm_data_inputs,
    local_model_inputs,
    run_main,
    setup_logging,
)
from utils.llm_evaluation import (
    add_evaluation_args,
    all_generations_done,
    check_data,
    evaluate_model,
    summary,
)
from utils.llm_registry import DELTA_RELEASED, FINETUNED_HUB_IDS, backbone_of, hub_id, pad_token_for
from utils.math_code_data import DATASET_NAMES
from utils.method_cli import add_dare_arguments
from utils.run_names import dare_name

logger = logging.getLogger("inference_llms")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Evaluate one LLM (optionally after DARE) on an instruct/math/code set"
    )
    p.add_argument(
        "--finetuned_model_name",
        default="WizardLM-13B-V1.2",
        help="registry short name ("
        + ", ".join(FINETUNED_HUB_IDS)
        + "), hub id, local folder, or a PEFT LoRA "
        "adapter folder (merged into its base, --pretrained_model_name or the adapter's base_model_name_or_path, "
        "into --save_model_path first)",
    )
    p.add_argument(
        "--pretrained_model_name",
        default=None,
        help="backbone for DARE / delta recovery (default: the registry's backbone of the model)",
    )
    p.add_argument("--dataset_name", default="alpaca_eval", choices=DATASET_NAMES)
    add_dare_arguments(p, rate="single")
    p.add_argument(
        "--wizardcoder_use_llama2_as_backbone",
        action="store_true",
        help="ablation: WizardCoder-Python-7B/13B deltas against Llama-2 instead of CodeLlama-Python",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where DARE's arithmetic runs: cpu or cuda (cuda:N); the bytes are the same (the evaluation's device "
        "is chosen by its backend)",
    )
    p.add_argument(
        "--save_model_path",
        default=None,
        help="where the DARE'd model is written (default save_models/{dataset}/{save_name})",
    )
    p.add_argument(
        "--remove_saved_model",
        action="store_true",
        help="delete the DARE'd model folder after evaluation (the original always did); only ever a folder this "
        "toolkit wrote",
    )
    p.add_argument(
        "--recovered_model_path",
        default=None,
        help="WizardLM-7B-V1.0 only: folder of the recovered model (default "
        "save_models/WizardLM-7B-V1.0-recovered); reused when it exists",
    )
    p.add_argument(
        "--output_dir", default="save_llm_eval_results", help="root of the generation/results folders"
    )
    p.add_argument(
        "--skip_evaluation",
        action="store_true",
        help="only produce the model (the DARE'd checkpoint in --save_model_path, or the recovered model); "
        "no generation",
    )
    add_evaluation_args(p)
    return p.parse_args(argv)  # fmt: skip


def display_name(name_or_path: str) -> str:
    """Short model name used in save names: the registry name, else the folder's / hub id's last part."""
    return name_or_path if name_or_path in FINETUNED_HUB_IDS else Path(name_or_path.rstrip("/")).name


def make_save_name(model: str, args: argparse.Namespace) -> str:
    """The original's save name (§2.4 step 1), plus ``_seed_{s}`` for a non-default seed
    (:func:`utils.run_names.dare_name`)."""
    return dare_name(
        model, args.weight_mask_rate, args.use_weight_rescale, args.mask_strategy, args.weight_format, args.seed,
        llama2_backbone=args.wizardcoder_use_llama2_as_backbone,
    )  # fmt: skip


def resolve_model(name_or_path: str) -> str:
    """A model folder for generation: a local folder, or a registry name / hub id through the HF cache (downloaded
    when online)."""
    from model_merging_methods.checkpoint_io import resolve_model_path

    return str(resolve_model_path(name_or_path, hub_id))


def _streaming():
    try:
        from model_merging_methods import streaming
    except ImportError as exc:
        raise UserError(f"DARE and delta recovery need model_merging_methods.streaming ({exc})") from exc
    return streaming


def _is_adapter(name: str) -> bool:
    """Whether ``name`` is (a local or cached folder holding) a PEFT LoRA adapter."""
    from model_merging_methods.checkpoint_io import find_local_model
    from model_merging_methods.lora import is_lora_folder

    folder = find_local_model(name, hub_id)
    return folder is not None and is_lora_folder(folder)


def _complete_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def _same_place(a: str | Path | None, b: str | Path | None) -> bool:
    if a is None or b is None:
        return False
    return canonical(a) == canonical(b)


def check_reusable_dare_model(path: Path, args: argparse.Namespace, finetuned: str, backbone: str) -> None:
    """``--resume`` reuses an existing DARE'd folder only when this toolkit wrote it (its ``merge_manifest.json``)
    with the same settings from the same models; anything else is an error, never a model evaluated under a
    DARE label it does not deserve."""
    if not is_toolkit_output(path):
        raise UserError(
            f"--save_model_path {path} exists but was not written by this toolkit; it is not reused or replaced "
            "(remove it yourself or choose another --save_model_path)"
        )
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(
            f"--save_model_path {path} has no readable {MANIFEST}; remove it to re-create it"
        ) from exc
    params = manifest.get("parameters") if isinstance(manifest, dict) else None
    want = {
        "weight_format": args.weight_format, "weight_mask_rate": float(args.weight_mask_rate),
        "use_weight_rescale": bool(args.use_weight_rescale), "mask_strategy": args.mask_strategy, "seed": args.seed,
    }  # fmt: skip
    if manifest.get("kind") != "dare" or not isinstance(params, dict):
        raise UserError(f"--save_model_path {path} holds a {manifest.get('kind')!r} model, not a DARE'd one")
    diff = [f"{k}={params.get(k)!r} (now {v!r})" for k, v in want.items() if params.get(k) != v]
    if args.mask_strategy == "random" and manifest.get("random_generator") != rng.describe():
        # masks of another generator (before version 1: a Mersenne Twister uniform per element) are other masks
        diff.append(f"random generator {manifest.get('random_generator')!r} (now {rng.describe()!r})")
    inputs = manifest.get("inputs") or []
    sources = [(i or {}).get("name_or_path") for i in inputs[:2]] if isinstance(inputs, list) else []
    folders = [(i or {}).get("folder") for i in inputs[:2]] if isinstance(inputs, list) else []
    for role, given, k in (("pretrained", backbone, 0), ("finetuned", finetuned, 1)):
        if len(sources) <= k or not (sources[k] == given or _same_place(folders[k], given)):
            found = sources[k] if len(sources) > k else None
            diff.append(f"{role} {found!r} (now {given!r})")
    if diff:
        raise UserError(
            f"--save_model_path {path} holds a DARE'd model made with {', '.join(diff)}; remove it or choose "
            "another --save_model_path"
        )


def guard_paths(
    args: argparse.Namespace,
    name: str,
    backbone: str | None,
    masked_path: Path | None,
    recovered_path: Path | None,
    out_dir: Path,
) -> None:
    """Refuse, before anything is read or written, outputs that equal, contain or lie inside an input, or each
    other: the DARE'd model, a recovered model still to be made and the results folder, against the models (after
    resolving registry names and hub ids to their local folders) and the data files."""
    models = {"--finetuned_model_name": name, "--pretrained_model_name (backbone)": backbone}
    inputs: dict[str, Path] = dict(local_model_inputs(models, hub_id))
    if not args.skip_evaluation:
        inputs.update(llm_data_inputs(args, [args.dataset_name]))
    outputs: dict[str, Path | None] = {
        "--save_model_path": masked_path,
        "--output_dir (this run's results)": out_dir,
    }
    if recovered_path is not None:
        if _complete_model_folder(recovered_path):
            inputs["--recovered_model_path"] = recovered_path  # reused: an input
        else:
            outputs["--recovered_model_path"] = recovered_path
    guard_outputs(outputs, inputs)
    guard_outputs({"--output_dir (this run's results)": out_dir}, {"--save_model_path": masked_path})
    guard_outputs({"--save_model_path": masked_path}, {"--recovered_model_path": recovered_path})


def main(argv=None) -> dict:
    from utils.run_settings import dare_settings, run_settings

    args = parse_args(argv)
    setup_logging()
    # every flag is checked before any file or folder is written
    check_rate("--weight_mask_rate", args.weight_mask_rate)
    check_evaluation_args(args)
    if args.weight_mask_rate > 0.0:
        try:
            resolve_device(args.device)
        except ValueError as exc:
            raise UserError(f"--device: {exc}") from exc
    name = args.finetuned_model_name
    if args.wizardcoder_use_llama2_as_backbone and args.pretrained_model_name:
        raise UserError("--wizardcoder_use_llama2_as_backbone and --pretrained_model_name exclude each other")
    try:
        backbone = args.pretrained_model_name or backbone_of(name, args.wizardcoder_use_llama2_as_backbone)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    adapter = _is_adapter(name)
    if adapter and backbone is None:
        from model_merging_methods.lora import resolve_base_model

        backbone = resolve_base_model(None, [resolve_model(name)], hub_id)
    dare = args.weight_mask_rate > 0.0
    if dare and backbone is None:
        raise UserError(f"no known backbone for {name}: pass --pretrained_model_name for DARE")
    dare = dare or adapter  # an adapter is merged into its base (DARE at rate 0 gives the adapter's model)
    model_label = display_name(name)
    finetuned = name
    recovered_path = None
    if name in DELTA_RELEASED:
        recovered_path = Path(args.recovered_model_path or f"save_models/{name}-recovered")
        model_label = f"{name}-recovered"
        finetuned = str(recovered_path)
    save_name = make_save_name(model_label, args)
    dataset = args.dataset_name
    out_dir = Path(args.output_dir) / dataset / save_name
    masked_path = Path(args.save_model_path or f"save_models/{dataset}/{save_name}") if dare else None
    guard_paths(args, name, backbone, masked_path, recovered_path, out_dir)
    if not args.skip_evaluation:
        check_data([dataset], args)  # missing data or an empty range fails before any folder is made
    if dare and os.path.lexists(masked_path):
        if not args.resume:
            raise UserError(f"{masked_path} exists: pass --resume to reuse it, or remove it")
        check_reusable_dare_model(masked_path, args, finetuned, backbone)
    resumed_complete = all_generations_done([dataset], save_name, args.output_dir, args)
    if not dare and recovered_path is None and not resumed_complete:
        finetuned = resolve_model(finetuned)  # likewise for a model that cannot be found
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_handler = logging.FileHandler(out_dir / "run.log", encoding="utf-8")
    except OSError as exc:
        raise UserError(os_error_message(exc, out_dir)) from exc
    log_handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    logging.getLogger().addHandler(log_handler)
    try:
        logger.info("arguments: %s", vars(args))
        if resumed_complete:
            logger.info("--resume: every selected item is already generated; no model is loaded")
            model_path = str(masked_path) if dare else finetuned
        else:
            if recovered_path is not None and not _complete_model_folder(recovered_path):
                if backbone is None:
                    raise UserError(
                        f"{name} is a delta release: pass --pretrained_model_name (its llama-7b base)"
                    )
                logger.info("recovering %s = %s + delta into %s", name, backbone, recovered_path)
                _report(
                    _streaming().stream_recover_from_delta(
                        backbone, name, str(recovered_path), pad_token="[PAD]", name_resolver=hub_id
                    )
                )
            if dare:
                if os.path.lexists(masked_path):  # checked above: this toolkit's DARE'd model, same settings
                    logger.info("--resume: reusing the DARE'd model in %s", masked_path)
                else:
                    _report(
                        _streaming().stream_mask_model(
                            backbone,
                            finetuned,
                            str(masked_path),
                            weight_format=args.weight_format,
                            weight_mask_rate=args.weight_mask_rate,
                            use_weight_rescale=args.use_weight_rescale,
                            mask_strategy=args.mask_strategy,
                            seed=args.seed,
                            exclude_param_names_regex=(),
                            pad_token=pad_token_for([name, backbone]),
                            name_resolver=hub_id,
                            device=args.device,
                        )  # fmt: skip
                    )
                model_path = str(masked_path)
            else:
                model_path = finetuned
        if args.skip_evaluation:
            print(f"model ready, not evaluated (--skip_evaluation): {model_path}")
            return {}
        generator = model_path if dare else model_label
        settings = run_settings(
            args, script="inference_llms_instruct_math_code.py", model=model_label,
            kind="dare" if args.weight_mask_rate > 0 else "model",  # rate 0: the p = 0 point of a DARE sweep
            dare=dare_settings(
                args.weight_mask_rate, args.use_weight_rescale, args.mask_strategy, args.weight_format, args.seed
            ),
            backbone=backbone,
        )  # fmt: skip
        results = evaluate_model(
            model_path,
            [dataset],
            save_name,
            args.output_dir,
            args,
            generator_name=generator,
            settings=settings,
        )
        if dare and args.remove_saved_model and os.path.lexists(masked_path):
            remove_toolkit_output(masked_path)  # only ever a folder this toolkit wrote
            logger.info("removed %s", masked_path)
        print(json.dumps(summary(results), indent=2))
        return results
    finally:
        logging.getLogger().removeHandler(log_handler)
        log_handler.close()


def _report(manifest: dict | None) -> None:
    """Print what the user should see of a streamed run: housekeeping and warnings (also in its manifest)."""
    for line in (manifest or {}).get("housekeeping", []):
        print(line, file=sys.stderr)
    for warning in (manifest or {}).get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
