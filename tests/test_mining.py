"""`mine_hard_negatives` mines what sentence-transformers' `util.mine_hard_negatives` mines, proved on all-MiniLM-L6-v2.

The data are (anchor, positive) pairs of real texts (a text's first half, the whole text), with one anchor given a
second positive that ranks high (its text less the last word), one given an unrelated one, and one row repeated, over an extra corpus of other texts; all-MiniLM-L6-v2 is loaded in both
libraries. With `sampling_strategy='top'` the two outputs are identical (the same rows, the same negatives in the same
order, scores equal to 1e-5) in every output format, with and without scores, for the default window, explicit
ranks, a window larger than the corpus, score bounds, both margins, prompts, `include_positives`, and a tiny random
cross-encoder rescoring the candidates. With `'random'` every output obeys every rule, for several seeds. Bad input
raises a `MiningInputError` before anything is encoded.

Each library encodes each list of texts once per test module (its `encode_query` and `encode_document`, and the
cross-encoders' `predict`, are memoized on the instance), so that many settings can be compared in little time: the
embeddings and scores are still each library's own.
"""
import math
import zlib
from functools import wraps

import numpy as np
import pytest
import torch
from datasets import Dataset
from sentence_transformers import CrossEncoder as STCrossEncoder
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import mine_hard_negatives as st_mine
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from infer.cross_encoder import CrossEncoder
from infer.encoder import SentenceEncoder, minilm_path
from infer.mining import MiningInputError, mine_hard_negatives
from infer.texts import sample_texts

pytestmark = [pytest.mark.usefixtures('one_torch_thread'),
              pytest.mark.filterwarnings('ignore:the cross_encoder rescores only:UserWarning')]

FORMATS = ('triplet', 'n-tuple', 'labeled-pair', 'labeled-list')


def memoize(model, *methods):
    "Make `model` run each of `methods` once per input (texts and prompt): a cache on the instance."
    for name in methods:
        method, cache = getattr(model, name), {}
        @wraps(method)
        def memoized(inputs, *, _method=method, _cache=cache, **kwargs):
            key = (tuple(inputs), kwargs.get('prompt_name'), kwargs.get('prompt'))
            if key not in _cache: _cache[key] = _method(inputs, **kwargs)
            found = _cache[key]
            return found.clone() if isinstance(found, torch.Tensor) else found.copy()
        setattr(model, name, memoized)
    return model


@pytest.fixture(scope='module')
def models():
    ours, theirs = SentenceEncoder(minilm_path()), SentenceTransformer(str(minilm_path()), device='cpu')
    return memoize(ours, 'encode_query', 'encode_document'), memoize(theirs, 'encode_query', 'encode_document')


def first_half(text): return ' '.join(text.split()[:max(2, len(text.split()) // 2)])


def pairs_for(key, n_pairs=40, n_extra=80):
    "(anchor, positive) rows of real texts, one anchor with a second positive and one row repeated; an extra corpus."
    texts = [t for t in sample_texts(8 * (n_pairs + n_extra), seed=zlib.crc32(key.encode())) if 6 <= len(t.split()) <= 30 and len(t) <= 200]
    positives, extra = texts[:n_pairs], texts[n_pairs:n_pairs + n_extra]
    anchors = [first_half(t) for t in positives]
    # a second positive that ranks high (a near-duplicate), a repeated row, and a second positive that ranks low (an
    # unrelated text: its low score, not the first positive's, sets the anchor's margins)
    anchors += [anchors[0], anchors[1], anchors[2]]
    positives += [' '.join(positives[0].split()[:-1]), positives[1], texts[n_pairs + n_extra]]
    return Dataset.from_dict({'question': anchors, 'answer': positives}), extra


@pytest.fixture(scope='module')
def data():
    return {key: pairs_for(key) for key in ('docs-a', 'docs-b')}


def assert_same(ours: Dataset, theirs: Dataset, where: str):
    "The same columns and rows; texts and labels equal, scores to 1e-5."
    assert ours.column_names == theirs.column_names, where
    assert len(ours) == len(theirs), f'{where}: {len(ours)} rows against {len(theirs)}'
    for column in ours.column_names:
        a, b = ours[column], theirs[column]
        if column.startswith('score'):
            for i, (x, y) in enumerate(zip(a, b)):
                np.testing.assert_allclose(x, y, atol=1e-5, rtol=0, err_msg=f'{where}: {column}[{i}]')
        else:
            mismatch = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            assert mismatch is None, f'{where}: {column}[{mismatch}]: {a[mismatch]!r} against {b[mismatch]!r}'


SETTINGS = {
    'default window': {},
    'ranks 3 to 25': dict(range_min=3, range_max=25, num_negatives=5),
    'window past the corpus': dict(range_min=1, range_max=400, num_negatives=6),
    'absolute margin and bounds': dict(absolute_margin=0.1, max_score=0.6, min_score=0.25),
    'relative margin, skip 1': dict(relative_margin=0.1, range_min=1, num_negatives=4),
    'negative margin, both kinds': dict(absolute_margin=-0.03, relative_margin=0.02, max_score=0.8),
}
GUARDS = ('absolute_margin', 'relative_margin', 'max_score', 'min_score')


@pytest.mark.parametrize('setting', SETTINGS)
@pytest.mark.parametrize('key', ['docs-a', 'docs-b'])
def test_top_negatives_match_sentence_transformers(models, data, key, setting):
    ours, theirs = models
    pairs, extra = data[key]
    kwargs = dict(corpus=extra, verbose=False, **SETTINGS[setting])
    for fmt in FORMATS:
        for scores in (False, True):
            assert_same(mine_hard_negatives(pairs, ours, output_format=fmt, output_scores=scores, **kwargs),
                        st_mine(pairs, theirs, output_format=fmt, output_scores=scores, **kwargs),
                        f'{key}, {setting}, {fmt}, output_scores={scores}')
    if any(g in kwargs for g in GUARDS):  # the guards rule out negatives that would otherwise be picked
        unguarded = {k: v for k, v in kwargs.items() if k not in GUARDS}
        assert (mine_hard_negatives(pairs, ours, **kwargs)['negative']
                != mine_hard_negatives(pairs, ours, **unguarded)['negative'])


def test_the_data_has_what_the_rules_need(data):
    for pairs, extra in data.values():
        anchors = pairs['question']
        assert len(set(anchors)) < len(anchors) and len(set(zip(anchors, pairs['answer']))) < len(pairs)
        assert not set(extra) & set(pairs['answer'])


@pytest.mark.parametrize('fmt', FORMATS)
def test_prompts_and_positives_match(models, data, fmt):
    ours, theirs = models
    pairs, extra = data['docs-a']
    kwargs = dict(corpus=extra, verbose=False, output_format=fmt, output_scores=True, num_negatives=2,
                  query_prompt='query: ', corpus_prompt='passage: ')
    assert_same(mine_hard_negatives(pairs, ours, **kwargs), st_mine(pairs, theirs, **kwargs), f'prompts, {fmt}')
    if fmt == 'n-tuple':  # the positives stay among the candidates, in rank order
        kwargs = dict(corpus=extra, verbose=False, output_format=fmt, include_positives=True, num_negatives=4)
        ours_mined, theirs_mined = mine_hard_negatives(pairs, ours, **kwargs), st_mine(pairs, theirs, **kwargs)
        assert_same(ours_mined, theirs_mined, 'include_positives')
        assert any(row['answer'] in [row[f'negative_{i}'] for i in range(1, 5)] for row in ours_mined)


def test_include_positives_switches_to_n_tuple(models, data):
    ours, _ = models
    pairs, extra = data['docs-a']
    with pytest.warns(UserWarning, match="only the 'n-tuple' format"):
        switched = mine_hard_negatives(pairs, ours, corpus=extra, include_positives=True, verbose=False)
    assert_same(switched, mine_hard_negatives(pairs, ours, corpus=extra, include_positives=True, output_format='n-tuple',
                                              verbose=False), 'include_positives')


@pytest.fixture(scope='module')
def cross_encoders(tmp_path_factory):
    "A tiny random one-label BERT classifier, loaded by both libraries."
    path = tmp_path_factory.mktemp('cross')
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                             vocab_size=30522, max_position_embeddings=128, initializer_range=0.2,
                                             num_labels=1)).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path(), model_max_length=128).save_pretrained(path)
    return memoize(CrossEncoder(path), 'predict'), memoize(STCrossEncoder(str(path), device='cpu'), 'predict')


@pytest.mark.parametrize('guard', [dict(absolute_margin=0.0), dict(relative_margin=0.02, min_score=0.35)])
def test_cross_encoder_rescoring_matches(models, cross_encoders, data, guard):
    (ours, theirs), (ours_ce, theirs_ce) = models, cross_encoders
    pairs, extra = data['docs-b']
    for fmt in FORMATS:
        kwargs = dict(corpus=extra, verbose=False, output_format=fmt, output_scores=True, **guard)
        mined = mine_hard_negatives(pairs, ours, cross_encoder=ours_ce, **kwargs)
        assert_same(mined, st_mine(pairs, theirs, cross_encoder=theirs_ce, **kwargs), f'cross-encoder {guard}, {fmt}')
    # the scores are the cross-encoder's: the last format's lists, (query, document) by (query, document)
    rescored = ours_ce.predict([(row['question'], doc) for row in mined for doc in row['answer']])
    np.testing.assert_allclose(np.concatenate(mined['scores']), rescored, atol=1e-6)


@pytest.fixture(scope='module')
def vectors(models, data):
    "The embedding of every text of the first data set, encoded apart from mining."
    pairs, extra = data['docs-a']
    texts = list(dict.fromkeys([*pairs['question'], *pairs['answer'], *extra]))
    return dict(zip(texts, SentenceEncoder.encode(models[0], texts, normalize_embeddings=True, convert_to_tensor=True)))


@pytest.mark.parametrize('seed', [0, 1, 2, 3])
def test_random_negatives_obey_every_rule(models, data, vectors, seed):
    ours, _ = models
    pairs, extra = data['docs-a']
    rules = dict(range_min=2, range_max=20, relative_margin=0.05, max_score=0.8, min_score=0.1)
    kwargs = dict(corpus=extra, verbose=False, output_format='labeled-list', output_scores=True, **rules)
    window = {(row['question'], row['answer'][0]): row['answer'][1:]  # every survivor of the ranks 2 to 20, in order
              for row in mine_hard_negatives(pairs, ours, num_negatives=18, **kwargs)}
    drawn = mine_hard_negatives(pairs, ours, num_negatives=4, sampling_strategy='random', seed=seed, **kwargs)
    positives_of = {}
    for anchor, positive in zip(pairs['question'], pairs['answer']): positives_of.setdefault(anchor, set()).add(positive)
    emb = lambda texts: torch.stack([vectors[t] for t in texts])
    assert [(row['question'], row['answer'][0]) for row in drawn] == list(window)  # the same (anchor, positive) rows
    for row in drawn:
        anchor, (positive, *negatives), (_, *scores) = row['question'], row['answer'], row['scores']
        floor = ours.similarity(vectors[anchor], emb(sorted(positives_of[anchor])))[0].min().item()
        survivors = window[anchor, positive]
        assert len(negatives) == min(4, len(survivors))           # as many as asked, where enough survive
        assert set(negatives) <= set(survivors)                   # within the ranks, among the survivors
        assert len(set(negatives)) == len(negatives)             # distinct
        assert not set(negatives) & positives_of[anchor]         # never a positive of the anchor
        assert scores == sorted(scores, reverse=True)
        np.testing.assert_allclose(scores, ours.similarity(vectors[anchor], emb(negatives))[0].numpy(), atol=1e-5)
        assert all(0.1 - 1e-6 <= s <= 0.8 + 1e-6 and s <= floor - abs(floor) * 0.05 + 1e-6 for s in scores)
    again = mine_hard_negatives(pairs, ours, num_negatives=4, sampling_strategy='random', seed=seed, **kwargs)
    assert again['answer'] == drawn['answer']
    other = mine_hard_negatives(pairs, ours, num_negatives=4, sampling_strategy='random', seed=seed + 10, **kwargs)
    assert other['answer'] != drawn['answer']
    top = mine_hard_negatives(pairs, ours, num_negatives=4, **kwargs)
    assert top['answer'] != drawn['answer']


class NoEncoding:
    "A model that fails the test if anything is encoded."
    prompts = {'query': 'query: '}
    def encode_query(self, *args, **kwargs): raise AssertionError('encoded')
    encode_document = similarity = similarity_pairwise = encode_query


BAD = [  # (arguments, what the message says, whether sentence-transformers refuses them too)
    (dict(anchor_column_name='query'), "anchor_column_name='query' is not a column", False),
    (dict(positive_column_name='positive'), "positive_column_name='positive' is not a column", False),
    (dict(anchor_column_name='answer'), "are both 'answer'", False),
    (dict(num_negatives=0), 'num_negatives must be a whole number of at least 1', True),
    (dict(range_min=-1), 'range_min must be a whole number of at least 0', True),
    (dict(range_min=5, range_max=5), 'range_min=5 must be smaller than range_max=5', True),
    (dict(range_min=8, range_max=3), 'range_min=8 must be smaller than range_max=3', True),
    (dict(range_min=2, range_max=4, num_negatives=3), 'does not fit in the ranks 2 to 4', True),
    (dict(sampling_strategy='hardest'), "sampling_strategy='hardest' is not one of", False),
    (dict(output_format='quadruplet'), "output_format='quadruplet' is not one of", True),
    (dict(min_score=0.9, max_score=0.2), 'min_score=0.9 is above max_score=0.2', False),
    (dict(absolute_margin='0.1'), 'absolute_margin must be a number', False),
    (dict(batch_size=0), 'batch_size must be a whole number of at least 1', False),
    (dict(corpus='a text'), 'corpus must be a list of texts', False),
    (dict(corpus=['a', 3]), 'corpus[1] is a int', False),
    (dict(query_prompt_name='search'), "query_prompt_name='search' is not one of the model's prompts", False),
    (dict(cross_encoder='reranker', max_score=0.9), 'cross_encoder must be a CrossEncoder', False),
]


@pytest.mark.parametrize('kwargs, message, st_refuses', BAD, ids=[m[:30] for _, m, _ in BAD])
def test_bad_input_is_refused_before_encoding(models, data, kwargs, message, st_refuses):
    pairs, _ = data['docs-a']
    with pytest.raises(MiningInputError) as info:
        mine_hard_negatives(pairs, NoEncoding(), verbose=False, **kwargs)
    assert isinstance(info.value, ValueError) and message in str(info.value), str(info.value)
    if st_refuses:
        with pytest.raises(ValueError):
            st_mine(pairs, models[1], verbose=False, **kwargs)


def test_bad_datasets_are_refused(models):
    one_column = Dataset.from_dict({'question': ['a', 'b']})
    for dataset, message in [(one_column, 'it needs two'),
                             (Dataset.from_dict({'question': [], 'answer': []}), 'no rows'),
                             (Dataset.from_dict({'question': ['a', 'b'], 'answer': ['c', None]}), "row 1 of the column 'answer' holds None"),
                             (Dataset.from_dict({'question': ['a'], 'label': ['b']}), "has a column 'label'"),
                             ({'question': ['a'], 'answer': ['b']}, 'must be a datasets.Dataset')]:
        with pytest.raises(MiningInputError) as info:
            mine_hard_negatives(dataset, NoEncoding(), output_format='labeled-pair', verbose=False)
        assert message in str(info.value), str(info.value)
    with pytest.raises(ValueError):
        st_mine(one_column, models[1], verbose=False)
    with pytest.raises(MiningInputError, match='model must be a SentenceEncoder'):
        mine_hard_negatives(Dataset.from_dict({'question': ['a'], 'answer': ['b']}), 'all-MiniLM-L6-v2')


def test_verbose_summary(models, data, capsys):
    ours, _ = models
    pairs, extra = data['docs-a']
    mined = mine_hard_negatives(pairs, ours, corpus=extra, relative_margin=0.05, range_max=30)
    out = capsys.readouterr().out
    assert f'mined {len(mined):,} triplet rows for {len(set(pairs["question"]))} queries' in out
    assert 'from the ranks 0 to 30' in out and 'relative_margin=0.05' in out and 'difference' in out
