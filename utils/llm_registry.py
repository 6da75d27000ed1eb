"""The paper's LLM registry (§6.1 of the spec): short names → hub ids and their pre-trained backbones.

Short names keep working on the command line; any local folder or other hub id can be given instead.
"""

from __future__ import annotations

# fine-tuned short name -> hub id
FINETUNED_HUB_IDS: dict[str, str] = {
    "WizardLM-7B-V1.0": "WizardLMTeam/WizardLM-7B-V1.0",  # released as delta weights (recovered against llama-7b)
    "WizardLM-13B-V1.2": "WizardLMTeam/WizardLM-13B-V1.2",
    "WizardLM-70B-V1.0": "WizardLMTeam/WizardLM-70B-V1.0",
    "WizardMath-7B-V1.0": "WizardLMTeam/WizardMath-7B-V1.0",
    "WizardMath-13B-V1.0": "WizardLMTeam/WizardMath-13B-V1.0",
    "WizardMath-70B-V1.0": "WizardLMTeam/WizardMath-70B-V1.0",
    "WizardCoder-Python-7B-V1.0": "WizardLMTeam/WizardCoder-Python-7B-V1.0",
    "WizardCoder-Python-13B-V1.0": "WizardLMTeam/WizardCoder-Python-13B-V1.0",
    "WizardCoder-Python-34B-V1.0": "WizardLMTeam/WizardCoder-Python-34B-V1.0",
    "llama-2-13b-code-alpaca": "layoric/llama-2-13b-code-alpaca",
}

# backbone short name -> hub id
BACKBONE_HUB_IDS: dict[str, str] = {
    "llama-7b-hf": "huggyllama/llama-7b",
    "Llama-2-7b-hf": "meta-llama/Llama-2-7b-hf",
    "Llama-2-13b-hf": "meta-llama/Llama-2-13b-hf",
    "Llama-2-70b-hf": "meta-llama/Llama-2-70b-hf",
    "CodeLlama-7b-Python-hf": "codellama/CodeLlama-7b-Python-hf",
    "CodeLlama-13b-Python-hf": "codellama/CodeLlama-13b-Python-hf",
    "CodeLlama-34b-Python-hf": "codellama/CodeLlama-34b-Python-hf",
}

# fine-tuned short name -> backbone short name
FINETUNED_BACKBONE: dict[str, str] = {
    "WizardLM-7B-V1.0": "llama-7b-hf",
    "WizardLM-13B-V1.2": "Llama-2-13b-hf",
    "WizardLM-70B-V1.0": "Llama-2-70b-hf",
    "WizardMath-7B-V1.0": "Llama-2-7b-hf",
    "WizardMath-13B-V1.0": "Llama-2-13b-hf",
    "WizardMath-70B-V1.0": "Llama-2-70b-hf",
    "WizardCoder-Python-7B-V1.0": "CodeLlama-7b-Python-hf",
    "WizardCoder-Python-13B-V1.0": "CodeLlama-13b-Python-hf",
    "WizardCoder-Python-34B-V1.0": "CodeLlama-34b-Python-hf",
    "llama-2-13b-code-alpaca": "Llama-2-13b-hf",
}

# the --wizardcoder_use_llama2_as_backbone ablation (only 7B and 13B)
WIZARDCODER_LLAMA2_BACKBONE: dict[str, str] = {
    "WizardCoder-Python-7B-V1.0": "Llama-2-7b-hf",
    "WizardCoder-Python-13B-V1.0": "Llama-2-13b-hf",
}

# models released as weight deltas that must be added to their backbone first
DELTA_RELEASED: frozenset[str] = frozenset({"WizardLM-7B-V1.0"})

# merge_llms_instruct_math_code.py: task -> fine-tuned model (all on Llama-2-13b-hf)
MERGE_TASK_MODELS: dict[str, str] = {
    "instruct": "WizardLM-13B-V1.2",
    "math": "WizardMath-13B-V1.0",
    "code": "llama-2-13b-code-alpaca",
}


def hub_id(name: str) -> str:
    """The hub id for a registry short name; any other string (a hub id or a local path) is returned as is."""
    return FINETUNED_HUB_IDS.get(name) or BACKBONE_HUB_IDS.get(name) or name


def backbone_of(finetuned_name: str, wizardcoder_use_llama2_as_backbone: bool = False) -> str | None:
    """The backbone short name of a registry model (None for a model not in the registry)."""
    if wizardcoder_use_llama2_as_backbone:
        if finetuned_name not in WIZARDCODER_LLAMA2_BACKBONE:
            raise ValueError(
                "--wizardcoder_use_llama2_as_backbone applies only to "
                + ", ".join(sorted(WIZARDCODER_LLAMA2_BACKBONE))
                + f", not {finetuned_name}"
            )
        return WIZARDCODER_LLAMA2_BACKBONE[finetuned_name]
    return FINETUNED_BACKBONE.get(finetuned_name)


def pad_token_for(model_names: list[str]) -> str:
    """The pad token the original adds (§6.2): ``<pad>[PAD]`` when WizardMath-70B is involved, else ``[PAD]``."""
    return "<pad>[PAD]" if any("WizardMath-70B-V1.0" in n for n in model_names) else "[PAD]"
