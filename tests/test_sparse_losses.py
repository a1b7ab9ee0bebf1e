"""infer.sparse_losses against sentence-transformers 6.2's sparse losses on a tiny random SPLADE model (a 2-layer BERT
MLM, float32) loaded by both libraries: every term of SpladeLoss to 1e-6 of its size (at least 1e-6 absolute)
and every parameter's gradient to 1e-4 relative; FlopsLoss on random sparse batches; the regularizer warm-up step by
step. Gradients that are zero in exact arithmetic (both sides only rounding noise, below 1e-5 of the largest) are
checked to be that small on both sides instead."""
import pytest
import torch
from sentence_transformers import SparseEncoder as STSparseEncoder
from sentence_transformers.sparse_encoder import losses as st
from sentence_transformers.sparse_encoder.callbacks.splade_callbacks import (SchedulerType,
                                                                             SpladeRegularizerWeightSchedulerCallback)

from infer.encoder import batch_features
from infer.losses import LossInputError, MarginMSELoss
from infer.sparse import SparseEncoder, tiny_splade_folder
from infer.sparse_losses import (FlopsLoss, SparseMultipleNegativesRankingLoss, SpladeLoss, SpladeWeightWarmup,
                                 warmed_up_weight)
from infer.texts import sample_texts


pytestmark = pytest.mark.usefixtures('one_torch_thread')


@pytest.fixture(scope='module')
def both(tmp_path_factory):
    folder = tiny_splade_folder(tmp_path_factory.mktemp('splade') / 'model', max_len=48)
    return SparseEncoder(folder), STSparseEncoder(str(folder), device='cpu')


def columns_of(n_columns, rows=6, seed=0):
    return [sample_texts(rows, seed=1000 * seed + c) for c in range(n_columns)]


def assert_same_gradients(ours, theirs):
    ours_g = {n: p.grad for n, p in ours.transformer.auto_model.named_parameters()}
    their_g = {n: p.grad for n, p in theirs[0].auto_model.named_parameters()}
    largest = max(g.norm() for g in their_g.values() if g is not None)
    for name, g in their_g.items():
        if g is None: assert ours_g[name] is None, name; continue
        if g.norm() < 1e-5 * largest: assert ours_g[name].norm() < 1e-5 * largest, name
        else: assert ((ours_g[name] - g).norm() / g.norm()).item() < 1e-4, name


def run_both(ours_model, their_model, ours_loss, their_loss, columns, labels=None):
    ours_model.zero_grad(); their_model.zero_grad()
    ours_parts = ours_loss.parts([batch_features(ours_model, c) for c in columns], labels)
    their_parts = their_loss([dict(batch_features(ours_model, c)) for c in columns], labels)
    assert set(ours_parts) == set(their_parts)
    for name, value in their_parts.items():   # float32 sums in another order: 1e-6 of the value (values reach ~30)
        assert abs(ours_parts[name].item() - value.item()) <= 1e-6 * max(1.0, abs(value.item())), (name, ours_parts[name], value)
    sum(ours_parts.values()).backward(); sum(their_parts.values()).backward()
    assert_same_gradients(ours_model, their_model)
    return ours_parts


@pytest.mark.parametrize('n_columns, weights, thresholds, documents_only', [
    (2, (3e-3, 5e-3), (None, None), False),
    (3, (3e-3, 5e-3), (100, 120), False),
    (4, (1e-2, None), (None, None), False),
    (3, (2e-3, None), (90, None), True),
])
def test_splade_loss_matches(both, n_columns, weights, thresholds, documents_only):
    ours, theirs = both
    kwargs = dict(document_regularizer_weight=weights[0], query_regularizer_weight=weights[1],
                  document_regularizer_threshold=thresholds[0], query_regularizer_threshold=thresholds[1],
                  use_document_regularizer_only=documents_only)
    parts = run_both(ours, theirs, SpladeLoss(ours, SparseMultipleNegativesRankingLoss(ours), **kwargs),
                     st.SpladeLoss(theirs, st.SparseMultipleNegativesRankingLoss(theirs), **kwargs),
                     columns_of(n_columns, seed=n_columns))
    assert parts['document_regularizer_loss'] > 0 and ('query_regularizer_loss' in parts) == (weights[1] is not None)


def test_splade_loss_around_margin_mse(both):
    ours, theirs = both
    labels = torch.randn(6, generator=torch.Generator().manual_seed(4)) * 3
    run_both(ours, theirs, SpladeLoss(ours, MarginMSELoss(ours), 3e-3, 5e-3),
             st.SpladeLoss(theirs, st.SparseMarginMSELoss(theirs), 3e-3, 5e-3), columns_of(3, seed=7), labels)


def test_forward_is_the_sum_of_the_parts(both):
    ours, _ = both
    loss = SpladeLoss(ours, SparseMultipleNegativesRankingLoss(ours), 3e-3, 5e-3)
    features = [batch_features(ours, c) for c in columns_of(3, seed=9)]
    with torch.no_grad():
        assert torch.allclose(loss(features), sum(loss.parts(features).values()))


@pytest.mark.parametrize('threshold', [None, 0, 3, 7.5])
def test_flops_matches_on_random_sparse_batches(threshold):
    g = torch.Generator().manual_seed(int(threshold or 0) + 1)
    for _ in range(3):
        weights = torch.relu(torch.randn(9, 300, generator=g) - 1.5) * torch.rand(9, 1, generator=g)
        weights[2] = 0
        ours = FlopsLoss(threshold=threshold).loss_from_embeddings(weights)
        theirs = st.FlopsLoss(None, threshold=threshold).compute_loss_from_embeddings(weights)
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)


@pytest.mark.parametrize('kind', ['linear', 'quadratic'])
@pytest.mark.parametrize('total_steps, ratio', [(1, 1 / 3), (10, 0.5), (301, 1 / 3), (1000, 1.0)])
def test_warmup_matches_the_callback(both, kind, total_steps, ratio):
    ours, theirs = both
    ours_loss = SpladeLoss(ours, SparseMultipleNegativesRankingLoss(ours), 3e-3, 5e-3)
    their_loss = st.SpladeLoss(theirs, st.SparseMultipleNegativesRankingLoss(theirs), 3e-3, 5e-3)
    warmup = SpladeWeightWarmup(ours_loss, total_steps, warmup_ratio=ratio, kind=kind)
    callback = SpladeRegularizerWeightSchedulerCallback(their_loss, scheduler_type=SchedulerType(kind), warmup_ratio=ratio)
    callback.warmup_steps = max(1, int(total_steps * ratio))
    assert warmup.warmup_steps == callback.warmup_steps
    for step in sorted({0, 1, total_steps // 3, total_steps // 2, total_steps - 1, total_steps}):
        document, query = warmup.at_step(step)
        assert document == callback._calculate_weight_value(step, 3e-3)
        assert query == callback._calculate_weight_value(step, 5e-3)
        assert (ours_loss.document_regularizer_weight, ours_loss.query_regularizer_weight) == (document, query)


def test_warmup_keeps_a_missing_query_weight_missing():
    assert warmed_up_weight(None, 3, 10) is None
    assert warmed_up_weight(2.0, 5, 10, 'linear') == 1.0 and warmed_up_weight(2.0, 5, 10) == 0.5
    assert warmed_up_weight(2.0, 10, 10) == 2.0


def test_config_names_the_settings(both):
    ours, _ = both
    config = SpladeLoss(ours, SparseMultipleNegativesRankingLoss(ours), 3e-3, 5e-3, document_regularizer_threshold=50).config
    assert config['loss'] == 'SparseMultipleNegativesRankingLoss' and config['scale'] == 1.0
    assert config['similarity_fct'] == 'dot_score'
    assert config['document_regularizer_weight'] == 3e-3 and config['query_regularizer_weight'] == 5e-3
    assert config['document_regularizer_threshold'] == 50 and 'query_regularizer_threshold' not in config


@pytest.mark.parametrize('make, message', [
    (lambda m: SpladeLoss(m, SparseMultipleNegativesRankingLoss(m), 1e-3, 1e-3, use_document_regularizer_only=True),
     'leave query_regularizer_weight as None'),
    (lambda m: SpladeLoss(m, torch.nn.MSELoss(), 1e-3), 'wraps a ranking loss'),
    (lambda m: SpladeLoss(m, SparseMultipleNegativesRankingLoss(m), float('nan')), 'must be >= 0'),
    (lambda m: SpladeLoss(m, SparseMultipleNegativesRankingLoss(m), 1e-3, -1e-3), 'query_regularizer_weight must be >= 0'),
    (lambda m: FlopsLoss(m, threshold=-1), 'threshold is a number of active words'),
    (lambda m: SpladeWeightWarmup(SparseMultipleNegativesRankingLoss(m), 10), 'warms up a SpladeLoss'),
    (lambda m: SpladeWeightWarmup(SpladeLoss(m, SparseMultipleNegativesRankingLoss(m), 1e-3), 10, warmup_ratio=0),
     'warmup_ratio must be in'),
    (lambda m: SpladeWeightWarmup(SpladeLoss(m, SparseMultipleNegativesRankingLoss(m), 1e-3), 0), 'total_steps'),
])
def test_bad_settings_are_refused(both, make, message):
    with pytest.raises(LossInputError, match=message): make(both[0])


def test_bad_batches_are_refused_before_the_model_runs(both, monkeypatch):
    ours, _ = both
    loss = SpladeLoss(ours, SparseMultipleNegativesRankingLoss(ours), 3e-3, 5e-3)
    features = [batch_features(ours, c) for c in columns_of(2, seed=3)]
    monkeypatch.setattr(ours, 'forward', lambda *a, **k: pytest.fail('the model ran'))
    with pytest.raises(LossInputError, match='text columns'): loss(features[:1])
    with pytest.raises(LossInputError, match='list of feature dicts'): loss(features[0])
    with pytest.raises(LossInputError, match=r'\[texts, vocab\]'): FlopsLoss().loss_from_embeddings(torch.ones(3))
