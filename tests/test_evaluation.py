"""Every evaluator of `infer.evaluation` reports sentence-transformers 6.2's metrics, to 1e-6, on the same inputs.

Two kinds of check. On identical embeddings (or cross-encoder scores): sentence-transformers' evaluator runs on a
stand-in model whose `encode` / `predict` looks each text up in a table, infer's `from_embeddings` / `from_scores`
takes the same arrays; several seeds, half of them small-integer embeddings so that many similarities tie exactly,
duplicated documents and candidates, queries with several relevant documents, shuffled string ids whose order is not
the corpus order, corpora scored in chunks, cut-offs below and above the corpus size, every similarity. End to end:
each library runs its own model, loaded from the same folder (a tiny random BERT bi-encoder and cross-encoder saved by
sentence-transformers, and all-MiniLM-L6-v2), on real texts. The search and correlation functions are also checked
one by one against what sentence-transformers calls (its threshold searches, scikit-learn, scipy), and bad input
must raise a `ValueError` that says what is wrong.
"""
import csv
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sentence_transformers import CrossEncoder as STCrossEncoder
from sentence_transformers import SentenceTransformer
from sentence_transformers import util as st_util
from sentence_transformers.cross_encoder import evaluation as st_ce_evaluation
from sentence_transformers.sentence_transformer import evaluation as st_evaluation
from sklearn.metrics import average_precision_score, ndcg_score
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

import infer.evaluation as infer_evaluation
from infer.cross_encoder import CrossEncoder
from infer.encoder import SentenceEncoder, minilm_path
from infer.evaluation import (BinaryClassificationEvaluator, CrossEncoderRerankingEvaluator, EmbeddingSimilarityEvaluator,
                              InformationRetrievalEvaluator, RerankingEvaluator, TripletEvaluator, average_precision,
                              best_accuracy_threshold, best_f1_threshold, pearson, spearman, tie_averaged_ndcg)
from infer.texts import sample_texts

pytestmark = [pytest.mark.filterwarnings('ignore:.*were truncated:UserWarning'), pytest.mark.usefixtures('one_torch_thread')]

EPS = 1e-6
SEEDS = range(4)
ALL = ['cosine', 'dot', 'euclidean', 'manhattan']
ST_SIMILARITY = {'cosine': st_util.cos_sim, 'dot': st_util.dot_score, 'euclidean': st_util.euclidean_sim,
                 'manhattan': st_util.manhattan_sim}
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=30522,
            max_position_embeddings=128, pad_token_id=0, initializer_range=0.2)
NO_MODEL_CARD = SimpleNamespace(set_evaluation_metrics=lambda *args: None)


class LookupModel:
    "A stand-in sentence-transformers model: `encode` looks every text up in `table`."
    def __init__(self, table: dict, similarity_fn_name: str = 'cosine'):
        self.table, self.similarity_fn_name = table, similarity_fn_name
        self.similarity, self.model_card_data = ST_SIMILARITY[similarity_fn_name], NO_MODEL_CARD
    def encode(self, texts, convert_to_tensor=False, **kwargs):
        rows = np.stack([self.table[t] for t in texts])
        return torch.from_numpy(rows) if convert_to_tensor else rows
    encode_query = encode_document = encode


def rows(table, texts): return np.stack([table[t] for t in texts])

def vectors(rng, n: int, integer: bool, dim: int = 8) -> np.ndarray:
    "Embeddings: small integers (many exact ties) or Gaussian."
    return (rng.integers(-2, 3, (n, dim)) if integer else rng.standard_normal((n, dim))).astype(np.float32)

def assert_same(ours: dict, theirs: dict, ours_evaluator=None, theirs_evaluator=None):
    assert list(ours) == list(theirs)  # the same names, in the same order
    bad = {k: (ours[k], theirs[k]) for k in ours if not abs(ours[k] - theirs[k]) <= EPS}
    assert not bad, bad
    if ours_evaluator is not None:
        assert ours_evaluator.primary_metric == theirs_evaluator.primary_metric
        assert ours_evaluator.primary_metric in ours


# ---------------------------------------------------------------- identical embeddings

def retrieval_data(seed: int):
    rng = np.random.default_rng(seed)
    integer = seed % 2 == 0
    n_queries, n_docs = 14, 45
    q, c = vectors(rng, n_queries, integer), vectors(rng, n_docs, integer)
    c[[5, 6]] = q[0]      # two copies of a query: a tie at the top
    c[11] = c[30]         # a duplicated document
    ids = [f'd{j}' for j in rng.permutation(n_docs)]  # 'd10' < 'd2': id order is not corpus order
    queries = {f'q{i}': f'query {i}' for i in range(n_queries)}
    corpus = {cid: f'document {cid}' for cid in ids}
    relevant = {f'q{i}': set(rng.choice(ids, rng.integers(1, 6), replace=False).tolist()) for i in range(n_queries - 3)}
    relevant['q0'] |= {ids[5], ids[6]}
    relevant['q1'] = set()  # no relevant document: left out by both
    table = {**{queries[f'q{i}']: q[i] for i in range(n_queries)}, **{corpus[cid]: c[j] for j, cid in enumerate(ids)}}
    return queries, corpus, relevant, table

SMALL_CUTOFFS = dict(accuracy_at_k=[1, 2], precision_recall_at_k=[1, 4], mrr_at_k=[3], ndcg_at_k=[3, 5], map_at_k=[6])

@pytest.mark.parametrize('seed', SEEDS)
@pytest.mark.parametrize('names', [['cosine'], ['cosine', 'dot'], ['dot', 'euclidean', 'manhattan']], ids='+'.join)
@pytest.mark.parametrize('chunk,cutoffs', [(50_000, {}), (7, {}), (50_000, SMALL_CUTOFFS), (9, SMALL_CUTOFFS)],
                         ids=['whole-default_k', 'chunks-default_k', 'whole-small_k', 'chunks-small_k'])
def test_retrieval_matches(seed, names, chunk, cutoffs):
    queries, corpus, relevant, table = retrieval_data(seed)
    ours = InformationRetrievalEvaluator(queries, corpus, relevant, corpus_chunk_size=chunk, name='ir', similarity_fn_names=names, **cutoffs)
    theirs = st_evaluation.InformationRetrievalEvaluator(queries, corpus, relevant, corpus_chunk_size=chunk, name='ir',
                                                         score_functions={n: ST_SIMILARITY[n] for n in names}, **cutoffs)
    got = ours.from_embeddings(rows(table, ours.queries), rows(table, ours.corpus))
    assert_same(got, theirs(LookupModel(table)), ours, theirs)
    assert ours(LookupModel(table)) == got  # the same through __call__, which embeds with the model


@pytest.mark.parametrize('similarity', ['cosine', 'dot'])
def test_retrieval_defaults_to_the_model_similarity(similarity):
    queries, corpus, relevant, table = retrieval_data(1)
    ours = InformationRetrievalEvaluator(queries, corpus, relevant)
    theirs = st_evaluation.InformationRetrievalEvaluator(queries, corpus, relevant)
    assert_same(ours(LookupModel(table, similarity)), theirs(LookupModel(table, similarity)), ours, theirs)
    assert ours.primary_metric == f'{similarity}_ndcg@10'


def test_retrieval_main_score_function_matches():
    queries, corpus, relevant, table = retrieval_data(2)
    ours = InformationRetrievalEvaluator(queries, corpus, relevant, similarity_fn_names=['cosine', 'dot'], main_score_function='dot')
    theirs = st_evaluation.InformationRetrievalEvaluator(queries, corpus, relevant, main_score_function='dot',
                                                         score_functions={n: ST_SIMILARITY[n] for n in ('cosine', 'dot')})
    assert_same(ours(LookupModel(table)), theirs(LookupModel(table)), ours, theirs)
    assert ours.primary_metric == 'dot_ndcg@10'


def test_the_primary_metric_keeps_the_first_choice():
    "With several similarities the primary one is the best on the first call, kept later: a trainer compares like with like."
    queries, corpus, relevant, _ = retrieval_data(0)
    both = ['cosine', 'dot']
    ours = InformationRetrievalEvaluator(queries, corpus, relevant, similarity_fn_names=both)
    theirs = st_evaluation.InformationRetrievalEvaluator(queries, corpus, relevant, score_functions={n: ST_SIMILARITY[n] for n in both})
    texts, rng, best = [*queries.values(), *corpus.values()], np.random.default_rng(7), []
    for _ in range(8):  # vectors of random lengths, so that cosine and dot disagree
        table = dict(zip(texts, vectors(rng, len(texts), False) * rng.uniform(0.1, 3, (len(texts), 1)).astype(np.float32)))
        metrics = ours(LookupModel(table))
        assert_same(metrics, theirs(LookupModel(table)), ours, theirs)
        best.append(max(both, key=lambda n: metrics[f'{n}_ndcg@10']))
    assert set(best) == set(both) and ours.primary_metric == f'{best[0]}_ndcg@10'


def pair_data(seed: int, n: int = 80):
    rng = np.random.default_rng(seed)
    integer = seed % 2 == 0
    first, second, third = [f'first {i}' for i in range(n)], [f'second {i}' for i in range(n)], [f'third {i}' for i in range(n)]
    a, b, c = vectors(rng, n, integer), vectors(rng, n, integer), vectors(rng, n, integer)
    b[:8] = a[:8]             # identical pairs
    a[20:26], b[20:26] = a[20], b[20]  # repeated pairs: equal scores
    c[:5] = b[:5]             # negatives equal to the positives: ties in triplets
    table = {**dict(zip(first, a)), **dict(zip(second, b)), **dict(zip(third, c))}
    gold = rng.random(n).round(1)  # ties in the gold scores
    labels = rng.integers(0, 2, n)
    labels[:8] = 1
    return first, second, third, table, gold, labels

NAME_SETS = [['cosine'], ALL, ['manhattan'], ['dot', 'euclidean']]

@pytest.mark.parametrize('seed', SEEDS)
@pytest.mark.parametrize('names', NAME_SETS, ids='+'.join)
def test_similarity_matches(seed, names):
    first, second, _, table, gold, _ = pair_data(seed)
    ours = EmbeddingSimilarityEvaluator(first, second, gold.tolist(), similarity_fn_names=names, name='sts')
    theirs = st_evaluation.EmbeddingSimilarityEvaluator(first, second, gold.tolist(), similarity_fn_names=names, name='sts')
    assert_same(ours.from_embeddings(rows(table, first), rows(table, second)), theirs(LookupModel(table)), ours, theirs)

@pytest.mark.parametrize('main', ['dot', 'euclidean'])
def test_similarity_main_similarity_matches(main):
    first, second, _, table, gold, _ = pair_data(5)
    ours = EmbeddingSimilarityEvaluator(first, second, gold, main_similarity=main)
    theirs = st_evaluation.EmbeddingSimilarityEvaluator(first, second, gold.tolist(), main_similarity=main)
    assert_same(ours(LookupModel(table)), theirs(LookupModel(table)), ours, theirs)

@pytest.mark.parametrize('seed', SEEDS)
@pytest.mark.parametrize('names', NAME_SETS, ids='+'.join)
def test_binary_classification_matches(seed, names):
    first, second, _, table, _, labels = pair_data(seed)
    ours = BinaryClassificationEvaluator(first, second, labels.tolist(), similarity_fn_names=names, name='pairs')
    theirs = st_evaluation.BinaryClassificationEvaluator(first, second, labels.tolist(), similarity_fn_names=names, name='pairs')
    assert_same(ours.from_embeddings(rows(table, first), rows(table, second)), theirs(LookupModel(table)), ours, theirs)

@pytest.mark.parametrize('seed', SEEDS)
@pytest.mark.parametrize('names', NAME_SETS, ids='+'.join)
@pytest.mark.parametrize('margin', [0, 0.25, {'cosine': 0.1, 'manhattan': 1.0}], ids=['no_margin', 'margin', 'margins'])
def test_triplet_matches(seed, names, margin):
    first, second, third, table, _, _ = pair_data(seed)
    ours = TripletEvaluator(first, second, third, similarity_fn_names=names, margin=margin, name='triplets')
    theirs = st_evaluation.TripletEvaluator(first, second, third, similarity_fn_names=names, margin=margin, name='triplets')
    assert_same(ours.from_embeddings(rows(table, first), rows(table, second), rows(table, third)), theirs(LookupModel(table)), ours, theirs)

def test_triplet_main_similarity_matches():
    first, second, third, table, _, _ = pair_data(3)
    ours = TripletEvaluator(first, second, third, main_similarity_function='manhattan')
    theirs = st_evaluation.TripletEvaluator(first, second, third, main_similarity_function='manhattan')
    assert_same(ours(LookupModel(table)), theirs(LookupModel(table)), ours, theirs)


def reranking_data(seed: int):
    rng = np.random.default_rng(seed)
    integer = seed % 2 == 0
    samples, table = [], {}
    for i in range(20):
        query = f'query {i}'
        positive = [f'positive {i}-{j}' for j in range(rng.integers(0 if i == 3 else 1, 4))]  # sample 3 may be dropped
        negative = [f'negative {i}-{j}' for j in range(rng.integers(1, 30))]  # beyond 16: torch's sort is unstable
        table.update(zip([query, *positive, *negative], vectors(rng, 1 + len(positive) + len(negative), integer)))
        if positive and len(negative) > 2: table[negative[0]] = table[negative[2]] = table[positive[0]]  # tied candidates
        samples.append(dict(query=query, positive=positive[0] if len(positive) == 1 else positive, negative=negative))
    return samples, table

@pytest.mark.parametrize('seed', SEEDS)
@pytest.mark.parametrize('at_k', [1, 3, 10])
def test_reranking_matches(seed, at_k):
    samples, table = reranking_data(seed)
    ours, theirs = RerankingEvaluator(samples, at_k=at_k, name='rerank'), st_evaluation.RerankingEvaluator(samples, at_k=at_k, name='rerank')
    got = ours.from_embeddings(rows(table, [s['query'] for s in ours.samples]), rows(table, ours.documents))
    assert_same(got, theirs(LookupModel(table)), ours, theirs)

@pytest.mark.parametrize('similarity', ['dot', 'manhattan'])
def test_reranking_with_another_similarity_matches(similarity):
    samples, table = reranking_data(1)
    ours = RerankingEvaluator(samples, similarity_fn_name=similarity)
    theirs = st_evaluation.RerankingEvaluator(samples, similarity_fct=ST_SIMILARITY[similarity])
    assert_same(ours(LookupModel(table)), theirs(LookupModel(table)), ours, theirs)


def cross_encoder_samples(seed: int):
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(24):
        positive = [f'positive {i}-{j}' for j in range(rng.integers(0, 4))]
        others = [f'other {i}-{j}' for j in range(rng.integers(1, 30))]
        if i % 2: samples.append(dict(query=f'query {i}', positive=positive, negative=others))
        else:  # a retriever's list: some positives found, some missed
            found = positive[:rng.integers(0, len(positive) + 1)]
            samples.append(dict(query=f'query {i}', positive=positive, documents=[str(d) for d in rng.permutation(others + found)]))
    return samples

class LookupCrossEncoder:
    "A stand-in sentence-transformers cross-encoder: `predict` returns fixed scores for the pairs it expects."
    def __init__(self, pairs, scores): self.pairs, self.scores, self.model_card_data = pairs, scores, NO_MODEL_CARD
    def predict(self, pairs, **kwargs):
        assert [tuple(p) for p in pairs] == self.pairs
        return self.scores

@pytest.mark.parametrize('seed', SEEDS)
@pytest.mark.parametrize('always_rerank_positives', [True, False])
@pytest.mark.parametrize('at_k', [1, 5])
def test_cross_encoder_reranking_matches(seed, always_rerank_positives, at_k):
    samples = cross_encoder_samples(seed)
    kwargs = dict(at_k=at_k, always_rerank_positives=always_rerank_positives, name='ce')
    ours = CrossEncoderRerankingEvaluator(samples, **kwargs)
    theirs = st_ce_evaluation.CrossEncoderRerankingEvaluator(samples, **kwargs)
    rng = np.random.default_rng(seed + 100)
    scores = rng.random(len(ours.pairs)).astype(np.float32)
    if seed % 2 == 0: scores = np.round(scores * 4) / 4  # five distinct values: ties everywhere
    assert_same(ours.from_scores(scores), theirs(LookupCrossEncoder(ours.pairs, scores)), ours, theirs)


# ---------------------------------------------------------------- the pieces, one by one

ABOVE_ONE = float(np.nextafter(np.float32(1), np.float32(2)))
ADJACENT = [([1.0, ABOVE_ONE, 0.5], [0, 1, 0], True), ([1.0, ABOVE_ONE, 0.5, ABOVE_ONE], [0, 1, 0, 1], True),
            ([ABOVE_ONE, float(np.nextafter(np.float32(ABOVE_ONE), np.float32(2))), 3.0], [1, 0, 0], False)]

@pytest.mark.parametrize('scores,labels,greater_is_better', ADJACENT)
def test_thresholds_between_adjacent_floats_match(scores, labels, greater_is_better):
    "No float32 lies between 1 and the next float: the midpoint rounds onto one of them, and the threshold must not."
    scores, search = np.array(scores, dtype=np.float32), st_evaluation.BinaryClassificationEvaluator
    assert best_accuracy_threshold(scores, labels, greater_is_better) == tuple(map(float, search.find_best_acc_and_threshold(scores, labels, greater_is_better)))
    assert best_f1_threshold(scores, labels, greater_is_better) == tuple(map(float, search.find_best_f1_and_threshold(scores, labels, greater_is_better)))
    assert ABOVE_ONE in (best_accuracy_threshold(scores, labels, greater_is_better)[1], best_f1_threshold(scores, labels, greater_is_better)[3])

@pytest.mark.parametrize('seed', range(6))
@pytest.mark.parametrize('greater_is_better', [True, False])
def test_threshold_searches_match(seed, greater_is_better):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    dtype = np.float32 if seed % 2 else np.float64
    scores = (rng.integers(0, 8, n) / 7 if seed % 3 == 0 else rng.standard_normal(n)).astype(dtype)
    scores[: n // 4] = np.nextafter(scores[: n // 4], dtype(9))  # neighbours one float apart: no midpoint between them
    labels = rng.integers(0, 2, n)
    search = st_evaluation.BinaryClassificationEvaluator
    assert best_accuracy_threshold(scores, labels, greater_is_better) == tuple(map(float, search.find_best_acc_and_threshold(scores, labels, greater_is_better)))
    assert best_f1_threshold(scores, labels, greater_is_better) == tuple(map(float, search.find_best_f1_and_threshold(scores, labels, greater_is_better)))

@pytest.mark.parametrize('seed', range(6))
def test_tie_aware_ranking_metrics_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    relevant = rng.integers(0, 2, n)
    relevant[0] = 1
    scores = rng.integers(0, 5, n) / 4 if seed % 2 else rng.random(n)
    assert abs(average_precision(relevant, scores) - average_precision_score(relevant, scores)) <= EPS
    for k in (1, 3, 10, 50):
        assert abs(tie_averaged_ndcg(relevant, scores, k) - ndcg_score([relevant], [scores], k=k)) <= EPS

@pytest.mark.parametrize('seed', range(6))
def test_correlations_match_scipy(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, 6, 50) / 5, rng.standard_normal(50).astype(np.float32)
    y[:10] = y[10]
    assert abs(pearson(x, y) - pearsonr(x, y)[0]) <= EPS
    assert abs(spearman(x, y) - spearmanr(x, y)[0]) <= EPS


# ---------------------------------------------------------------- end to end: each library runs its own model

def sentences(text): return re.split(r'(?<=[.!?])\s+(?=[A-Z(])', text)

def continuation_set(n_queries: int, n_distractors: int, seed: int = 0):
    "A passage's first sentence is a query; the (up to three) sentences after it are its relevant documents."
    queries, corpus, relevant = {}, {}, {}
    for text in sample_texts(None, seed=seed):
        first, *rest = sentences(text)
        rest = [s for s in rest if len(s.split()) >= 4][:3]
        if len(first.split()) < 4 or not rest or len(text.split()) > 80: continue
        qid = f'q{len(queries)}'
        queries[qid] = first
        corpus.update({f'{qid}-{j}': s for j, s in enumerate(rest)})
        relevant[qid] = {f'{qid}-{j}' for j in range(len(rest))}
        if len(queries) == n_queries: break
    singles = (t for t in sample_texts(None, seed=seed + 1) if len(sentences(t)) == 1 and len(t.split()) >= 4)
    corpus.update({f'x{j}': t for j, t in zip(range(n_distractors), singles)})
    return queries, corpus, relevant

@pytest.fixture(scope='module')
def data():
    queries, corpus, relevant = continuation_set(30, 40)
    qids = list(queries)
    answers = [corpus[min(relevant[q])] for q in qids]
    others = answers[1:] + answers[:1]
    passages = [t for t in sample_texts(120, seed=3) if 6 <= len(t.split()) <= 40][:30]
    rng = np.random.default_rng(0)
    shortened = [' '.join(w for w in t.split() if rng.random() < 0.6) or t for t in passages]
    overlap = [len(set(a.split()) & set(b.split())) / len(set(a.split())) for a, b in zip(passages, shortened)]
    return SimpleNamespace(queries=queries, corpus=corpus, relevant=relevant, anchors=[queries[q] for q in qids],
                           answers=answers, others=others, passages=passages, shortened=shortened, overlap=overlap)

def bi_encoder_evaluators(d, ours: bool):
    "The same five evaluators, from infer (`ours`) or from sentence-transformers."
    make = lambda name: getattr(infer_evaluation if ours else st_evaluation, name)
    rerank = [dict(query=a, positive=p, negative=[n, *d.others[i + 1:i + 4]]) for i, (a, p, n) in enumerate(zip(d.anchors, d.answers, d.others))]
    return {'ir': make('InformationRetrievalEvaluator')(d.queries, d.corpus, d.relevant, name='ir'),
            'sts': make('EmbeddingSimilarityEvaluator')(d.passages, d.shortened, d.overlap, similarity_fn_names=ALL),
            'pairs': make('BinaryClassificationEvaluator')(d.anchors * 2, d.answers + d.others, [1] * len(d.answers) + [0] * len(d.others)),
            'triplets': make('TripletEvaluator')(d.anchors, d.answers, d.others, similarity_fn_names=ALL),
            'rerank': make('RerankingEvaluator')(rerank)}

@pytest.fixture(scope='module')
def tiny_folder(tmp_path_factory):
    "A tiny random BERT saved by sentence-transformers (mean pooling), with all-MiniLM-L6-v2's tokenizer."
    hf, st = tmp_path_factory.mktemp('tiny-hf'), tmp_path_factory.mktemp('tiny-st')
    torch.manual_seed(0)
    BertModel(BertConfig(**TINY)).save_pretrained(hf)
    AutoTokenizer.from_pretrained(minilm_path(), model_max_length=64).save_pretrained(hf)
    SentenceTransformer(str(hf), device='cpu').save(str(st))
    return st

def test_bi_encoder_evaluators_match_on_a_tiny_model(tiny_folder, data):
    ours_model, theirs_model = SentenceEncoder(tiny_folder), SentenceTransformer(str(tiny_folder), device='cpu')
    ours, theirs = bi_encoder_evaluators(data, True), bi_encoder_evaluators(data, False)
    for key in ours:
        assert_same(ours[key](ours_model), theirs[key](theirs_model), ours[key], theirs[key])

def test_retrieval_matches_on_all_minilm(data):
    path = minilm_path()
    ours = InformationRetrievalEvaluator(data.queries, data.corpus, data.relevant, name='minilm')
    theirs = st_evaluation.InformationRetrievalEvaluator(data.queries, data.corpus, data.relevant, name='minilm')
    got = ours(SentenceEncoder(path))
    assert_same(got, theirs(SentenceTransformer(str(path), device='cpu')), ours, theirs)
    assert got['minilm_cosine_ndcg@10'] > 0.4  # a trained model finds continuations; a random one does not

def test_cross_encoder_reranking_matches_on_a_tiny_model(tmp_path, data):
    hf, st = tmp_path / 'hf', tmp_path / 'st'
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(**TINY, num_labels=1)).save_pretrained(hf)
    AutoTokenizer.from_pretrained(minilm_path(), model_max_length=64).save_pretrained(hf)
    STCrossEncoder(str(hf), device='cpu').save(str(st))
    samples = [dict(query=a, positive=[p], documents=[n, *data.others[i + 1:i + 5], p][::1 if i % 2 else -1])
               for i, (a, p, n) in enumerate(zip(data.anchors, data.answers, data.others))]
    samples += [dict(query=a, positive=p, negative=data.others[i:i + 3]) for i, (a, p) in enumerate(zip(data.anchors[:8], data.answers))]
    ours = CrossEncoderRerankingEvaluator(samples, at_k=3, name='ce')
    theirs = st_ce_evaluation.CrossEncoderRerankingEvaluator(samples, at_k=3, name='ce')
    assert_same(ours(CrossEncoder(st)), theirs(STCrossEncoder(str(st), device='cpu')), ours, theirs)


# ---------------------------------------------------------------- bad input, and the CSV file

QRELS = ({'q1': 'first', 'q2': 'second'}, {'d1': 'a', 'd2': 'b'})
BAD = {
    'relevant id not in corpus': (lambda: InformationRetrievalEvaluator(*QRELS, {'q1': {'d3'}}), "not in the corpus: ['d3']"),
    'relevant ids of the wrong type': (lambda: InformationRetrievalEvaluator(*QRELS, {'q1': {1}}), 'check that the id types match'),
    'query id not in queries': (lambda: InformationRetrievalEvaluator(*QRELS, {'q3': {'d1'}}), "not in queries, such as ['q3']"),
    'relevant docs as a string': (lambda: InformationRetrievalEvaluator(*QRELS, {'q1': 'd1'}), 'must be a set of corpus ids'),
    'no relevant docs': (lambda: InformationRetrievalEvaluator(*QRELS, {}), 'nothing to evaluate'),
    'queries as a list': (lambda: InformationRetrievalEvaluator(['first'], QRELS[1], {}), 'queries must be a dict'),
    'mixed id types': (lambda: InformationRetrievalEvaluator(QRELS[0], {'d1': 'a', 2: 'b'}, {'q1': {2}}), 'must be comparable'),
    'zero cut-off': (lambda: InformationRetrievalEvaluator(*QRELS, {'q1': {'d1'}}, mrr_at_k=[0]), 'mrr_at_k must be a positive'),
    'unknown similarity (retrieval)': (lambda: InformationRetrievalEvaluator(*QRELS, {'q1': {'d1'}}, similarity_fn_names=['cos']),
                                       "unknown similarity 'cos'; use one of cosine, dot, euclidean, manhattan"),
    'main similarity not listed': (lambda: InformationRetrievalEvaluator(*QRELS, {'q1': {'d1'}}, similarity_fn_names=['dot'],
                                                                         main_score_function='cosine'), "'cosine' is not one of"),
    'mismatched lengths (similarity)': (lambda: EmbeddingSimilarityEvaluator(['a', 'b'], ['c', 'd'], [0.5]),
                                        "'sentences1': 2, 'sentences2': 2, 'scores': 1"),
    'constant gold scores': (lambda: EmbeddingSimilarityEvaluator(['a', 'b'], ['c', 'd'], [3, 3]), 'gold scores are all equal'),
    'non-numeric gold scores': (lambda: EmbeddingSimilarityEvaluator(['a', 'b'], ['c', 'd'], ['high', 'low']), 'must be finite numbers'),
    'unknown main similarity': (lambda: EmbeddingSimilarityEvaluator(['a', 'b'], ['c', 'd'], [1, 2], main_similarity='l2'), "unknown similarity 'l2'"),
    'mismatched lengths (pairs)': (lambda: BinaryClassificationEvaluator(['a'], ['b', 'c'], [1]), 'equally long'),
    'labels not 0 or 1': (lambda: BinaryClassificationEvaluator(['a', 'b'], ['c', 'd'], [1, 0.5]), 'must be 0 (dissimilar) or 1 (similar); got [0.5]'),
    'no similar pair': (lambda: BinaryClassificationEvaluator(['a', 'b'], ['c', 'd'], [0, 0]), 'no pair is labelled 1'),
    'unknown similarity (pairs)': (lambda: BinaryClassificationEvaluator(['a'], ['b'], [1], similarity_fn_names='hamming'), "unknown similarity 'hamming'"),
    'empty triplets': (lambda: TripletEvaluator([], [], []), 'no examples'),
    'mismatched lengths (triplets)': (lambda: TripletEvaluator(['a', 'b'], ['c', 'd'], ['e']), 'equally long'),
    'bad margin': (lambda: TripletEvaluator(['a'], ['b'], ['c'], margin='wide'), 'margin must be a number'),
    'margin of an unknown similarity': (lambda: TripletEvaluator(['a'], ['b'], ['c'], margin={'l2': 1}), "unknown similarity 'l2'"),
    'sample without negative': (lambda: RerankingEvaluator([{'query': 'q', 'positive': 'p'}]), "the keys 'query', 'positive', 'negative'"),
    'nothing to rerank': (lambda: RerankingEvaluator([{'query': 'q', 'positive': 'p', 'negative': []}]), 'nothing to rerank'),
    'unknown reranking similarity': (lambda: RerankingEvaluator([{'query': 'q', 'positive': 'p', 'negative': 'n'}], similarity_fn_name='bm25'),
                                     "unknown similarity 'bm25'"),
    'zero at_k': (lambda: RerankingEvaluator([{'query': 'q', 'positive': 'p', 'negative': 'n'}], at_k=0), 'at_k must be a positive'),
    'negative and documents': (lambda: CrossEncoderRerankingEvaluator([{'query': 'q', 'positive': 'p', 'negative': 'n', 'documents': ['d']}]),
                               "exactly one of 'negative' and 'documents'; it has both"),
    'sample as a tuple': (lambda: CrossEncoderRerankingEvaluator([('q', 'p', 'n')]), "samples[0] must be a dict with the keys 'query', 'positive'"),
    'empty documents': (lambda: CrossEncoderRerankingEvaluator([{'query': 'q', 'positive': 'p', 'documents': []}]), "['documents'] is empty"),
}

@pytest.mark.parametrize('case', BAD)
def test_bad_input_is_refused(case):
    make, message = BAD[case]
    with pytest.raises(ValueError, match=re.escape(message)): make()

def test_embeddings_and_scores_of_the_wrong_shape_are_refused():
    queries, corpus, relevant, table = retrieval_data(0)
    ir = InformationRetrievalEvaluator(queries, corpus, relevant)
    with pytest.raises(ValueError, match=re.escape(f'query_embeddings must be a [{len(ir.queries)}, dim] array')):
        ir.from_embeddings(rows(table, ir.queries[1:]), rows(table, ir.corpus))
    with pytest.raises(ValueError, match=re.escape('corpus_embeddings must be')):
        ir.from_embeddings(rows(table, ir.queries), rows(table, ir.corpus)[0])
    first, second, _, table, gold, _ = pair_data(0)
    with pytest.raises(ValueError, match='embeddings2 must be'):
        EmbeddingSimilarityEvaluator(first, second, gold).from_embeddings(rows(table, first), rows(table, second[:-1]))
    ce = CrossEncoderRerankingEvaluator(cross_encoder_samples(0))
    with pytest.raises(ValueError, match=re.escape(f'one number per pair of `pairs` ({len(ce.pairs)})')):
        ce.from_scores(np.zeros((len(ce.pairs), 2)))

def test_a_cross_encoder_of_several_labels_is_refused():
    evaluator = CrossEncoderRerankingEvaluator([{'query': 'q', 'positive': 'p', 'negative': 'n'}])
    with pytest.raises(ValueError, match='one label'): evaluator(SimpleNamespace(num_labels=3))

def test_metrics_are_appended_to_a_csv_file(tmp_path):
    first, second, third, table, _, _ = pair_data(0)
    evaluator = TripletEvaluator(first, second, third, similarity_fn_names=['cosine', 'dot'], name='dev')
    metrics = [evaluator(LookupModel(table), output_path=tmp_path, epoch=epoch, steps=steps) for epoch, steps in ((0.5, 10), (1.0, 20))]
    with open(tmp_path / 'TripletEvaluator_dev_results.csv') as f: lines = list(csv.reader(f))
    assert lines[0] == ['epoch', 'steps', *metrics[0]]
    assert [[float(v) for v in line] for line in lines[1:]] == [[0.5, 10, *metrics[0].values()], [1.0, 20, *metrics[1].values()]]
