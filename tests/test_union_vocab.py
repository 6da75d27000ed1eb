"""Union vocabulary building blocks: token order, per-model row maps, the saved union tokenizer, and the errors."""

from __future__ import annotations

import json

import pytest
import torch

from model_merging_methods.errors import MergeError
from model_merging_methods.vocab import (
    ROW_NEW,
    ROW_PADDING,
    ROW_SHARED,
    build_union_vocab,
    check_tied_embeddings,
)
from utils.tiny_models import build_char_tokenizer


def _tokenizer(folder, special=(), plain=(), alphabet=None):
    tok = build_char_tokenizer(**({"alphabet": alphabet} if alphabet else {}))
    if special:
        tok.add_special_tokens({"additional_special_tokens": list(special)})
    if plain:
        tok.add_tokens(list(plain))
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("union_tok")
    return {
        "base": _tokenizer(root / "base"),
        "math": _tokenizer(root / "math", special=["<|math|>"]),
        "code": _tokenizer(root / "code", plain=["<|code|>", "<|math|>"]),
        "same": _tokenizer(root / "same"),
    }


def test_union_order_and_row_maps(toks):
    u = build_union_vocab([toks["base"], toks["math"], toks["code"]], ["base", "math", "code"])
    assert u.base_size == 100 and u.num_tokens == 102 and u.size == 102
    assert u.tokens[:100] == [
        t for t, _ in sorted(build_char_tokenizer().get_vocab().items(), key=lambda kv: kv[1])
    ]
    assert u.tokens[100:] == ["<|math|>", "<|code|>"]  # base order, then new tokens model by model
    base_rows, math_rows, code_rows = (r.tolist() for r in u.row_maps)
    assert base_rows == list(range(100)) + [-1, -1]
    assert math_rows == list(range(100)) + [100, -1]
    assert code_rows == list(range(100)) + [101, 100]  # code has <|code|> at 100 and <|math|> at 101
    assert u.owners(100) == [1, 2] and u.owners(101) == [2] and u.owners(5) == [0, 1, 2]
    assert u.row_kinds() == [(0, 100, ROW_SHARED), (100, 102, ROW_NEW)]
    rows, present = u.model_rows(1, 99, 102)
    assert rows.tolist() == [99, 100, 0] and present.tolist() == [True, True, False]
    assert u.added == [
        {"token": "<|math|>", "union_id": 100, "models": ["math", "code"], "ids": {"math": 100, "code": 101}},
        {"token": "<|code|>", "union_id": 101, "models": ["code"], "ids": {"code": 100}},
    ]
    assert u.manifest()["rows"] == 102


def test_union_tokenizer_is_saved_and_keeps_specialness(toks, tmp_path):
    from transformers import AutoTokenizer

    u = build_union_vocab([toks["base"], toks["math"], toks["code"]], ["base", "math", "code"])
    files = u.save(tmp_path / "out")
    assert "tokenizer.json" in files
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert len(tok) == 102
    ids = tok.encode("a<|math|>b<|code|>")
    assert ids == [1, tok.convert_tokens_to_ids("a"), 100, tok.convert_tokens_to_ids("b"), 101]
    assert tok.added_tokens_decoder[100].special and not tok.added_tokens_decoder[101].special
    assert tok.decode(ids, skip_special_tokens=True) == "ab<|code|>"
    # the base tokenizer itself is untouched
    assert len(AutoTokenizer.from_pretrained(str(toks["base"]))) == 100


def test_pad_to_multiple_of(toks):
    u = build_union_vocab([toks["base"], toks["math"]], ["base", "math"], pad_to_multiple_of=64)
    assert u.num_tokens == 101 and u.size == 128
    assert u.row_kinds() == [(0, 100, ROW_SHARED), (100, 101, ROW_NEW), (101, 128, ROW_PADDING)]
    assert all(int(r[101:].max()) == -1 for r in u.row_maps)
    same = build_union_vocab([toks["base"], toks["same"]], ["base", "same"], pad_to_multiple_of=1)
    assert same.size == same.num_tokens == 100 and same.added == []
    with pytest.raises(MergeError, match="positive integer"):
        build_union_vocab([toks["base"], toks["math"]], ["base", "math"], pad_to_multiple_of=0)


def test_disagreeing_tokenizers_are_refused(toks, tmp_path):
    shuffled = _tokenizer(tmp_path / "shuffled", alphabet="ba" + "cdefghijklmnopqrstuvwxyz")
    with pytest.raises(MergeError, match=r"disagree in the base range: shuffled gives id 3 to 'b'"):
        build_union_vocab([toks["base"], shuffled], ["base", "shuffled"])
    # a base token moved beyond the base range
    small = _tokenizer(tmp_path / "small", alphabet="abc")
    bigger = _tokenizer(tmp_path / "bigger", alphabet="abcd")
    moved = tmp_path / "moved"
    moved.mkdir()
    data = json.loads((bigger / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["c"] = vocab.pop("d")  # 'c' at id 6 (beyond the base's 0..5), id 5 left empty
    (moved / "tokenizer.json").write_text(json.dumps(data))
    (moved / "tokenizer_config.json").write_text((bigger / "tokenizer_config.json").read_text())
    with pytest.raises(MergeError, match="moved gives 'c' id 6 but the base small gives it id 5"):
        build_union_vocab([small, moved], ["small", "moved"])


def test_missing_tokenizer_and_too_few_rows(toks, tmp_path):
    empty = tmp_path / "no_tokenizer"
    empty.mkdir()
    with pytest.raises(MergeError, match="needs every model's tokenizer, but nothing has none"):
        build_union_vocab([toks["base"], empty], ["base", "nothing"])
    with pytest.raises(MergeError, match="needs every model's tokenizer"):
        build_union_vocab([empty, toks["math"]], ["base", "math"])
    with pytest.raises(
        MergeError, match=r"gives id 100 to '<\|math\|>', but its embedding has only 100 rows"
    ):
        build_union_vocab([toks["base"], toks["math"]], ["base", "math"], embedding_rows=[100, 100])
    u = build_union_vocab([toks["base"], toks["math"]], ["base", "math"], embedding_rows=[100, 128])
    assert u.num_tokens == 101


def test_tied_embeddings_check():
    assert check_tied_embeddings([{"tie_word_embeddings": True}, {"tie_word_embeddings": True}], ["a", "b"])
    assert check_tied_embeddings([{}, None], ["a", "b"]) is None
    assert check_tied_embeddings([{"tie_word_embeddings": False}, {}], ["a", "b"]) is False
    with pytest.raises(MergeError, match="disagree on tied embeddings"):
        check_tied_embeddings([{"tie_word_embeddings": True}, {"tie_word_embeddings": False}], ["a", "b"])


def test_row_maps_gather_rows(toks):
    """The row maps place each model's embedding rows at the union rows (what the merge engine gathers)."""
    u = build_union_vocab([toks["base"], toks["math"], toks["code"]], ["base", "math", "code"])
    code_embed = torch.arange(102 * 2, dtype=torch.float32).reshape(102, 2)
    rows, present = u.model_rows(2, 0, u.size)
    gathered = code_embed[rows]
    assert present.all()
    assert torch.equal(gathered[100], code_embed[101]) and torch.equal(gathered[101], code_embed[100])


def test_aligned_rows_semantics(toks):
    """Shared rows come from each model (base row where a model lacks one), a token one model added keeps that
    model's row exactly, a token two models added gets their mean, padding rows the base's mean row."""
    u = build_union_vocab(
        [toks["base"], toks["math"], toks["code"]], ["base", "math", "code"], pad_to_multiple_of=104
    )
    g = torch.Generator().manual_seed(0)
    tables = [torch.randn(n, 3, generator=g) for n in (100, 101, 102)]
    tables[2] = tables[2].to(torch.bfloat16)

    def read_rows(m, a, b):
        return tables[m][a:b].clone()

    def mean_row(m):
        return tables[m].float().mean(0)

    blocks, fixed = u.aligned_rows(0, u.size, read_rows, mean_row)
    assert [blocks[m].shape for m in range(3)] == [(104, 3)] * 3 and blocks[2].dtype == torch.bfloat16
    for m in range(3):
        assert torch.equal(blocks[m][:100], tables[m][:100])
    mask, values = fixed
    assert mask.tolist() == [False] * 100 + [True] * 4
    math_row = (tables[1][100].float() + tables[2][101].float()) / 2  # <|math|>: math id 100, code id 101
    assert torch.equal(values[100], math_row)
    assert torch.equal(values[101], tables[2][100].float())  # <|code|>: only code has it, kept exactly
    assert torch.equal(values[102], mean_row(0)) and torch.equal(values[103], mean_row(0))
    for m in range(3):  # every model sees the fixed rows (δ = 0 there)
        assert torch.equal(blocks[m][100:].float(), values[100:].to(blocks[m].dtype).float())
    # any block boundary gives the same rows
    for r0, r1 in ((0, 50), (50, 101), (101, 104), (99, 103)):
        part, part_fixed = u.aligned_rows(r0, r1, read_rows, mean_row)
        for m in range(3):
            assert torch.equal(part[m], blocks[m][r0:r1])
        only = u.aligned_rows(r0, r1, read_rows, mean_row, models=[2])
        assert list(only[0]) == [2] and torch.equal(only[0][2], blocks[2][r0:r1])
        if part_fixed is not None:
            assert torch.equal(part_fixed[0], mask[r0:r1])
            assert torch.equal(part_fixed[1][part_fixed[0]], values[r0:r1][mask[r0:r1]])
        else:
            assert not mask[r0:r1].any()


def test_model_lacking_base_tokens_contributes_the_base_row(toks, tmp_path):
    from utils.tiny_models import DEFAULT_ALPHABET

    short = _tokenizer(tmp_path / "short", alphabet=DEFAULT_ALPHABET[:-1])  # no '\t' (base id 99)
    u = build_union_vocab([toks["base"], short], ["base", "short"])
    assert u.row_maps[1][99] == -1 and u.manifest()["models_missing_base_tokens"] == {"short": 1}
    tables = [torch.randn(100, 2), torch.randn(99, 2)]
    blocks, fixed = u.aligned_rows(90, 100, lambda m, a, b: tables[m][a:b], lambda m: tables[m].mean(0))
    assert fixed is None
    assert torch.equal(blocks[1][:9], tables[1][90:99]) and torch.equal(blocks[1][9], tables[0][99])
