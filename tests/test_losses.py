"""Every loss of `infer.losses` gives sentence-transformers' loss and gradients, proved on a tiny random model.

A random two-layer BERT, 32 wide, carries the real bert-base-uncased tokenizer of all-MiniLM-L6-v2 (64 tokens);
sentence-transformers saves it (mean pooling) and both libraries load the folder. Dropout is off, so both see the
same function. Each case builds a loss in each library with the same hyperparameters, runs it on the same real texts
(dealt into the loss's columns, each library tokenizing its own) with the same labels, and calls `backward`. The values
agree within 1e-5 (relative, for values above 1) and every parameter's gradient within 1e-4 relative,
||g_infer - g_st|| / ||g_st||, in float32 on the CPU, on two seeds. Gradients that are zero in exact arithmetic are
held apart: the attention key biases' (a softmax ignores a constant added to a whole row) and, under losses of
Euclidean or Manhattan distances, the last LayerNorm's bias (it shifts every embedding alike); both libraries compute
rounding noise there, and both must keep it below 1e-5 of the largest gradient instead. A loss's own parameters (SoftmaxLoss's classifier, MSELoss's
projection) start from sentence-transformers' weights and their gradients are compared too. Where a loss draws sizes
or layers at random (MatryoshkaLoss's n_dims_per_step, AdaptiveLayerLoss's n_layers_per_step), both draw from
Python's `random` in the same way, so both are seeded alike and must agree exactly.

Beyond parity: the cached loss gives plain MNRL's gradient (also inside MatryoshkaLoss), replays dropout exactly and
leaves the caller's random state alone; hyperparameter names are sentence-transformers'; bad batches, labels and
settings raise `LossInputError` saying what to do.
"""
import random
import zlib

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer import losses as st
from sentence_transformers.sentence_transformer.losses.batch_hard_triplet import BatchHardTripletLossDistanceFunction as STMatrix
from sentence_transformers.sentence_transformer.losses.contrastive import SiameseDistanceMetric
from sentence_transformers.sentence_transformer.losses.triplet import TripletDistanceMetric
from sentence_transformers.util import dot_score, pairwise_cos_sim, pairwise_dot_score
from transformers import AutoTokenizer, BertConfig, BertModel

from infer import losses as L
from infer.encoder import SentenceEncoder, Transformer, batch_features, minilm_path
from infer.pooling import Pooling
from infer.texts import sample_texts

pytestmark = [pytest.mark.filterwarnings('ignore:.*were truncated:UserWarning'),
              pytest.mark.filterwarnings('ignore::DeprecationWarning'), pytest.mark.filterwarnings('ignore::FutureWarning'),
              pytest.mark.usefixtures('one_torch_thread')]

ROWS, DIM = 12, 32
TINY = dict(hidden_size=DIM, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=30522,
            max_position_embeddings=512, initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def save_tiny(path, seed, max_len=64):
    torch.manual_seed(seed)
    BertModel(BertConfig(**TINY)).save_pretrained(path / 'hf')
    AutoTokenizer.from_pretrained(minilm_path(), model_max_length=max_len).save_pretrained(path / 'hf')
    SentenceTransformer(str(path / 'hf'), device='cpu').save(str(path / 'st'))
    return SentenceEncoder(path / 'st'), SentenceTransformer(str(path / 'st'), device='cpu')


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    "The model both libraries train, a guide of the same vocabulary and length, and one with a shorter limit."
    return {name: save_tiny(tmp_path_factory.mktemp(name), seed, max_len)
            for name, seed, max_len in [('model', 0, 64), ('guide', 1, 64), ('short_guide', 2, 48)]}


def labels_of(kind, seed):
    g = torch.Generator().manual_seed(seed)
    return {None: lambda: None,
            'score': lambda: torch.rand(ROWS, generator=g) * 5,
            'ranks': lambda: torch.randint(0, 4, (ROWS,), generator=g).float(),  # ties: couples of equal labels drop out
            'unit': lambda: torch.rand(ROWS, generator=g),
            'binary': lambda: torch.randint(0, 2, (ROWS,), generator=g).float(),
            'class3': lambda: torch.randint(0, 3, (ROWS,), generator=g),
            'class4': lambda: torch.randint(0, 4, (ROWS,), generator=g),
            'teacher': lambda: torch.randn(ROWS, DIM, generator=g),
            'teacher3d': lambda: torch.randn(ROWS, 2, DIM, generator=g),
            'teacher20': lambda: torch.randn(ROWS, 20, generator=g),
            'margin': lambda: torch.randn(ROWS, generator=g) * 3,
            'scores3': lambda: torch.randn(ROWS, 3, generator=g) * 3}[kind]()


def st_mnrl(m, **kw): return st.MultipleNegativesRankingLoss(m, **kw)

# id: (infer loss, sentence-transformers loss, text columns, labels); each maker gets (model, guide, short_guide)
CASES = {
    'mnrl': (lambda m, g, s: L.MultipleNegativesRankingLoss(m), lambda m, g, s: st_mnrl(m), 2, None),
    'mnrl-2-negatives': (lambda m, g, s: L.MultipleNegativesRankingLoss(m), lambda m, g, s: st_mnrl(m), 4, None),
    'mnrl-dot': (lambda m, g, s: L.MultipleNegativesRankingLoss(m, scale=1.0, similarity_fct='dot'),
                 lambda m, g, s: st_mnrl(m, scale=1.0, similarity_fct=dot_score), 3, None),
    'mnrl-gte': (lambda m, g, s: L.MultipleNegativesRankingLoss(m, directions=L._DIRECTIONS),
                 lambda m, g, s: st_mnrl(m, directions=L._DIRECTIONS), 3, None),
    'mnrl-hard-in-batch': (lambda m, g, s: L.MultipleNegativesRankingLoss(m, hardness_mode='in_batch_negatives', hardness_strength=9),
                           lambda m, g, s: st_mnrl(m, hardness_mode='in_batch_negatives', hardness_strength=9), 3, None),
    'mnrl-hard-negatives': (lambda m, g, s: L.MultipleNegativesRankingLoss(m, hardness_mode='hard_negatives', hardness_strength=5),
                            lambda m, g, s: st_mnrl(m, hardness_mode='hard_negatives', hardness_strength=5), 3, None),
    'mnrl-hard-all': (lambda m, g, s: L.MultipleNegativesRankingLoss(m, hardness_mode='all_negatives', hardness_strength=5,
                                                                     directions=('query_to_doc', 'doc_to_query')),
                      lambda m, g, s: st_mnrl(m, hardness_mode='all_negatives', hardness_strength=5,
                                              directions=('query_to_doc', 'doc_to_query')), 3, None),
    'symmetric': (lambda m, g, s: L.MultipleNegativesSymmetricRankingLoss(m), lambda m, g, s: st.MultipleNegativesSymmetricRankingLoss(m), 2, None),
    'cached': (lambda m, g, s: L.CachedMultipleNegativesRankingLoss(m, mini_batch_size=5),
               lambda m, g, s: st.CachedMultipleNegativesRankingLoss(m, mini_batch_size=5), 3, None),
    'cached-gte-hard': (lambda m, g, s: L.CachedMultipleNegativesRankingLoss(m, mini_batch_size=5, directions=L._DIRECTIONS,
                                                                            hardness_mode='all_negatives', hardness_strength=5),
                        lambda m, g, s: st.CachedMultipleNegativesRankingLoss(m, mini_batch_size=5, directions=L._DIRECTIONS,
                                                                              hardness_mode='all_negatives', hardness_strength=5), 3, None),
    'gist': (lambda m, g, s: L.GISTEmbedLoss(m, g), lambda m, g, s: st.GISTEmbedLoss(m, g), 3, None),
    'gist-relative': (lambda m, g, s: L.GISTEmbedLoss(m, g, margin_strategy='relative', margin=0.05, contrast_anchors=False),
                      lambda m, g, s: st.GISTEmbedLoss(m, g, margin_strategy='relative', margin=0.05, contrast_anchors=False), 2, None),
    'gist-retokenized': (lambda m, g, s: L.GISTEmbedLoss(m, s, margin=0.02), lambda m, g, s: st.GISTEmbedLoss(m, s, margin=0.02), 2, None),
    'cosent': (lambda m, g, s: L.CoSENTLoss(m), lambda m, g, s: st.CoSENTLoss(m), 2, 'score'),
    'cosent-dot-ties': (lambda m, g, s: L.CoSENTLoss(m, scale=1.0, similarity_fct='dot'),
                        lambda m, g, s: st.CoSENTLoss(m, scale=1.0, similarity_fct=pairwise_dot_score), 2, 'ranks'),
    'angle': (lambda m, g, s: L.AnglELoss(m), lambda m, g, s: st.AnglELoss(m), 2, 'score'),
    'angle-triplets': (lambda m, g, s: L.AnglELoss(m), lambda m, g, s: st.AnglELoss(m), 3, None),
    'angle-negatives-labels': (lambda m, g, s: L.AnglELoss(m), lambda m, g, s: st.AnglELoss(m), 4, 'unit'),
    'cosine-similarity': (lambda m, g, s: L.CosineSimilarityLoss(m), lambda m, g, s: st.CosineSimilarityLoss(m), 2, 'unit'),
    'contrastive': (lambda m, g, s: L.ContrastiveLoss(m), lambda m, g, s: st.ContrastiveLoss(m), 2, 'binary'),
    'contrastive-euclidean': (lambda m, g, s: L.ContrastiveLoss(m, 'euclidean', margin=4.0, size_average=False),
                              lambda m, g, s: st.ContrastiveLoss(m, SiameseDistanceMetric.EUCLIDEAN, 4.0, False), 2, 'binary'),
    'online-contrastive': (lambda m, g, s: L.OnlineContrastiveLoss(m, margin=0.9), lambda m, g, s: st.OnlineContrastiveLoss(m, margin=0.9), 2, 'binary'),
    'online-contrastive-manhattan': (lambda m, g, s: L.OnlineContrastiveLoss(m, 'manhattan', margin=30.0),
                                     lambda m, g, s: st.OnlineContrastiveLoss(m, SiameseDistanceMetric.MANHATTAN, 30.0), 2, 'binary'),
    'softmax': (lambda m, g, s: L.SoftmaxLoss(m, DIM, 3), lambda m, g, s: st.SoftmaxLoss(m, DIM, 3), 2, 'class3'),
    'softmax-multiplication': (lambda m, g, s: L.SoftmaxLoss(m, DIM, 3, concatenation_sent_rep=False, concatenation_sent_multiplication=True),
                               lambda m, g, s: st.SoftmaxLoss(m, DIM, 3, concatenation_sent_rep=False,
                                                              concatenation_sent_multiplication=True), 2, 'class3'),
    'triplet': (lambda m, g, s: L.TripletLoss(m), lambda m, g, s: st.TripletLoss(m), 3, None),
    'triplet-cosine': (lambda m, g, s: L.TripletLoss(m, 'cosine', triplet_margin=0.3),
                       lambda m, g, s: st.TripletLoss(m, TripletDistanceMetric.COSINE, 0.3), 3, None),
    'batch-all': (lambda m, g, s: L.BatchAllTripletLoss(m), lambda m, g, s: st.BatchAllTripletLoss(m), 1, 'class4'),
    'batch-all-cosine': (lambda m, g, s: L.BatchAllTripletLoss(m, 'cosine', margin=0.3),
                         lambda m, g, s: st.BatchAllTripletLoss(m, STMatrix.cosine_distance, margin=0.3), 1, 'class4'),
    'batch-hard': (lambda m, g, s: L.BatchHardTripletLoss(m), lambda m, g, s: st.BatchHardTripletLoss(m), 1, 'class4'),
    'batch-hard-cosine': (lambda m, g, s: L.BatchHardTripletLoss(m, 'cosine', margin=0.2),
                          lambda m, g, s: st.BatchHardTripletLoss(m, STMatrix.cosine_distance, margin=0.2), 1, 'class4'),
    'batch-semi-hard': (lambda m, g, s: L.BatchSemiHardTripletLoss(m), lambda m, g, s: st.BatchSemiHardTripletLoss(m), 1, 'class4'),
    'batch-semi-hard-cosine': (lambda m, g, s: L.BatchSemiHardTripletLoss(m, 'cosine', margin=0.05),
                               lambda m, g, s: st.BatchSemiHardTripletLoss(m, STMatrix.cosine_distance, margin=0.05), 1, 'class4'),
    'batch-hard-soft-margin': (lambda m, g, s: L.BatchHardSoftMarginTripletLoss(m), lambda m, g, s: st.BatchHardSoftMarginTripletLoss(m), 1, 'class4'),
    'mse': (lambda m, g, s: L.MSELoss(m), lambda m, g, s: st.MSELoss(m), 2, 'teacher'),
    'mse-per-column': (lambda m, g, s: L.MSELoss(m), lambda m, g, s: st.MSELoss(m), 2, 'teacher3d'),
    'mse-projection': (lambda m, g, s: L.MSELoss(m, projection_dim=20), lambda m, g, s: st.MSELoss(m, projection_dim=20), 1, 'teacher20'),
    'margin-mse': (lambda m, g, s: L.MarginMSELoss(m), lambda m, g, s: st.MarginMSELoss(m), 3, 'margin'),
    'margin-mse-scores-cosine': (lambda m, g, s: L.MarginMSELoss(m, 'cosine'), lambda m, g, s: st.MarginMSELoss(m, pairwise_cos_sim), 4, 'scores3'),
    'distill-kl': (lambda m, g, s: L.DistillKLDivLoss(m), lambda m, g, s: st.DistillKLDivLoss(m), 4, 'scores3'),
    'distill-kl-temperatures': (lambda m, g, s: L.DistillKLDivLoss(m, 'cosine', student_temperature=0.05, teacher_temperature=2.0),
                                lambda m, g, s: st.DistillKLDivLoss(m, pairwise_cos_sim, student_temperature=0.05, teacher_temperature=2.0),
                                4, 'scores3'),
    'matryoshka-mnrl': (lambda m, g, s: L.MatryoshkaLoss(m, L.MultipleNegativesRankingLoss(m), [32, 16, 8], [1, 0.5, 0.25]),
                        lambda m, g, s: st.MatryoshkaLoss(m, st_mnrl(m), [32, 16, 8], [1, 0.5, 0.25]), 3, None),
    'matryoshka-cosent-drawn': (lambda m, g, s: L.MatryoshkaLoss(m, L.CoSENTLoss(m), [8, 32, 16, 4], n_dims_per_step=2),
                                lambda m, g, s: st.MatryoshkaLoss(m, st.CoSENTLoss(m), [8, 32, 16, 4], n_dims_per_step=2), 2, 'score'),
    'matryoshka-mse-cut-labels': (lambda m, g, s: L.MatryoshkaLoss(m, L.MSELoss(m), [32, 12]),
                                  lambda m, g, s: st.MatryoshkaLoss(m, st.MSELoss(m), [32, 12]), 2, 'teacher'),
    'matryoshka-gist': (lambda m, g, s: L.MatryoshkaLoss(m, L.GISTEmbedLoss(m, g), [32, 16]),
                        lambda m, g, s: st.MatryoshkaLoss(m, st.GISTEmbedLoss(m, g), [32, 16]), 2, None),
    'matryoshka-cached': (lambda m, g, s: L.MatryoshkaLoss(m, L.CachedMultipleNegativesRankingLoss(m, mini_batch_size=5), [32, 8], [1, 0.3]),
                          lambda m, g, s: st.MatryoshkaLoss(m, st.CachedMultipleNegativesRankingLoss(m, mini_batch_size=5), [32, 8], [1, 0.3]),
                          3, None),
    'matryoshka-2d': (lambda m, g, s: L.AdaptiveLayerLoss(m, L.MatryoshkaLoss(m, L.MultipleNegativesRankingLoss(m), [32, 16]),
                                                          n_layers_per_step=-1),
                      lambda m, g, s: st.Matryoshka2dLoss(m, st_mnrl(m), [32, 16], n_layers_per_step=-1, n_dims_per_step=-1), 2, None),
    'adaptive-mnrl-all-layers': (lambda m, g, s: L.AdaptiveLayerLoss(m, L.MultipleNegativesRankingLoss(m), n_layers_per_step=-1),
                                 lambda m, g, s: st.AdaptiveLayerLoss(m, st_mnrl(m), n_layers_per_step=-1), 3, None),
    'adaptive-cosent-drawn-log': (lambda m, g, s: L.AdaptiveLayerLoss(m, L.CoSENTLoss(m), layer_weighting='log', last_layer_weight=2.0,
                                                                      prior_layers_weight=0.5, kl_div_weight=3.0, kl_temperature=0.7),
                                  lambda m, g, s: st.AdaptiveLayerLoss(m, st.CoSENTLoss(m), layer_weighting='log', last_layer_weight=2.0,
                                                                       prior_layers_weight=0.5, kl_div_weight=3.0, kl_temperature=0.7),
                                  2, 'score'),
    'adaptive-batch-hard-no-kl': (lambda m, g, s: L.AdaptiveLayerLoss(m, L.BatchHardTripletLoss(m), n_layers_per_step=2,
                                                                      layer_weighting='linear', kl_temperature=0.0),
                                  lambda m, g, s: st.AdaptiveLayerLoss(m, st.BatchHardTripletLoss(m), n_layers_per_step=2,
                                                                       layer_weighting='linear', kl_temperature=0.0), 1, 'class4'),
}


def batch(models, case_id, seed, n_columns):
    "Real texts dealt into `n_columns` columns of ROWS rows, tokenized by each library."
    (ours, theirs) = models['model']
    texts = sample_texts(ROWS * n_columns, seed=zlib.crc32(f'{case_id}/{seed}'.encode()))
    columns = [texts[i::n_columns] for i in range(n_columns)]
    return [batch_features(ours, c) for c in columns], [theirs.preprocess(c) for c in columns]


def own_parameters(loss, models):
    "A loss's parameters that are none of the models' (SoftmaxLoss's classifier, MSELoss's projection), by name."
    theirs = {id(p) for m in models for p in m.parameters()}
    return {k: p for k, p in loss.named_parameters() if id(p) not in theirs}


def relative_errors(mine: dict, reference: dict) -> dict:
    """||mine - reference|| / ||reference|| per parameter. A gradient that is zero in exact arithmetic is rounding noise
    in either library: the attention key biases' always, and the last LayerNorm's bias under a loss that sees only
    differences of embeddings (Euclidean or Manhattan distances, which a shift of every embedding leaves alone). Where
    the reference gradient is below 1e-5 of the largest, ours must be too, and the pair is left out."""
    assert set(mine) == set(reference)
    scale = max(g.norm() for g in reference.values())
    assert scale > 0, 'the loss sends no gradient into the model on this batch: the case tests nothing'
    errors = {}
    for k, g in reference.items():
        if g.norm() < 1e-5 * scale: assert mine[k].norm() < 1e-5 * scale, k
        else: errors[k] = ((mine[k] - g).norm() / g.norm()).item()
    return errors


def run(loss, features, labels, draw_seed):
    random.seed(draw_seed)
    value = loss(features, labels)
    value.backward()
    return value.item()


@pytest.mark.parametrize('seed', [0, 1])
@pytest.mark.parametrize('case_id', CASES)
def test_matches_sentence_transformers(models, case_id, seed):
    (ours, theirs), guides = models['model'], (models['guide'], models['short_guide'])
    make_ours, make_theirs, n_columns, label_kind = CASES[case_id]
    mine = make_ours(ours, *(g[0] for g in guides))
    reference = make_theirs(theirs, *(g[1] for g in guides))
    own = own_parameters(mine, [ours, *(g[0] for g in guides)])
    theirs_own = own_parameters(reference, [theirs, *(g[1] for g in guides)])
    assert [k.split('.')[-1] for k in own] == [k.split('.')[-1] for k in theirs_own]
    with torch.no_grad():
        for p, q in zip(own.values(), theirs_own.values()): p.copy_(q)
    ours.zero_grad(); theirs.zero_grad(); mine.zero_grad(); reference.zero_grad()
    f_ours, f_theirs = batch(models, case_id, seed, n_columns)
    labels = labels_of(label_kind, seed)
    value, expected = run(mine, f_ours, labels, seed), run(reference, f_theirs, labels, seed)
    assert abs(value - expected) <= 1e-5 * max(1.0, abs(expected)), (value, expected)
    g_ours = {k: p.grad for k, p in ours.transformer.auto_model.named_parameters() if p.grad is not None}
    g_theirs = {k: p.grad for k, p in theirs[0].auto_model.named_parameters() if p.grad is not None}
    g_ours.update({f'loss.{k}': p.grad for k, p in own.items()})
    g_theirs.update({f'loss.{k}': p.grad for k, p in zip(own, theirs_own.values())})
    errors = relative_errors(g_ours, g_theirs)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-4, (worst, errors[worst])


@pytest.mark.parametrize('case_id', CASES)
def test_hyperparameter_names_are_sentence_transformers(models, case_id):
    make_ours, make_theirs, *_ = CASES[case_id]
    args = models['model'], models['guide'], models['short_guide']
    mine, reference = make_ours(*(a[0] for a in args)), make_theirs(*(a[1] for a in args))
    assert set(mine.config) <= set(reference.get_config_dict()), set(mine.config) - set(reference.get_config_dict())
    assert repr(mine).startswith(type(mine).__name__ + '(')


# the cached loss


def column_features(model, seeds, n=16):
    return [batch_features(model, sample_texts(n, seed=s)) for s in seeds]


def gradient_of(model, loss, features):
    model.zero_grad()
    value = loss(features)
    value.backward()
    return value.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('mini_batch_size,options', [
    (1, {}), (5, {}), (16, {}), (64, {}), (5, dict(directions=L._DIRECTIONS)),
    (3, dict(directions=('query_to_doc', 'doc_to_query'), partition_mode='per_direction', similarity_fct='dot', scale=1.0))])
def test_cached_gives_the_plain_gradient(models, mini_batch_size, options):
    ours = models['model'][0]
    features = column_features(ours, (21, 22, 23), n=10)
    v1, g1 = gradient_of(ours, L.MultipleNegativesRankingLoss(ours, **options), features)
    v2, g2 = gradient_of(ours, L.CachedMultipleNegativesRankingLoss(ours, mini_batch_size=mini_batch_size, **options), features)
    assert abs(v1 - v2) < 1e-5
    assert max(relative_errors(g2, g1).values()) < 1e-4
    with torch.no_grad():
        assert abs(L.CachedMultipleNegativesRankingLoss(ours, mini_batch_size=mini_batch_size, **options)(features).item() - v1) < 1e-5


def test_matryoshka_around_cached_gives_the_plain_gradient(models):
    ours = models['model'][0]
    features = column_features(ours, (24, 25))
    dims, weights = [32, 16, 4], [1.0, 0.5, 2.0]
    v1, g1 = gradient_of(ours, L.MatryoshkaLoss(ours, L.MultipleNegativesRankingLoss(ours), dims, weights), features)
    v2, g2 = gradient_of(ours, L.MatryoshkaLoss(ours, L.CachedMultipleNegativesRankingLoss(ours, mini_batch_size=3), dims, weights), features)
    assert abs(v1 - v2) < 1e-5 and max(relative_errors(g2, g1).values()) < 1e-4


def test_cached_replays_dropout_and_leaves_the_random_state_alone(models):
    ours = models['model'][0]
    torch.manual_seed(3)
    cfg = BertConfig(**{**TINY, 'hidden_dropout_prob': 0.1, 'attention_probs_dropout_prob': 0.1})
    noisy = SentenceEncoder(modules=[Transformer(BertModel(cfg), ours.tokenizer), Pooling(DIM, 'mean')]).train()
    features = column_features(noisy, (26, 27), n=12)
    loss = L.CachedMultipleNegativesRankingLoss(noisy, mini_batch_size=4)
    torch.manual_seed(11)
    noisy.zero_grad()
    value = loss(features)
    state_after_forward = torch.get_rng_state()
    value.backward()
    assert torch.equal(torch.get_rng_state(), state_after_forward)  # the replay ran in a fork
    cached = {k: p.grad.clone() for k, p in noisy.named_parameters() if p.grad is not None}
    # the reference embeds the same mini-batches in the same order from the same seed, with gradients
    torch.manual_seed(11)
    noisy.zero_grad()
    embeddings = [torch.cat([noisy(dict(b))['sentence_embedding'] for b in L._mini_batches(f, 4)]) for f in features]
    L.MultipleNegativesRankingLoss(noisy).loss_from_embeddings(embeddings).backward()
    assert max(relative_errors(cached, {k: p.grad for k, p in noisy.named_parameters() if p.grad is not None}).values()) < 1e-4
    # and without the replayed random state the gradient would differ: dropout is really on
    torch.manual_seed(12)
    noisy.zero_grad()
    L.MultipleNegativesRankingLoss(noisy)(features).backward()
    assert max(relative_errors(cached, {k: p.grad for k, p in noisy.named_parameters() if p.grad is not None}).values()) > 1e-2


def test_cached_runs_the_model_on_one_mini_batch_at_a_time_with_gradients(models):
    ours = models['model'][0]
    rows_with_grad = []
    hook = ours.register_forward_hook(lambda m, args, out: rows_with_grad.append(len(out['sentence_embedding']))
                                      if torch.is_grad_enabled() else None)
    try:
        L.CachedMultipleNegativesRankingLoss(ours, mini_batch_size=4)(column_features(ours, (28, 29), n=10)).backward()
    finally:
        hook.remove()
    assert rows_with_grad == [4, 4, 2, 4, 4, 2]


def test_mini_batches_trim_padding_and_keep_other_features(models):
    ours = models['model'][0]
    texts = ['a', 'a b c d e f g h i j k l', 'b', 'c']
    features = {**batch_features(ours, texts), 'prompt_length': 3}
    parts = L._mini_batches(features, 2)
    assert [tuple(p['input_ids'].shape) for p in parts] == [(2, features['input_ids'].shape[1]), (2, 3)]
    assert all(p['prompt_length'] == 3 for p in parts)


# combining losses


def test_weighted_losses_sum_their_terms_and_gradients(models):
    ours = models['model'][0]
    features = column_features(ours, (30, 31, 32, 33), n=8)
    scores = torch.rand(8, generator=torch.Generator().manual_seed(0))
    mnrl, cosent = L.MultipleNegativesRankingLoss(ours), L.CoSENTLoss(ours)
    mixed = L.WeightedLosses({'retrieval': (mnrl, 1.0, [0, 1, 2]), 'sts': (cosent, 0.25, [0, 3])})
    value, g = gradient_of(ours, lambda f: mixed(f, {'sts': scores}), features)
    v1, g1 = gradient_of(ours, lambda f: mnrl(f[:3]), features)
    v2, g2 = gradient_of(ours, lambda f: cosent([f[0], f[3]], scores), features)
    assert abs(value - (v1 + 0.25 * v2)) < 1e-5
    assert max(relative_errors(g, {k: g1[k] + 0.25 * g2[k] for k in g1}).values()) < 1e-4
    assert mixed.config['sts'] == dict(loss='CoSENTLoss', weight=0.25, columns=(0, 3), scale=20.0, similarity_fct='pairwise_cos_sim')
    with pytest.raises(L.LossInputError, match=r"'sts' reads columns \(0, 3\) and the batch has 3 columns"):
        mixed(features[:3], scores)


def test_the_guide_is_not_trained(models):
    ours, guide = models['model'][0], models['guide'][0]
    loss = L.GISTEmbedLoss(ours, guide)
    assert {id(p) for p in loss.parameters()} == {id(p) for p in ours.parameters()}
    loss(column_features(ours, (34, 35), n=6)).backward()
    assert all(p.grad is None for p in guide.parameters())


# bad input


BAD_COLUMNS = [(L.MultipleNegativesRankingLoss, 1, r'takes 2 or more text columns \(anchor, positive, negative_1'),
               (L.CachedMultipleNegativesRankingLoss, 1, 'takes 2 or more text columns'),
               (L.CoSENTLoss, 3, r'takes 2 text columns \(sentence_1, sentence_2\), and this batch has 3'),
               (L.TripletLoss, 2, r'takes 3 text columns \(anchor, positive, negative\)'),
               (L.BatchHardTripletLoss, 2, r'takes 1 text columns \(sentence,\)'),
               (L.MarginMSELoss, 2, r'takes 3 or more text columns \(query, positive, negative_1'),
               (L.DistillKLDivLoss, 2, 'takes 3 or more text columns'),
               (lambda m: L.GISTEmbedLoss(m, m), 4, 'takes 2 to 3 text columns'),
               (lambda m: L.MatryoshkaLoss(m, L.TripletLoss(m), [16]), 2, 'TripletLoss takes 3 text columns'),
               (lambda m: L.AdaptiveLayerLoss(m, L.CoSENTLoss(m)), 1, 'CoSENTLoss takes 2 text columns')]


@pytest.mark.parametrize('make,n_columns,message', BAD_COLUMNS)
def test_wrong_number_of_columns(models, make, n_columns, message):
    ours = models['model'][0]
    with pytest.raises(L.LossInputError, match=message):
        make(ours)(column_features(ours, range(n_columns), n=4), torch.zeros(4))


BAD_LABELS = [(L.CoSENTLoss, 2, None, r'CoSENTLoss needs labels: a similarity score per pair'),
              (L.CoSENTLoss, 2, torch.zeros(4, 2), r'shape \(4,\), and got shape \(4, 2\)'),
              (L.CoSENTLoss, 2, torch.zeros(5), r'shape \(4,\), and got shape \(5,\)'),
              (L.AnglELoss, 2, None, 'AnglELoss needs labels'),
              (L.CosineSimilarityLoss, 2, None, 'needs labels: a target cosine similarity per pair'),
              (L.ContrastiveLoss, 2, torch.tensor([0., 1., 2., 1.]), 'labels between 0 and 1'),
              (L.OnlineContrastiveLoss, 2, torch.tensor([0., 1., 0.5, 1.]), 'labels of 0 or 1'),
              (lambda m: L.SoftmaxLoss(m, num_labels=3), 2, None, 'needs labels: a class index per pair'),
              (L.BatchAllTripletLoss, 1, None, 'needs labels: a class label per text'),
              (L.BatchSemiHardTripletLoss, 1, torch.zeros(2, 2), r'shape \(4,\), and got shape \(2, 2\)'),
              (L.MSELoss, 2, None, "MSELoss needs labels: the teacher's embeddings"),
              (L.MSELoss, 2, torch.zeros(4, 3, DIM), r'labels of shape \(4, dim\) or \(4, 2, dim\)'),
              (L.MSELoss, 2, torch.zeros(4, 7), 'pass projection_dim=7'),
              (L.MarginMSELoss, 3, None, "MarginMSELoss needs labels: the teacher's margins"),
              (L.MarginMSELoss, 4, torch.zeros(4, 4), r'labels of shape \(4, 2\) \(margins\) or \(4, 3\)'),
              (L.DistillKLDivLoss, 3, None, 'DistillKLDivLoss needs labels'),
              (L.DistillKLDivLoss, 3, torch.zeros(4), r'labels of shape \(4, 2\)'),
              (lambda m: L.MatryoshkaLoss(m, L.CoSENTLoss(m), [8]), 2, None, 'CoSENTLoss needs labels')]


@pytest.mark.parametrize('make,n_columns,labels,message', BAD_LABELS)
def test_missing_or_misshaped_labels(models, make, n_columns, labels, message):
    ours = models['model'][0]
    with pytest.raises(L.LossInputError, match=message):
        make(ours)(column_features(ours, range(n_columns), n=4), labels)


BAD_SETTINGS = [(lambda m: L.MultipleNegativesRankingLoss(m, similarity_fct='cosin'), "unknown similarity function 'cosin'"),
                (lambda m: L.CoSENTLoss(m, similarity_fct='jaccard'), "unknown similarity function 'jaccard'"),
                (lambda m: L.ContrastiveLoss(m, distance_metric='hamming'), "unknown distance 'hamming'"),
                (lambda m: L.BatchHardTripletLoss(m, distance_metric='manhattan'), "unknown distance 'manhattan'; use one of euclidean, cosine"),
                (lambda m: L.MultipleNegativesRankingLoss(m, scale=0), 'scale must be positive'),
                (lambda m: L.MultipleNegativesRankingLoss(m, directions=('doc_to_query',)), 'must include query_to_doc'),
                (lambda m: L.MultipleNegativesRankingLoss(m, directions=L._DIRECTIONS, partition_mode='per_direction'), "use partition_mode='joint'"),
                (lambda m: L.MultipleNegativesRankingLoss(m, hardness_mode='hardest'), 'hardness_mode must be one of'),
                (lambda m: L.CachedMultipleNegativesRankingLoss(m, mini_batch_size=0), 'mini_batch_size must be a positive'),
                (lambda m: L.GISTEmbedLoss(m, m, margin_strategy='percent'), "margin_strategy must be 'absolute' or 'relative'"),
                (lambda m: L.DistillKLDivLoss(m, temperature=0), 'temperature must be a positive number'),
                (lambda m: L.SoftmaxLoss(m, concatenation_sent_rep=False, concatenation_sent_difference=False), 'at least one of'),
                (lambda m: L.MatryoshkaLoss(m, L.CoSENTLoss(m), [64]), r"between 1 and the model's 32"),
                (lambda m: L.MatryoshkaLoss(m, L.CoSENTLoss(m), [32, 16], [1.0]), 'has 1 weights for 2 matryoshka_dims'),
                (lambda m: L.AdaptiveLayerLoss(m, L.CoSENTLoss(m), layer_weighting='cubic'), 'layer_weighting must be one of'),
                (lambda m: L.AdaptiveLayerLoss(m, L.CachedMultipleNegativesRankingLoss(m)), 'wrap MultipleNegativesRankingLoss instead'),
                (lambda m: L.WeightedLosses({}), 'needs at least one term')]


@pytest.mark.parametrize('make,message', BAD_SETTINGS)
def test_bad_settings_are_refused_when_the_loss_is_built(models, make, message):
    with pytest.raises(L.LossInputError, match=message):
        make(models['model'][0])


def test_other_bad_batches(models):
    ours = models['model'][0]
    features = column_features(ours, (1, 2), n=4)
    with pytest.raises(L.LossInputError, match=r'wrap a single column in a list: \[features\]'):
        L.MultipleNegativesRankingLoss(ours)(features[0])
    with pytest.raises(L.LossInputError, match=r'the text columns have \[4, 5\] rows'):
        L.MultipleNegativesRankingLoss(ours)([features[0], batch_features(ours, sample_texts(5, seed=3))])
    assert issubclass(L.LossInputError, ValueError)
