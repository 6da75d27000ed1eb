"""Fisher weights and RegMean Gram matrices against direct computations on a tiny model, and their use by the
core's fisher_merging / regmean_merging / mask_merging."""

from __future__ import annotations

import pytest
import torch

from model_merging_methods.mask_weights_utils import mask_model_weights
from model_merging_methods.merging_methods import (
    average_merging,
    fisher_merging,
    mask_merging,
    regmean_merging,
)
from utils.merge_statistics import (
    collect_fisher_weights,
    collect_fisher_weights_at,
    collect_regmean_grams,
    collect_regmean_grams_at,
    merged_linear_modules,
    merged_param_names,
)
from utils.tiny_models import build_tiny_encoder

EXCLUDE = (".*classifier.*",)
VOCAB = 40


def _batches(n_batches: int, bs: int, seed: int = 0, regression: bool = False) -> list[dict]:
    """Right-padded batches with varied lengths (pad id 0) and labels."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        length = 7
        ids = torch.randint(3, VOCAB, (bs, length), generator=gen)
        lengths = torch.randint(3, length + 1, (bs,), generator=gen)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        ids = ids * mask  # pad id 0
        labels = (
            torch.rand(bs, generator=gen) * 5 if regression else torch.randint(0, 2, (bs,), generator=gen)
        )
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _model(style="bert", num_labels=2, seed=0):
    return build_tiny_encoder(style, VOCAB, num_labels=num_labels, seed=seed, hidden_size=16, num_hidden_layers=1,
                              num_attention_heads=2, intermediate_size=24)  # fmt: skip


def _kept(model):
    return [(n, p) for n, p in model.named_parameters() if "classifier" not in n]


def _direct_faithful_fisher(model, batches, regression=False):
    """Independent reference: .backward() on each batch's scalar, square the .grad, sum, divide by #batches·bs."""
    total = {n: torch.zeros_like(p) for n, p in _kept(model)}
    for batch in batches:
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if regression:
            scalar = ((logits.squeeze(-1) - batch["labels"]) ** 2).mean()
        else:
            p = torch.softmax(logits, -1)
            scalar = (p.detach().sqrt() * torch.log(p)).sum()
        scalar.backward()
        for n, param in _kept(model):
            if param.grad is not None:
                total[n] += param.grad**2
    model.zero_grad(set_to_none=True)
    denom = len(batches) * batches[0]["input_ids"].shape[0]
    return {n: t / denom for n, t in total.items()}


def test_faithful_fisher_matches_direct_computation():
    model = _model()
    batches = _batches(5, 4)
    # n = 10, bs = 4: batches are taken while the nominal counter (0, 4, 8) is below 10 → 3 batches
    fisher = collect_fisher_weights(model, batches, 10, exclude_param_names_regex=EXCLUDE)
    reference = _direct_faithful_fisher(model, batches[:3])
    assert set(fisher) == set(reference) and not any("classifier" in n for n in fisher)
    for n in reference:
        torch.testing.assert_close(fisher[n], reference[n], rtol=1e-5, atol=1e-10)
    assert sum(float(f.sum()) for f in fisher.values()) > 0
    assert all(p.grad is None for p in model.parameters())  # nothing left on the model
    assert not model.training


def test_faithful_fisher_regression():
    model = _model(num_labels=1, seed=1)
    batches = _batches(2, 3, regression=True)
    fisher = collect_fisher_weights(model, batches, 6, exclude_param_names_regex=EXCLUDE)
    reference = _direct_faithful_fisher(model, batches, regression=True)
    for n in reference:
        torch.testing.assert_close(fisher[n], reference[n], rtol=1e-5, atol=1e-10)


def test_per_example_fisher_matches_direct_computation():
    model = _model(seed=2)
    batches = _batches(2, 3)
    fisher = collect_fisher_weights(
        model, batches, 5, exclude_param_names_regex=EXCLUDE, variant="per_example"
    )
    total = {n: torch.zeros_like(p) for n, p in _kept(model)}
    examples = [
        (b["input_ids"][i : i + 1], b["attention_mask"][i : i + 1]) for b in batches for i in range(3)
    ][:5]
    for ids, mask in examples:
        length = int(mask.sum())  # unpadded: the same values as the padded row under the attention mask
        for c in range(2):
            model.zero_grad()
            log_p = torch.log_softmax(model(input_ids=ids[:, :length]).logits, -1)[0]
            log_p[c].backward()
            for n, param in _kept(model):
                total[n] += log_p[c].exp().detach() * param.grad**2
    model.zero_grad(set_to_none=True)
    for n in total:
        torch.testing.assert_close(fisher[n], total[n] / 5, rtol=1e-4, atol=1e-9)


def test_snapshots_equal_separate_runs_and_use_a_running_sum():
    model = _model(seed=3)
    batches = _batches(6, 4)
    at = collect_fisher_weights_at(model, batches, [4, 12, 100], exclude_param_names_regex=EXCLUDE)
    for n_examples in (4, 12):
        alone = collect_fisher_weights(model, batches, n_examples, exclude_param_names_regex=EXCLUDE)
        for name in alone:
            torch.testing.assert_close(at[n_examples][name], alone[name])
    # more examples than the data: everything seen (6 batches · 4), as the original
    every = _direct_faithful_fisher(model, batches)
    for name in every:
        torch.testing.assert_close(at[100][name], every[name], rtol=1e-5, atol=1e-10)
    with pytest.raises(ValueError, match="unknown Fisher variant"):
        collect_fisher_weights(model, batches, 4, variant="empirical")


def _direct_gram(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).double()
    return (x.T @ x / x.shape[0]).float()


@pytest.mark.parametrize("exclude_padding", [False, True])
def test_regmean_grams_match_hidden_states(exclude_padding):
    model = _model(seed=4)
    batches = _batches(4, 3)
    # 7 examples, bs 3: batches are taken while fewer than 7 examples were seen → 3 batches
    grams = collect_regmean_grams(
        model, batches, 7, exclude_param_names_regex=EXCLUDE, exclude_padding=exclude_padding
    )
    expected_names = {
        n
        for n in merged_param_names(model, EXCLUDE)
        if n in merged_linear_modules(model, merged_param_names(model, EXCLUDE))
    }
    assert set(grams) == expected_names and "bert.pooler.dense.weight" in grams
    assert not any("classifier" in n for n in grams)
    with torch.no_grad():
        outs = [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
                for b in batches[:3]]  # fmt: skip
    masks = [b["attention_mask"].bool() for b in batches[:3]]
    # inputs of layer 0's query/key/value = the embedding output (hidden_states[0])
    h0 = [o.hidden_states[0] for o in outs]
    rows = (
        torch.cat([h[m] for h, m in zip(h0, masks)])
        if exclude_padding
        else torch.cat([h.reshape(-1, 16) for h in h0])
    )
    for proj in ("query", "key", "value"):
        torch.testing.assert_close(grams[f"bert.encoder.layer.0.attention.self.{proj}.weight"], _direct_gram(rows),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
    # the pooler sees the [CLS] vectors of the last layer (2-D input: padding does not apply)
    cls = torch.cat([o.hidden_states[-1][:, 0] for o in outs])
    torch.testing.assert_close(grams["bert.pooler.dense.weight"], _direct_gram(cls), rtol=1e-5, atol=1e-6)
    for name, g in grams.items():
        module = merged_linear_modules(model, [name])[name]
        assert g.shape == (module.in_features, module.in_features)
        torch.testing.assert_close(g, g.T)
        assert torch.linalg.eigvalsh(g.double()).min() > -1e-5  # positive semi-definite


def test_padding_changes_the_gram_and_snapshots_match():
    model = _model(seed=5)
    batches = _batches(3, 4)
    with_pad = collect_regmean_grams(model, batches, 8, exclude_param_names_regex=EXCLUDE)
    without = collect_regmean_grams(
        model, batches, 8, exclude_param_names_regex=EXCLUDE, exclude_padding=True
    )
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(with_pad[name], without[name])
    at = collect_regmean_grams_at(model, batches, [4, 8], exclude_param_names_regex=EXCLUDE)
    torch.testing.assert_close(at[8][name], with_pad[name])
    torch.testing.assert_close(
        at[4][name], collect_regmean_grams(model, batches, 4, exclude_param_names_regex=EXCLUDE)[name]
    )
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed


def test_statistics_feed_the_core_merges():
    pre = _model(seed=0)
    models = [_model(seed=s) for s in (10, 11)]
    for m in models:  # make them "fine-tuned" versions of pre: pre + a small delta
        with torch.no_grad():
            for p, q in zip(m.parameters(), pre.parameters()):
                p.copy_(q + 0.05 * (p - q))
    batches = [_batches(3, 4, seed=i) for i in range(2)]
    sds = [{n: p.detach() for n, p in _kept(m)} for m in models]
    fishers = [
        collect_fisher_weights(m, b, 8, exclude_param_names_regex=EXCLUDE) for m, b in zip(models, batches)
    ]
    grams = [
        collect_regmean_grams(m, b, 8, exclude_param_names_regex=EXCLUDE) for m, b in zip(models, batches)
    ]
    merged_f = fisher_merging(sds, fishers, normalize_fisher_weight=False)
    merged_r = regmean_merging(sds, grams, reduce_non_diagonal_ratio=0.9)
    for n in sds[0]:
        lo, hi = torch.minimum(sds[0][n], sds[1][n]), torch.maximum(sds[0][n], sds[1][n])
        assert bool(((merged_f[n] >= lo - 1e-6) & (merged_f[n] <= hi + 1e-6)).all()), (
            n
        )  # a convex combination
        if n not in grams[0]:
            torch.testing.assert_close(merged_r[n], (sds[0][n] + sds[1][n]) / 2)
    # RegMean of a layer: solves (Σ G_i) W^T = Σ G_i W_i^T
    n = "bert.encoder.layer.0.attention.self.query.weight"
    scale = torch.full((16, 16), 0.9).fill_diagonal_(1.0)
    g = [gr[n] * scale for gr in grams]
    torch.testing.assert_close(
        (g[0] + g[1]) @ merged_r[n].T, g[0] @ sds[0][n].T + g[1] @ sds[1][n].T, rtol=1e-4, atol=1e-5
    )


def test_masked_models_for_statistics_match_mask_merging():
    """The merge script computes DARE + Fisher/RegMean statistics on mask_model_weights(..., model_index=i):
    those must be the very models mask_merging merges."""
    pre = {n: p.detach() for n, p in _kept(_model(seed=0))}
    fts = [{n: p.detach() for n, p in _kept(_model(seed=s))} for s in (1, 2)]
    via_core = mask_merging(pre, fts, "average_merging", [0.5, 0.5], use_weight_rescale=True, seed=7)
    masked = [mask_model_weights(ft, pre, weight_mask_rate=0.5, use_weight_rescale=True, seed=7, model_index=i)
              for i, ft in enumerate(fts)]  # fmt: skip
    by_hand = average_merging(masked)
    for n in via_core:
        assert torch.equal(via_core[n], by_hand[n]), n
    assert any(not torch.equal(masked[0][n], fts[0][n]) for n in pre)  # masking did something
