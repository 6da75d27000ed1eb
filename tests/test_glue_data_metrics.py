"""GLUE data loading (local TSV layout, the hub's offline error), the §5.2 split, tokenisation and the metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from utils.cli import UserError
from utils.glue_data_loader import (
    GLUE_TASKS,
    load_glue_task,
    load_multitask_datasets,
    load_raw_split,
    load_raw_task_splits,
    make_dataloader,
    split_indices,
)
from utils.metrics import (
    flatten_multitask_results,
    glue_scores,
    multitask_scores,
    predictions_from_logits,
    single_task_compute_metrics,
)
from utils.results_io import round_floats
from utils.tiny_models import build_word_tokenizer


def _cola_text(i: int) -> str:
    return f"sentence {'word ' * (i % 4)}number {i} ."


def _write(path, text, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)


@pytest.fixture()
def synthetic_glue(tmp_path):
    """A small GLUE folder in the classic layout, with the format quirks of the real files."""
    d = tmp_path / "glue"
    # CoLA: no header; source, label, original mark, sentence; no newline after the last row
    _write(d / "CoLA/train.tsv", "".join(f"src\t{i % 2}\t\t{_cola_text(i)}\n" for i in range(20)))
    _write(d / "CoLA/dev.tsv", 'gj04\t1\t\tThe "quoted" one.\ngj04\t0\t*\tbad one')
    # MRPC: UTF-8 byte-order mark on the header, quotes inside fields
    mrpc = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    _write(
        d / "MRPC/train.tsv",
        mrpc + "".join(f'{i % 2}\t{i}\t{i + 1}\ta " b {i}\tc d {i}\n' for i in range(10)),
    )
    _write(d / "MRPC/dev.tsv", mrpc + '1\t1\t2\tHe said " yes\tShe said no\n')
    sts = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    _write(
        d / "STS-B/train.tsv",
        sts + "".join(f"{i}\tg\tf\ty\t0\tn\tn\ts one {i}\ts two {i}\t{i / 4:.3f}\n" for i in range(10)),
    )
    _write(d / "STS-B/dev.tsv", sts + "0\tg\tf\ty\t0\tn\tn\tA man.\tA person.\t4.750\n")
    rte = "index\tsentence1\tsentence2\tlabel\n"
    _write(
        d / "RTE/train.tsv",
        rte + "".join(f"{i}\tp {i}\th {i}\t{['entailment', 'not_entailment'][i % 2]}\n" for i in range(10)),
    )
    _write(d / "RTE/dev.tsv", rte + "0\tp\th\tnot_entailment\n")
    _write(
        d / "MNLI/dev_matched.jsonl",
        '{"premise": "P one", "hypothesis": "H one", "label": "neutral"}\n'
        '{"premise": "P two", "hypothesis": "H two", "label": "contradiction"}\n',
    )
    load_raw_split.cache_clear()
    yield d
    load_raw_split.cache_clear()


def test_task_table_matches_spec():
    assert list(GLUE_TASKS) == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"]
    assert [t.dataset_id for t in GLUE_TASKS.values()] == list(range(8))
    assert {n: t.num_labels for n, t in GLUE_TASKS.items()} == {
        "cola": 2, "sst2": 2, "mrpc": 2, "stsb": 1, "qqp": 2, "mnli": 3, "qnli": 2, "rte": 2,
    }  # fmt: skip
    assert {n: t.main_metric for n, t in GLUE_TASKS.items()} == {
        "cola": "matthews_correlation", "sst2": "accuracy", "mrpc": "averaged_scores", "stsb": "averaged_scores",
        "qqp": "averaged_scores", "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy",
    }  # fmt: skip
    assert (GLUE_TASKS["qnli"].text_key, GLUE_TASKS["qnli"].text_pair_key) == ("question", "sentence")
    assert (GLUE_TASKS["mnli"].text_key, GLUE_TASKS["mnli"].text_pair_key) == ("premise", "hypothesis")


def test_split_is_the_seed0_numpy_permutation():
    train, val = split_indices(10)
    assert np.random.RandomState(0).permutation(10).tolist() == [2, 8, 4, 9, 1, 6, 7, 3, 0, 5]
    assert train.tolist() == [2, 8, 4, 9, 1, 6, 7, 3, 0] and val.tolist() == [5]
    # the spec's table of split sizes (§5.2)
    for n, (n_train, n_val) in {8551: (7695, 856), 67349: (60614, 6735), 3668: (3301, 367), 5749: (5174, 575),
                                363846: (327461, 36385), 392702: (353431, 39271), 104743: (94268, 10475),
                                2490: (2241, 249)}.items():  # fmt: skip
        train, val = split_indices(n)
        assert (len(train), len(val)) == (n_train, n_val)
        assert sorted(np.concatenate([train, val]).tolist()) == list(range(n))


def test_local_tsv_quirks(synthetic_glue):
    d = str(synthetic_glue)
    cola = load_raw_split("cola", "dev", d)
    assert (
        cola.texts == ('The "quoted" one.', "bad one") and cola.labels == (1, 0) and cola.text_pairs is None
    )
    mrpc = load_raw_split("mrpc", "dev", d)
    assert mrpc.texts == ('He said " yes',) and mrpc.text_pairs == ("She said no",) and mrpc.labels == (1,)
    stsb = load_raw_split("stsb", "dev", d)
    assert stsb.labels == (4.75,) and isinstance(stsb.labels[0], float)
    assert load_raw_split("rte", "dev", d).labels == (1,)
    mnli = load_raw_split("mnli", "dev", d)
    assert (
        mnli.texts == ("P one", "P two") and mnli.text_pairs == ("H one", "H two") and mnli.labels == (1, 2)
    )


def test_split_construction_on_a_local_folder(synthetic_glue):
    splits = load_raw_task_splits("cola", str(synthetic_glue))
    train_idx, val_idx = split_indices(20)
    assert splits["train"].texts == tuple(_cola_text(i) for i in train_idx)
    assert splits["validation"].texts == tuple(_cola_text(i) for i in val_idx)
    assert len(splits["test"]) == 2  # GLUE dev, unshuffled
    limited = load_raw_task_splits("cola", str(synthetic_glue), max_train_samples=5, max_eval_samples=1)
    assert limited["train"].texts == splits["train"].texts[:5]
    assert limited["validation"].texts == splits["validation"].texts[:1]
    assert limited["test"].texts == splits["test"].texts[:1]
    # MNLI has no train file here: asking only for test works, asking for train is a clear error
    assert len(load_raw_task_splits("mnli", str(synthetic_glue), ("test",))["test"]) == 2
    with pytest.raises(UserError, match="lacks mnli train data"):
        load_raw_task_splits("mnli", str(synthetic_glue))


def test_bad_inputs(synthetic_glue, tmp_path):
    with pytest.raises(UserError, match="unknown GLUE task"):
        load_raw_split("colaa", "train", str(synthetic_glue))
    with pytest.raises(UserError, match="lacks sst2 train data"):
        load_raw_split("sst2", "train", str(synthetic_glue))
    with pytest.raises(UserError, match="not found"):
        load_raw_split("cola", "train", str(tmp_path / "nowhere"))
    _write(synthetic_glue / "SST-2/train.tsv", "sentence\tlabel\ngood\t7\n")
    with pytest.raises(UserError, match="out of range"):
        load_raw_split("sst2", "train", str(synthetic_glue))
    _write(synthetic_glue / "QNLI/dev.tsv", "index\tquestion\tsentence\tlabel\n0\tq\ts\tmaybe\n")
    with pytest.raises(UserError, match="bad label 'maybe'"):
        load_raw_split("qnli", "dev", str(synthetic_glue))


def test_hub_offline_is_a_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    load_raw_split.cache_clear()
    with pytest.raises(UserError, match="cannot load GLUE rte from the hub.*--glue_data_dir"):
        load_raw_split("rte", "dev", None)


def test_real_glue_files(shared_data):
    glue = shared_data / "glue"
    if not glue.is_dir():
        pytest.skip("no GLUE data")
    load_raw_split.cache_clear()
    counts = {("cola", "train"): 8551, ("cola", "dev"): 1043, ("mrpc", "train"): 3668, ("mrpc", "dev"): 408,
              ("stsb", "train"): 5749, ("stsb", "dev"): 1500, ("rte", "train"): 2490, ("rte", "dev"): 277,
              ("sst2", "dev"): 872, ("qnli", "dev"): 5463, ("mnli", "dev"): 9815}  # fmt: skip
    for (task, which), n in counts.items():
        assert len(load_raw_split(task, which, str(glue))) == n, (task, which)
    cola_dev = load_raw_split("cola", "dev", str(glue))
    assert cola_dev.texts[0] == "The sailors rode the breeze clear of the rocks." and cola_dev.labels[0] == 1
    mrpc_dev = load_raw_split("mrpc", "dev", str(glue))
    assert mrpc_dev.texts[0].startswith("He said the foodservice pie business") and mrpc_dev.labels[0] == 1
    mnli = load_raw_split("mnli", "dev", str(glue))
    assert mnli.texts[0] == "The new rights are nice enough" and mnli.labels[0] == 1
    assert np.bincount(mnli.labels).tolist() == [3479, 3123, 3213]
    assert load_raw_split("stsb", "dev", str(glue)).labels[:2] == (5.0, 4.75)
    assert load_raw_split("rte", "dev", str(glue)).labels[0] == 1  # not_entailment
    splits = load_raw_task_splits("cola", str(glue))
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (7695, 856, 1043)
    load_raw_split.cache_clear()


def test_tokenisation_and_dynamic_padding(synthetic_glue):
    tok = build_word_tokenizer([_cola_text(i) for i in range(20)] + ["s one", "s two"], "bert", 100)
    data = load_glue_task("stsb", tok, str(synthetic_glue), max_seq_length=6)
    train = data["train"]
    assert set(train.column_names) >= {"input_ids", "attention_mask", "label", "dataset_ids"}
    assert all(len(ids) <= 6 for ids in train["input_ids"])  # truncation at max_seq_length
    assert set(train["dataset_ids"]) == {3} and all(isinstance(v, float) for v in train["label"])
    cola = load_glue_task("cola", tok, str(synthetic_glue))["train"]
    lengths = {len(ids) for ids in cola["input_ids"]}
    assert len(lengths) > 1  # no padding at tokenisation time
    batches = list(make_dataloader(cola, tok, batch_size=4, shuffle=False))
    first = batches[0]
    assert first["input_ids"].shape == (4, max(len(cola[i]["input_ids"]) for i in range(4)))
    assert first["labels"].tolist() == cola["label"][:4] and "dataset_ids" not in first
    # a seeded shuffle: same seed same order, another seed another order
    order = lambda seed: torch.cat([b["input_ids"].sum(1) for b in make_dataloader(cola, tok, 4, True, seed)])  # noqa: E731
    assert torch.equal(order(0), order(0)) and not torch.equal(order(0), order(1))
    multi = load_multitask_datasets(["cola", "stsb"], tok, str(synthetic_glue))
    assert len(multi["train"]) == len(cola) + len(train) and set(multi["train"]["dataset_ids"]) == {0, 3}


# ----------------------------------------------------------------------------------------------- metrics
def test_metrics_against_hand_worked_values():
    preds, refs = [1, 1, 0, 0], [1, 0, 0, 0]  # TP 1, FP 1, TN 2, FN 0
    assert glue_scores("cola", preds, refs)["matthews_correlation"] == pytest.approx(2 / math.sqrt(12))
    assert glue_scores("sst2", preds, refs) == {"accuracy": 0.75}
    mrpc = glue_scores("mrpc", preds, refs)
    assert mrpc == pytest.approx({"accuracy": 0.75, "f1": 2 / 3, "averaged_scores": (0.75 + 2 / 3) / 2})
    stsb = glue_scores("stsb", [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 5.0])
    pearson = 6.5 / math.sqrt(5 * 8.75)
    assert stsb == pytest.approx({"pearson": pearson, "spearmanr": 1.0, "averaged_scores": (pearson + 1) / 2})
    # degenerate: constant predictions give 0 correlation, not NaN
    assert glue_scores("stsb", [2.0, 2.0, 2.0], [1.0, 2.0, 3.0])["pearson"] == 0.0
    assert glue_scores("cola", [1, 1, 1], [0, 1, 1])["matthews_correlation"] == 0.0
    # rounding as §1.5: every float to 4 decimals
    assert round_floats(mrpc) == {"accuracy": 0.75, "f1": 0.6667, "averaged_scores": 0.7083}


def test_predictions_and_compute_metrics():
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 0.5]])
    assert predictions_from_logits(logits).tolist() == [1, 0, 1]
    assert predictions_from_logits(np.array([[0.5], [1.5]])).tolist() == [0.5, 1.5]

    class Pred:
        predictions, label_ids = logits, np.array([1, 1, 1])

    assert single_task_compute_metrics("rte")(Pred()) == pytest.approx({"accuracy": 2 / 3})


def test_multitask_scores_group_and_slice():
    # rows: cola (id 0, 2 labels), stsb (id 3, regression), mnli (id 5, 3 labels); -1000 pads narrower heads
    logits = np.array([
        [0.0, 1.0, -1000.0], [1.0, 0.0, -1000.0],   # cola → preds 1, 0
        [1.0, -1000.0, -1000.0], [3.0, -1000.0, -1000.0], [2.0, -1000.0, -1000.0],  # stsb
        [0.0, 0.0, 5.0], [9.0, 0.0, 0.0],           # mnli → preds 2, 0
    ])  # fmt: skip
    ids = np.array([0, 0, 3, 3, 3, 5, 5])
    labels = np.array([1.0, 1.0, 1.0, 3.0, 2.5, 2.0, 1.0])
    out = multitask_scores(logits, ids, labels)
    by_task = {r["dataset_name"]: r for r in out["all_results"]}
    assert by_task["cola"]["matthews_correlation"] == 0.0  # refs constant
    assert by_task["mnli"]["accuracy"] == 0.5
    assert by_task["stsb"]["spearmanr"] == pytest.approx(1.0)
    mains = [0.0, by_task["stsb"]["averaged_scores"], 0.5]
    assert out["averaged_scores"] == pytest.approx(np.mean(mains))
    flat = flatten_multitask_results(
        {"eval_averaged_scores": out["averaged_scores"], "eval_all_results": out["all_results"]}
    )
    assert flat["cola_matthews_correlation"] == 0.0 and flat["mnli_accuracy"] == 0.5
    assert flat["stsb_averaged_scores"] == by_task["stsb"]["averaged_scores"]
