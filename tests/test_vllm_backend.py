"""The vLLM backend against a fake ``vllm`` module (injected via sys.modules) that records every call."""

import json
import sys
import types
from argparse import Namespace

import pytest

from utils import generation_backends as gb
from utils.llm_evaluation import TASK_DATASETS, evaluate_model


class FakeVLLM:
    """Records LLM construction, generate calls, SamplingParams and teardown."""

    def __init__(self, with_cleanup: bool = True, answer: str = "Let me see.\nThe answer is: 18"):
        self.events: list[tuple] = []
        self.answer = answer
        fake = self

        class SamplingParams:
            def __init__(self, **kwargs):
                self.kwargs = kwargs
                fake.events.append(("SamplingParams", kwargs))

        class EngineCore:
            def shutdown(self):
                fake.events.append(("engine_core.shutdown",))

        class LLM:
            def __init__(self, **kwargs):
                fake.events.append(("LLM", kwargs))
                self.llm_engine = types.SimpleNamespace(engine_core=EngineCore())

            def generate(self, prompts, sampling_params, **kwargs):
                assert isinstance(sampling_params, SamplingParams)
                fake.events.append(("generate", list(prompts), sampling_params.kwargs))
                return [
                    types.SimpleNamespace(
                        prompt=p, outputs=[types.SimpleNamespace(text=f"Step {i}.\n{fake.answer}")]
                    )
                    for i, p in enumerate(prompts)
                ]

        self.module = types.ModuleType("vllm")
        self.module.LLM = LLM
        self.module.SamplingParams = SamplingParams
        self.distributed = types.ModuleType("vllm.distributed")
        self.parallel_state = types.ModuleType("vllm.distributed.parallel_state")
        if with_cleanup:
            self.parallel_state.cleanup_dist_env_and_memory = lambda: fake.events.append(("cleanup",))
        else:
            self.parallel_state.destroy_model_parallel = lambda: fake.events.append(
                ("destroy_model_parallel",)
            )
            self.parallel_state.destroy_distributed_environment = lambda: fake.events.append(
                ("destroy_dist",)
            )
        self.distributed.parallel_state = self.parallel_state
        self.module.distributed = self.distributed

    def install(self, monkeypatch):
        monkeypatch.setitem(sys.modules, "vllm", self.module)
        monkeypatch.setitem(sys.modules, "vllm.distributed", self.distributed)
        monkeypatch.setitem(sys.modules, "vllm.distributed.parallel_state", self.parallel_state)
        return self

    def kinds(self):
        return [e[0] for e in self.events]


def test_vllm_backend_calls_and_teardown(monkeypatch):
    fake = FakeVLLM().install(monkeypatch)
    backend = gb.VLLMBackend("/models/m", tensor_parallel_size=2)
    assert fake.events[0] == (
        "LLM", {"model": "/models/m", "tensor_parallel_size": 2, "dtype": "auto", "gpu_memory_utilization": 0.9,
                "seed": 0},
    )  # fmt: skip
    out = backend.generate(["p0", "p1", "p2"], 1024, ("Instruction:", "Response"))
    assert out == [f"Step {i}.\n{fake.answer}" for i in range(3)]
    sampling = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 1024, "stop": ["Instruction:", "Response"]}
    assert fake.events[1:] == [("SamplingParams", sampling), ("generate", ["p0", "p1", "p2"], sampling)]
    backend.close()
    assert fake.kinds()[-2:] == ["engine_core.shutdown", "cleanup"]
    assert backend.llm is None
    backend.close()  # idempotent
    assert fake.kinds().count("cleanup") == 1
    with pytest.raises(RuntimeError):
        backend.generate(["p"], 5)


def test_vllm_teardown_falls_back_to_destroy_functions(monkeypatch):
    fake = FakeVLLM(with_cleanup=False).install(monkeypatch)
    with gb.VLLMBackend("m", max_model_len=4096) as backend:
        backend.generate(["q"], 7)
    assert fake.events[0][1]["max_model_len"] == 4096
    assert fake.events[2][2]["stop"] == []
    assert fake.kinds()[-2:] == ["destroy_model_parallel", "destroy_dist"]


def test_auto_backend_choice(monkeypatch):
    FakeVLLM().install(monkeypatch)
    monkeypatch.setattr(gb, "vllm_importable", lambda: True)
    monkeypatch.setattr(gb, "_cuda_available", lambda: False)
    assert gb.resolve_backend_name("auto") == "hf"
    monkeypatch.setattr(gb, "_cuda_available", lambda: True)
    assert gb.resolve_backend_name("auto") == "vllm"
    monkeypatch.setattr(gb, "vllm_importable", lambda: False)
    assert gb.resolve_backend_name("auto") == "hf"
    assert gb.resolve_backend_name("vllm") == "vllm" and gb.resolve_backend_name("hf") == "hf"


def test_one_engine_for_all_datasets_all_prompts_per_call_and_teardown_before_scoring(monkeypatch, tmp_path):
    fake = FakeVLLM().install(monkeypatch)
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(
        "".join(json.dumps({"question": f"Q{i}", "answer": "w\n#### 18"}) + "\n" for i in range(5))
    )
    math = tmp_path / "math.jsonl"
    math.write_text(
        "".join(json.dumps({"problem": f"P{i}", "solution": "$\\boxed{18}$"}) + "\n" for i in range(3))
    )
    args = Namespace(
        inference_backend="vllm", tensor_parallel_size=4, gsm8k_file=str(gsm), math_file=str(math)
    )

    import utils.llm_evaluation as le

    real_score = le.score

    def score_after_teardown(*a, **k):
        assert "cleanup" in fake.kinds(), "the engine must be torn down before scoring"
        return real_score(*a, **k)

    monkeypatch.setattr(le, "score", score_after_teardown)
    results = evaluate_model("/merged/math", TASK_DATASETS["math"], "run1", str(tmp_path / "out"), args)

    assert fake.kinds().count("LLM") == 1  # one engine for both datasets
    assert fake.events[0][1]["tensor_parallel_size"] == 4 and fake.events[0][1]["model"] == "/merged/math"
    generates = [e for e in fake.events if e[0] == "generate"]
    assert [len(g[1]) for g in generates] == [5, 3]  # all prompts of a dataset in one call
    assert generates[0][1][0].endswith("### Instruction:\nQ0\n\n### Response: Let's think step by step.")
    assert generates[0][2]["max_tokens"] == 1024 and generates[1][2]["max_tokens"] == 2048
    stops = ["Instruction:", "Instruction", "Response:", "Response"]
    assert generates[0][2]["stop"] == stops and generates[1][2]["stop"] == stops
    assert all(g[2]["temperature"] == 0.0 and g[2]["top_p"] == 1.0 for g in generates)
    assert fake.kinds()[-2:] == ["engine_core.shutdown", "cleanup"]
    # every fake answer ends with "The answer is: 18": right for both sets
    assert results["gsm8k"]["accuracy"] == 1.0 and results["gsm8k"]["accuracy_original"] == 1.0
    assert results["MATH"]["n"] == 3 and results["gsm8k"]["backend"] == "vllm"
    for d in ("gsm8k", "MATH"):
        assert (tmp_path / "out" / d / "run1" / "results.json").is_file()


def test_code_datasets_through_the_fake_engine(monkeypatch, tmp_path):
    fake = FakeVLLM(answer="```python\ndef f():\n\treturn 1\n```").install(monkeypatch)
    mbpp = tmp_path / "mbpp.jsonl"
    mbpp.write_text(
        json.dumps({"task_id": 1, "text": "One.", "code": "", "test_list": ["assert f() == 1"]}) + "\n"
    )
    args = Namespace(inference_backend="vllm", mbpp_file=str(mbpp), end_index=1)
    results = evaluate_model("m", ["human_eval", "mbpp"], "code_run", str(tmp_path), args)
    assert fake.kinds().count("LLM") == 1 and fake.kinds().count("cleanup") == 1
    assert results["mbpp"]["pass@1"] == 1.0  # "def f(): return 1" after fence removal and tab conversion
    assert results["human_eval"]["n"] == 1 and results["human_eval"]["pass@1"] == 0.0
    assert all(len(e[1]) == 1 for e in fake.events if e[0] == "generate")
