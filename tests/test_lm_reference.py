"""The language-model task's reference numbers (entropy floor, order-k count model) and the
engine's last-epoch change, checked against plain dict counting and the curves themselves."""

import math
from collections import Counter, defaultdict

import pytest
import torch

from optlab import engine
from optlab.config import RunConfig
from optlab.data.synthetic import prepare_markov
from optlab.data.text import load_text
from optlab.metrics.ngram import ngram_baseline


def _reference(train: list[int], test: list[int], vocab: int, order: int) -> tuple[float, float]:
    """Dict counting: most frequent next token per context (ties smallest), add-one bits."""
    nxt: dict[tuple, Counter] = defaultdict(Counter)
    for i in range(order, len(train)):
        nxt[tuple(train[i - order:i])][train[i]] += 1
    overall = Counter(train)
    fallback = min(t for t, c in overall.items() if c == max(overall.values()))
    hits, bits = 0, 0.0
    for i in range(order, len(test)):
        c = nxt.get(tuple(test[i - order:i]), Counter())
        if c:
            top = max(c.values())
            pred = min(t for t, n in c.items() if n == top)
        else:
            pred = fallback
        hits += pred == test[i]
        bits -= math.log2((c[test[i]] + 1) / (sum(c.values()) + vocab))
    n = len(test) - order
    return hits / n, bits / n


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_ngram_matches_dict_counting(order):
    g = torch.Generator().manual_seed(order)
    vocab = 7
    train = torch.randint(0, vocab, (3000,), generator=g)
    train[::5] = 3  # skewed, so ties and argmax both matter
    test = torch.randint(0, vocab, (500,), generator=g)
    got = ngram_baseline(train, test, vocab, order)
    acc, bits = _reference(train.tolist(), test.tolist(), vocab, order)
    assert got["ngram_order"] == order
    assert got["ngram_test_acc"] == pytest.approx(acc, abs=1e-12)
    assert got["ngram_test_bits"] == pytest.approx(bits, rel=1e-12)


def test_ngram_unseen_contexts_fall_back_to_the_most_frequent_token():
    train = torch.tensor([0, 1, 0, 1, 0, 1, 2, 2])
    test = torch.tensor([3, 3, 1])  # context (3, 3) never seen: predicts the most frequent token (0 and 1 tie, 2 ties: 0)
    got = ngram_baseline(train, test, vocab=4, order=2)
    assert got["ngram_test_acc"] == 0.0
    assert got["ngram_test_bits"] == pytest.approx(2.0)  # 1 / vocab


def test_order2_count_model_on_the_order2_chain_is_near_its_entropy_rate(tmp_path):
    """On the synthetic order-2 Markov language the order-2 count model is the right model: with
    enough data its add-one bits sit just above the exact entropy rate and never below it by much."""
    meta = prepare_markov(tmp_path / "m.pt", n_tokens=200_000, vocab=8, seed=0)
    d = load_text(tmp_path / "m.pt")
    got = ngram_baseline(d.train, d.test, 8, 2)
    floor = meta["entropy_rate_bits"]
    assert floor - 0.03 < got["ngram_test_bits"] < floor + 0.05
    worse = ngram_baseline(d.train, d.test, 8, 0)  # unigram: far above the floor
    assert worse["ngram_test_bits"] > floor + 0.3


def _lm_cfg(**kw) -> RunConfig:
    base = dict(optimizer="adam", lr=0.01, arch="gpt", dataset="markov", depth=1, width=16, n_head=2, block_size=16,
                batch_size=8, epochs=3, steps_per_epoch=5, eval_tokens=512, log_every=5, device="cpu")
    base.update(kw)
    return RunConfig(**base)


def test_lm_run_records_floor_baseline_and_last_change(tmp_path):
    meta = prepare_markov(tmp_path / "m.pt", n_tokens=20_000, vocab=8, seed=1)
    d = load_text(tmp_path / "m.pt")
    res = engine.train(_lm_cfg(), data=d, progress=False)
    f = res.final
    assert f["entropy_floor_bits"] == meta["entropy_rate_bits"]
    n = (512 // 16) * 16 + 1  # the tokens evaluate scores
    ref = ngram_baseline(d.train, d.test[:n], 8, 2)
    assert f["ngram_test_acc"] == ref["ngram_test_acc"] and f["ngram_test_bits"] == ref["ngram_test_bits"]
    val = [v for (_, _, k, v) in res.curves if k == "val_loss"]
    assert len(val) == 3 and f["val_last_change"] == val[-1] - val[-2]


def test_last_change_is_nan_for_one_epoch_and_for_a_diverged_run(toy_splits):
    one = engine.train(RunConfig(optimizer="sgd", lr=0.1, depth=2, width=8, epochs=1, batch_size=64, device="cpu"),
                       data=toy_splits, progress=False)
    assert math.isnan(one.final["val_last_change"])
    two = engine.train(RunConfig(optimizer="sgd", lr=0.1, depth=2, width=8, epochs=2, batch_size=64, device="cpu"),
                       data=toy_splits, progress=False)
    acc = [v for (_, _, k, v) in two.curves if k == "val_acc"]
    assert two.final["val_last_change"] == acc[1] - acc[0]
    bad = engine.train(RunConfig(optimizer="sgd", lr=1e6, depth=2, width=8, epochs=3, batch_size=64, device="cpu"),
                       data=toy_splits, progress=False)
    assert bad.status == "diverged" and math.isnan(bad.final["val_last_change"])
    assert "ngram_test_acc" not in two.final  # classification tasks have no LM reference
