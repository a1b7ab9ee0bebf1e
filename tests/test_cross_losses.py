"""The cross-encoder losses give sentence-transformers' values and gradients, proved on a tiny random reranker.

A tiny BERT sequence classifier (hidden 32, 2 layers, random weights, one label or three) with all-MiniLM-L6-v2's
tokenizer cut to 64 tokens is loaded by both libraries from one folder. Each loss of `infer.cross_losses` and the
sentence-transformers 6.2 loss of the same name get the same batch of real texts and labels, on fresh texts for
every case (several seeds): the values agree to 1e-5 and every parameter's gradient to 1e-4 relative
(||g_infer - g_st|| / ||g_st||, float32, CPU).

One exception is stated, not skipped: a parameter whose gradient is zero in exact arithmetic (the attention key
biases, since a softmax ignores a shift of all its inputs; the classifier bias under a loss of score differences or
of a softmax over scores) holds rounding noise of about 1e-7 of the largest gradient, and its relative error means
nothing. For those both gradients must be below 1e-5 of the largest; the test asserts which parameters they are.
Bad input raises `CrossLossError` (a ValueError) before any forward, with a message that names what was expected.
"""
import zlib

import pytest
import torch
from sentence_transformers import CrossEncoder as STCrossEncoder
from sentence_transformers.cross_encoder import losses as st_losses
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

import infer.cross_losses as cl
from infer.cross_encoder import CrossEncoder
from infer.encoder import minilm_path
from infer.texts import sample_texts

pytestmark = [pytest.mark.filterwarnings('ignore::UserWarning'), pytest.mark.usefixtures('one_torch_thread')]

TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128, initializer_range=0.2)  # wide init: scores differ from pair to pair
SEEDS = [0, 1, 2]
NOISE = 1e-5  # a gradient below this fraction of the largest is rounding noise around an exact zero


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    "For 1 and 3 labels: (infer's CrossEncoder, sentence-transformers' CrossEncoder) of one folder, dropout off."
    made = {}
    for num_labels in (1, 3):
        path = tmp_path_factory.mktemp(f'tiny-{num_labels}')
        torch.manual_seed(num_labels)
        BertForSequenceClassification(BertConfig(**TINY, num_labels=num_labels)).save_pretrained(path)
        AutoTokenizer.from_pretrained(minilm_path(), model_max_length=64).save_pretrained(path)
        made[num_labels] = CrossEncoder(path).eval(), STCrossEncoder(str(path), device='cpu').eval()
    return made


def texts(*key, n):
    "`n` distinct real texts, fresh for each `key`."
    return sample_texts(n, seed=zlib.crc32(repr(key).encode()))

def columns(key, rows, width):
    found = texts(*key, n=rows * width)
    return [found[c * rows:(c + 1) * rows] for c in range(width)]

def ragged(key, lengths):
    "Queries and, for each, a list of `lengths[q]` documents, with graded labels 0..3 (ties included), as tensors."
    found = texts(*key, n=len(lengths) + sum(lengths))
    queries, rest = found[:len(lengths)], found[len(lengths):]
    starts = [sum(lengths[:q]) for q in range(len(lengths))]
    docs = [rest[s:s + n] for s, n in zip(starts, lengths)]
    g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
    labels = [torch.randint(0, 4, (n,), generator=g).float() for n in lengths]
    return [queries, docs], labels


def value_and_gradients(loss, model, inputs, labels, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # MultipleNegativesRankingLoss draws its in-batch negatives from torch's generator
    value = loss(inputs, labels)
    value.backward()
    return value.item(), {k: p.grad.clone() for k, p in model.model.named_parameters() if p.grad is not None}

def assert_parity(models, name, inputs, labels, num_labels=1, seed=0, st_kwargs=None, **kwargs):
    """The infer loss `name` and sentence-transformers' agree in value (1e-5) and in every parameter's gradient (1e-4
    relative, plus 1e-7 of the largest gradient for float32 rounding)."""
    ours_model, st_model = models[num_labels]
    ours, value = value_and_gradients(getattr(cl, name)(ours_model, **kwargs), ours_model, inputs, labels, seed)
    theirs, reference = value_and_gradients(getattr(st_losses, name)(st_model, **(st_kwargs or kwargs)), st_model, inputs, labels, seed)
    assert abs(ours - theirs) <= 1e-5, (ours, theirs)
    assert abs(theirs) > 1e-3  # the loss is not zero: the parity means something
    assert value.keys() == reference.keys() and len(reference) == 41
    largest = max(g.norm() for g in reference.values())
    exact_zeros = set()
    for param, g in reference.items():
        if g.norm() < NOISE * largest:
            exact_zeros.add(param.split('.', 4)[-1] if '.layer.' in param else param)
            assert value[param].norm() < NOISE * largest, param
        else:
            # 1e-4 relative, plus float32 rounding of terms the size of the largest gradient (a small gradient that
            # is a sum of large cancelling terms, as a listwise loss's bias gradient is, carries that much)
            assert (value[param] - g).norm() <= 1e-4 * g.norm() + 1e-7 * largest, (param, ((value[param] - g).norm() / g.norm()).item())
    assert exact_zeros <= {'attention.self.key.bias', 'classifier.bias'}, exact_zeros
    return ours


# ---- pointwise

@pytest.mark.parametrize('seed', SEEDS[:2])
@pytest.mark.parametrize('case', ['binary', 'probabilities', 'pos_weight', 'column_of_labels'])
def test_binary_cross_entropy_matches(models, case, seed):
    inputs = columns(('bce', case, seed), 8, 2)
    g = torch.Generator().manual_seed(seed)
    labels = {'binary': torch.randint(0, 2, (8,), generator=g), 'probabilities': torch.rand(8, generator=g),
              'pos_weight': torch.randint(0, 2, (8,), generator=g).float(),
              'column_of_labels': torch.rand(8, 1, generator=g)}[case]
    kwargs = {'pos_weight': dict(pos_weight=torch.tensor(4.0)), 'column_of_labels': dict(activation_fn=torch.nn.Tanh())}.get(case, {})
    assert_parity(models, 'BinaryCrossEntropyLoss', inputs, labels, **kwargs)


@pytest.mark.parametrize('seed', SEEDS[:2])
@pytest.mark.parametrize('case', ['classes', 'column_of_classes', 'soft', 'label_smoothing'])
def test_cross_entropy_matches(models, case, seed):
    inputs = columns(('ce', case, seed), 8, 2)
    g = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, 3, (8,), generator=g)
    labels = {'column_of_classes': classes[:, None], 'soft': torch.rand(8, 3, generator=g).softmax(1)}.get(case, classes)
    kwargs = dict(label_smoothing=0.1) if case == 'label_smoothing' else {}
    assert_parity(models, 'CrossEntropyLoss', inputs, labels, num_labels=3, **kwargs)


# ---- in-batch negatives and distillation

MNRL_CASES = {  # columns, hyperparameters
    'pairs': (2, {}),
    'two hard negatives': (4, {}),
    'all in-batch negatives': (3, dict(num_negatives=None)),
    'more negatives than the batch holds': (2, dict(num_negatives=50)),
    'no activation, scale 20': (3, dict(num_negatives=2, scale=20.0, activation_fn=None)),
}

@pytest.mark.parametrize('seed', SEEDS)
@pytest.mark.parametrize('case', MNRL_CASES)
def test_multiple_negatives_ranking_matches(models, case, seed):
    width, kwargs = MNRL_CASES[case]
    inputs = columns(('mnrl', case, seed), 6, width)
    assert_parity(models, 'MultipleNegativesRankingLoss', inputs, None, seed=seed, **kwargs)


def test_no_in_batch_negatives_leaves_the_hard_ones(models):
    "num_negatives=0, which sentence-transformers cannot draw, is the mean of its loss on each row alone."
    ours_model, st_model = models[1]
    inputs = columns(('mnrl hard only',), 5, 3)
    with torch.no_grad():
        ours = cl.MultipleNegativesRankingLoss(ours_model, num_negatives=0)(inputs).item()
        alone = [st_losses.MultipleNegativesRankingLoss(st_model)([[c[row]] for c in inputs], None).item() for row in range(5)]
    assert abs(ours - sum(alone) / 5) <= 1e-5 and ours > 1e-3


@pytest.mark.parametrize('num_negatives', [1, 4, None])
def test_in_batch_negatives_are_the_ones_sentence_transformers_draws(models, num_negatives):
    ours_model, st_model = models[1]
    anchors, *candidates = columns(('draw', num_negatives), 7, 3)
    torch.manual_seed(5)
    ours = cl.MultipleNegativesRankingLoss(ours_model, num_negatives=num_negatives).in_batch_negatives(candidates)
    torch.manual_seed(5)
    theirs = list(st_losses.MultipleNegativesRankingLoss(st_model, num_negatives=num_negatives).get_in_batch_negatives(anchors, candidates))
    assert ours == theirs and len(ours) == (num_negatives or 2 * 6)
    for column in ours:  # never a candidate of the anchor's own row
        assert all(text not in (candidates[0][row], candidates[1][row]) for row, text in enumerate(column))


@pytest.mark.parametrize('seed', SEEDS)
@pytest.mark.parametrize('case', ['margin, one negative', 'margins', 'teacher scores', 'list of tensors', 'one column of margins'])
def test_margin_mse_matches(models, case, seed):
    negatives = 1 if case in ('margin, one negative', 'one column of margins') else 3
    inputs = columns(('margin', case, seed), 6, 2 + negatives)
    g = torch.Generator().manual_seed(seed)
    labels = {'margin, one negative': torch.randn(6, generator=g), 'margins': torch.randn(6, 3, generator=g),
              'teacher scores': 3 * torch.randn(6, 4, generator=g),
              'list of tensors': list(torch.randn(6, 4, generator=g)),
              'one column of margins': torch.randn(6, 1, generator=g)}[case]
    kwargs = dict(activation_fn=torch.nn.Sigmoid()) if case == 'margins' else {}
    assert_parity(models, 'MarginMSELoss', inputs, labels, **kwargs)


# ---- listwise, on lists of different lengths

LENGTHS = [[4, 1, 6, 3], [5, 5, 2], [2, 7]]
SCHEMES = ['NoWeightingScheme', 'NDCGLoss1Scheme', 'NDCGLoss2Scheme', 'LambdaRankScheme', 'NDCGLoss2PPScheme']


@pytest.mark.parametrize('lengths', LENGTHS, ids=str)
@pytest.mark.parametrize('kwargs', [{}, dict(mini_batch_size=3), dict(mini_batch_size=0, activation_fn=torch.nn.Sigmoid())], ids=str)
def test_list_net_matches(models, lengths, kwargs):
    inputs, labels = ragged(('listnet', str(lengths), str(kwargs)), lengths)
    assert_parity(models, 'ListNetLoss', inputs, labels, **kwargs)


@pytest.mark.parametrize('lengths', LENGTHS[:2], ids=str)
@pytest.mark.parametrize('scheme', SCHEMES)
@pytest.mark.parametrize('kwargs', [{}, dict(k=2, sigma=2.0), dict(reduction_log='natural', mini_batch_size=5)], ids=str)
def test_lambda_loss_matches(models, lengths, scheme, kwargs):
    inputs, labels = ragged(('lambda', str(lengths), scheme, str(kwargs)), lengths)
    assert_parity(models, 'LambdaLoss', inputs, labels, weighting_scheme=getattr(cl, scheme)(), **kwargs,
                  st_kwargs=dict(weighting_scheme=getattr(st_losses, scheme)(), **kwargs))


def test_lambda_loss_default_and_mu_match(models):
    inputs, labels = ragged(('lambda mu',), [3, 6, 4])
    assert_parity(models, 'LambdaLoss', inputs, labels, st_kwargs={})
    assert_parity(models, 'LambdaLoss', inputs, labels, weighting_scheme=cl.NDCGLoss2PPScheme(mu=3.0),
                  st_kwargs=dict(weighting_scheme=st_losses.NDCGLoss2PPScheme(mu=3.0)))


@pytest.mark.parametrize('lengths', LENGTHS, ids=str)
@pytest.mark.parametrize('kwargs', [{}, dict(k=1), dict(sigma=0.5, reduction_log='natural', activation_fn=torch.nn.Tanh())], ids=str)
def test_rank_net_matches(models, lengths, kwargs):
    inputs, labels = ragged(('ranknet', str(lengths), str(kwargs)), lengths)
    assert_parity(models, 'RankNetLoss', inputs, labels, **kwargs)


def test_labels_as_lists_or_one_matrix_give_the_same_loss(models):
    model = models[1][0]
    inputs, labels = ragged(('label forms',), [3, 3])
    for name in ('ListNetLoss', 'LambdaLoss', 'RankNetLoss'):
        loss = getattr(cl, name)(model)
        with torch.no_grad():
            expected = loss(inputs, labels)
            assert loss(inputs, [t.tolist() for t in labels]) == expected
            assert loss(inputs, torch.stack(labels)) == expected


@pytest.mark.parametrize('mini_batch_size,forwards', [(None, 4), (3, 5), (0, 1), (-1, 1), (100, 1)])
def test_mini_batch_size_sets_the_pairs_a_forward(models, monkeypatch, mini_batch_size, forwards):
    model = models[1][0]
    inputs, labels = ragged(('forwards',), [4, 1, 6, 3])  # 14 pairs, 4 queries
    calls = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), 'forward', lambda self, features: calls.append(len(features['input_ids'])) or forward(self, features))
    cl.ListNetLoss(model, mini_batch_size=mini_batch_size)(inputs, labels)
    assert len(calls) == forwards and sum(calls) == 14


# ---- configs, for model cards

def st_config(loss):
    config = loss.get_config_dict()
    if 'weighting_scheme' in config: config['weighting_scheme'] = config['weighting_scheme'].rsplit('.', 1)[-1]
    return config

@pytest.mark.parametrize('name,kwargs', [
    ('BinaryCrossEntropyLoss', {}), ('BinaryCrossEntropyLoss', dict(pos_weight=torch.tensor(2.5), activation_fn=torch.nn.Sigmoid())),
    ('MultipleNegativesRankingLoss', {}), ('MultipleNegativesRankingLoss', dict(num_negatives=None, scale=5.0)),
    ('MarginMSELoss', {}), ('ListNetLoss', {}), ('ListNetLoss', dict(mini_batch_size=8)),
    ('LambdaLoss', {}), ('LambdaLoss', dict(k=5, sigma=0.5, eps=1e-6, reduction_log='natural')), ('RankNetLoss', dict(k=3))])
def test_config_names_the_hyperparameters_as_sentence_transformers_does(models, name, kwargs):
    ours = getattr(cl, name)(models[1][0], **kwargs).config
    if 'weighting_scheme' in ours:
        assert ours['weighting_scheme'].startswith('infer.cross_losses.')
        ours['weighting_scheme'] = ours['weighting_scheme'].rsplit('.', 1)[-1]
    assert ours == st_config(getattr(st_losses, name)(models[1][1], **kwargs))

def test_config_of_the_losses_sentence_transformers_gives_none(models):
    assert cl.CrossEntropyLoss(models[3][0]).config == {'activation_fn': 'torch.nn.modules.linear.Identity'}
    assert cl.MultipleNegativesRankingLoss(models[1][0], activation_fn=None).config['activation_fn'] is None


def test_losses_are_modules_that_move_with_their_model(models):
    loss = cl.LambdaLoss(models[1][0])
    assert isinstance(loss, torch.nn.Module) and loss.model is models[1][0]
    assert {id(p) for p in loss.parameters()} >= {id(p) for p in models[1][0].parameters()}


# ---- bad input: a clear CrossLossError before any forward

Q2 = [['q1', 'q2'], ['d1', 'd2']]
LIST_INPUTS = [['q1', 'q2'], [['a', 'b'], ['c']]]
LIST_LABELS = [torch.tensor([1.0, 0.0]), torch.tensor([1.0])]
BAD_INPUT = [
    ('BinaryCrossEntropyLoss', {}, [['q1', 'q2']], torch.ones(2), r'takes 2 text columns \(queries, documents\), and got 1'),
    ('BinaryCrossEntropyLoss', {}, Q2 + [['n1', 'n2']], torch.ones(2), 'takes 2 text columns.*got 3'),
    ('BinaryCrossEntropyLoss', {}, [['q1', 'q2'], ['d1']], torch.ones(2), r'the columns hold \[2, 1\] texts'),
    ('BinaryCrossEntropyLoss', {}, [['q1', 'q2'], 'd1'], torch.ones(2), r'inputs\[1\] must be a list of texts, not a str'),
    ('BinaryCrossEntropyLoss', {}, [['q1', 3], ['d1', 'd2']], torch.ones(2), r'inputs\[0\]\[1\] is a int, not a text'),
    ('BinaryCrossEntropyLoss', {}, Q2, None, 'needs labels: one number in'),
    ('BinaryCrossEntropyLoss', {}, Q2, torch.ones(3), r'labels have shape \(3,\).*for each of the 2 pairs'),
    ('BinaryCrossEntropyLoss', {}, Q2, torch.ones(2, 2), r'labels have shape \(2, 2\)'),
    ('BinaryCrossEntropyLoss', {}, Q2, torch.tensor([0.0, 5.0]), r'must lie in \[0, 1\].*0 to 5'),
    ('BinaryCrossEntropyLoss', {}, Q2, ['yes', 'no'], 'labels must be numbers'),
    ('BinaryCrossEntropyLoss', {}, Q2, torch.tensor([0.0, float('nan')]), 'finite numbers'),
    ('CrossEntropyLoss', {}, Q2, torch.tensor([0.0, 2.0]), r'float labels of shape \(2,\).*labels.long\(\)'),
    ('CrossEntropyLoss', {}, Q2, torch.tensor([0, 3]), r'labels \[3\] are not classes of this 3-label model'),
    ('CrossEntropyLoss', {}, Q2, torch.tensor([[0, 1, 2]]), r'labels have shape \(1, 3\)'),
    ('CrossEntropyLoss', {}, Q2, torch.rand(2, 2), r'float labels of shape \(2, 2\).*a row of 3 class probabilities'),
    ('MultipleNegativesRankingLoss', {}, [['q1', 'q2']], None, r'at least 2 text columns \(anchors, positives, negatives...\), and got 1'),
    ('MultipleNegativesRankingLoss', {}, 'q1', None, 'inputs must be a list of text columns'),
    ('MarginMSELoss', {}, Q2, torch.ones(2), r'at least 3 text columns \(queries, positives, negatives...\), and got 2'),
    ('MarginMSELoss', {}, Q2 + [['n1', 'n2']], torch.ones(2, 3), r'labels have shape \(2, 3\); wanted.*shape \(2, 1\).*shape \(2, 2\)'),
    ('MarginMSELoss', {}, Q2 + [['n1', 'n2']] * 2, torch.ones(2), r'labels have shape \(2,\)'),
    ('MarginMSELoss', {}, Q2 + [['n1', 'n2']], [torch.ones(2), torch.ones(3)], 'label tensors differ in shape'),
    ('ListNetLoss', {}, LIST_INPUTS + [['x', 'y']], LIST_LABELS, r'takes 2 columns \(queries, a list of documents for each query\), and got 3'),
    ('ListNetLoss', {}, LIST_INPUTS, torch.tensor([1.0, 0.0]), r'labels must be a list of 2 label lists.*not a tensor of shape \(2,\)'),
    ('ListNetLoss', {}, LIST_INPUTS, [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])], r'labels have lengths \[2, 2\] and the document lists \[2, 1\]'),
    ('ListNetLoss', {}, LIST_INPUTS, [torch.tensor([1.0, 0.0])], r'labels have lengths \[2\]'),
    ('ListNetLoss', {}, LIST_INPUTS, [1.0, 0.0], r'labels have lengths \[.*\(\)'),
    ('ListNetLoss', {}, [['q1', 'q2'], [['a', 'b']]], LIST_LABELS, 'one list of documents for each of the 2 queries'),
    ('LambdaLoss', {}, [['q1', 'q2'], [['a', 'b'], []]], LIST_LABELS, r'queries \[1\] have no documents'),
    ('LambdaLoss', {}, [['q1', 'q2'], [['a', 'b'], 'c']], LIST_LABELS, r'inputs\[1\]\[1\] \(the documents of query 1\) must be a list of texts'),
    ('RankNetLoss', {}, LIST_INPUTS, [torch.tensor([1.0, float('inf')]), torch.tensor([1.0])], 'finite numbers'),
]


@pytest.mark.parametrize('name,kwargs,inputs,labels,match', BAD_INPUT, ids=[f'{c[0]}-{c[4][:40]}' for c in BAD_INPUT])
def test_bad_input_raises_before_any_forward(models, monkeypatch, name, kwargs, inputs, labels, match):
    loss = getattr(cl, name)(models[3 if name == 'CrossEntropyLoss' else 1][0], **kwargs)
    monkeypatch.setattr(cl, 'pair_logits', lambda *a, **k: pytest.fail('a forward ran before the input was checked'))
    with pytest.raises(cl.CrossLossError, match=match):
        loss(inputs, labels)
    assert issubclass(cl.CrossLossError, ValueError)


ONE_LABEL = ['BinaryCrossEntropyLoss', 'MultipleNegativesRankingLoss', 'MarginMSELoss', 'ListNetLoss', 'LambdaLoss', 'RankNetLoss']

@pytest.mark.parametrize('name', ONE_LABEL)
def test_one_label_losses_refuse_a_three_label_model(models, name):
    with pytest.raises(cl.CrossLossError, match=f'{name} needs a model with one label .* this one has 3; .*CrossEntropyLoss'):
        getattr(cl, name)(models[3][0])

def test_cross_entropy_refuses_a_one_label_model(models):
    with pytest.raises(cl.CrossLossError, match='picks one of several classes and this model has 1 label.*BinaryCrossEntropyLoss'):
        cl.CrossEntropyLoss(models[1][0])

@pytest.mark.parametrize('name', ONE_LABEL + ['CrossEntropyLoss'])
def test_losses_refuse_a_model_that_is_not_an_infer_cross_encoder(models, name):
    with pytest.raises(cl.CrossLossError, match='trains an infer.cross_encoder.CrossEncoder, not a CrossEncoder; load one with CrossEncoder'):
        getattr(cl, name)(models[1][1])  # sentence-transformers' own

@pytest.mark.parametrize('name,kwargs,match', [
    ('LambdaLoss', dict(reduction_log='log10'), "reduction_log must be 'binary'.*or 'natural'.*not 'log10'"),
    ('RankNetLoss', dict(k=0), 'k must be a positive number of top ranks'),
    ('LambdaLoss', dict(k=2.5), 'k must be a positive number of top ranks'),
    ('MultipleNegativesRankingLoss', dict(num_negatives=-1), 'num_negatives must be a count'),
])
def test_bad_hyperparameters_raise(models, name, kwargs, match):
    with pytest.raises(cl.CrossLossError, match=match):
        getattr(cl, name)(models[1][0], **kwargs)
