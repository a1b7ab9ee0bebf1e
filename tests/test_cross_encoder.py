"""`CrossEncoder` gives sentence-transformers' scores, proved on tiny random models built on the fly.

Tiny BERT (segment ids), RoBERTa and DistilBERT (none) sequence classifiers with random, seeded weights carry
the bert-base-uncased tokenizer of all-MiniLM-L6-v2, cut to 64 tokens so that some pairs of real texts are
truncated. sentence-transformers saves the folders and is the reference: with one label (sigmoid) and three
(identity, and `apply_softmax`), scores agree to 1e-5 (float32, CPU) and rankings are identical, in batches that
differ between the two libraries. Folders travel both ways (sentence-transformers 6's into infer, infer's into
sentence-transformers with its activation), and plain Hugging Face folders load with the activation their
config.json names under the old keys. Bad input raises before any work, with a message that names the fix.
"""
import json
import shutil
import zlib

import numpy as np
import pytest
import torch
from sentence_transformers import CrossEncoder as STCrossEncoder
from sentence_transformers import SentenceTransformer
from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification, DistilBertConfig,
                          DistilBertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification)

from infer.cross_encoder import ClassifierTransformer, CrossEncoder
from infer.encoder import minilm_path
from infer.texts import sample_texts

pytestmark = [pytest.mark.filterwarnings('ignore:.*were truncated:UserWarning'), pytest.mark.usefixtures('one_torch_thread')]

MAX_LEN = 64
SHAPE = dict(vocab_size=30522, max_position_embeddings=128, pad_token_id=0, initializer_range=0.2)
ARCHS = {  # config class, model class, shape, whether the model reads segment ids
    'bert': (BertConfig, BertForSequenceClassification,
             dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64), True),
    'roberta': (RobertaConfig, RobertaForSequenceClassification,
                dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, type_vocab_size=1), False),
    'distilbert': (DistilBertConfig, DistilBertForSequenceClassification, dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64), False),
}
SMALL_BATCHES = dict(max_batch_tokens=8 * MAX_LEN)  # ours: 8 full-length pairs a batch, more short ones; theirs: 16 pairs
SIGMOID, IDENTITY, TANH = ('torch.nn.modules.activation.Sigmoid', 'torch.nn.modules.linear.Identity',
                           'torch.nn.modules.activation.Tanh')


@pytest.fixture(scope='module')
def hf_folder(tmp_path_factory):
    "A plain Hugging Face folder of a tiny random `arch` classifier with `num_labels` labels."
    made = {}
    def make(arch='bert', num_labels=1):
        if (arch, num_labels) not in made:
            path = tmp_path_factory.mktemp(f'{arch}-{num_labels}')
            config_cls, model_cls, shape, segments = ARCHS[arch]
            torch.manual_seed(num_labels)
            model_cls(config_cls(**SHAPE, **shape, num_labels=num_labels)).save_pretrained(path)
            names = {} if segments else dict(model_input_names=['input_ids', 'attention_mask'])
            AutoTokenizer.from_pretrained(minilm_path(), model_max_length=MAX_LEN, **names).save_pretrained(path)
            made[arch, num_labels] = path
        return made[arch, num_labels]
    return make


@pytest.fixture(scope='module')
def st_folder(tmp_path_factory, hf_folder):
    "The same model saved by sentence-transformers 6 as a CrossEncoder (modules.json, transformer_task)."
    made = {}
    def make(arch='bert', num_labels=1):
        if (arch, num_labels) not in made:
            path = tmp_path_factory.mktemp(f'st-{arch}-{num_labels}')
            STCrossEncoder(str(hf_folder(arch, num_labels)), device='cpu').save(str(path))
            made[arch, num_labels] = path
        return made[arch, num_labels]
    return make


def both(path, **kwargs): return CrossEncoder(path, **kwargs), STCrossEncoder(str(path), device='cpu', **kwargs)

def pairs_for(*key, n=48):
    "Pairs of real texts of varied length: short query-like texts against documents, some longer than 64 tokens."
    texts = sample_texts(2 * n, seed=zlib.crc32(repr(key).encode()))
    return list(zip(texts[:n], texts[n:]))

def read(path, name): return json.loads((path / name).read_text())


def assert_same(ours, theirs, atol=1e-5):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape, (ours.dtype, ours.shape, theirs.shape)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=atol)


def test_pairs_of_real_texts_are_truncated_some_of_the_time(st_folder):
    ours = CrossEncoder(st_folder('bert'))
    tok = ours.tokenize(pairs_for('bert', 1))
    assert 0 < tok.num_truncated < len(tok.ids) and max(tok.lengths) == MAX_LEN
    with pytest.warns(UserWarning, match=rf'{tok.num_truncated} of 48 pairs were longer than max_seq_length=64'):
        ours.predict(pairs_for('bert', 1))


@pytest.mark.parametrize('num_labels', [1, 3])
@pytest.mark.parametrize('arch', ARCHS)
def test_scores_match_sentence_transformers(st_folder, arch, num_labels):
    path = st_folder(arch, num_labels)
    assert read(path, 'sentence_bert_config.json')['transformer_task'] == 'sequence-classification'
    ours, theirs = both(path)
    assert type(ours.activation_fn) is type(theirs.activation_fn) is (torch.nn.Sigmoid if num_labels == 1 else torch.nn.Identity)
    assert ours.num_labels == theirs.num_labels == num_labels and ours.max_seq_length == theirs.max_seq_length == MAX_LEN
    uses_segments = 'token_type_ids' in theirs.tokenizer('a', 'b')
    assert uses_segments == ARCHS[arch][3] and (ours.tokenize([('a', 'b')]).type_ids is not None) == uses_segments
    pairs = pairs_for(arch, num_labels)
    expected = theirs.predict(pairs, batch_size=16)
    assert_same(ours.predict(pairs, **SMALL_BATCHES), expected)
    assert expected.shape == ((len(pairs),) if num_labels == 1 else (len(pairs), num_labels))
    assert np.ptp(expected, axis=0).min() > 0.05  # the scores differ from pair to pair: the parity means something
    if num_labels > 1:
        soft = ours.predict(pairs, apply_softmax=True, **SMALL_BATCHES)
        assert_same(soft, theirs.predict(pairs, apply_softmax=True, batch_size=16))
        np.testing.assert_allclose(soft.sum(1), 1, rtol=1e-6)


@pytest.mark.parametrize('arch', ARCHS)
def test_rankings_match_sentence_transformers(st_folder, arch):
    ours, theirs = both(st_folder(arch, 1))
    texts = sample_texts(42, seed=zlib.crc32(arch.encode()))
    for query in texts[:2]:
        documents = texts[2:]
        mine = ours.rank(query, documents, return_documents=True, **SMALL_BATCHES)
        ref = theirs.rank(query, documents, return_documents=True, batch_size=16)
        assert [h['corpus_id'] for h in mine] == [h['corpus_id'] for h in ref]
        assert [h['text'] for h in mine] == [h['text'] for h in ref]
        np.testing.assert_allclose([h['score'] for h in mine], [h['score'] for h in ref], rtol=0, atol=1e-5)
        top = ours.rank(query, documents, top_k=5)
        assert [h['corpus_id'] for h in top] == [h['corpus_id'] for h in ref[:5]] and set(top[0]) == {'corpus_id', 'score'}


def test_scores_do_not_depend_on_batching_and_keep_input_order(st_folder):
    ours = CrossEncoder(st_folder('bert', 3))
    pairs = pairs_for('batching', n=24)
    expected = ours.predict(pairs)
    for kwargs in (dict(batch_size=1), dict(batch_size=5), dict(max_batch_tokens=MAX_LEN), dict(batch_size=3, max_batch_tokens=10_000)):
        assert_same(ours.predict(pairs, **kwargs), expected)
    assert_same(ours.predict(pairs[::-1])[::-1], expected)
    assert_same(ours.predict(pairs[7]), expected[7])
    assert ours.predict(pairs[7]).shape == (3,) and CrossEncoder(st_folder('bert', 1)).predict(pairs[7]).shape == ()


def test_one_pair_and_output_types_match_sentence_transformers(st_folder):
    ours, theirs = both(st_folder('roberta', 1))
    pair = ('who compresses files?', 'The gzip module compresses files.')
    assert_same(ours.predict(pair), theirs.predict(pair))
    assert_same(ours.predict(list(pair)), theirs.predict(list(pair)))
    t = ours.predict([pair, pair], convert_to_tensor=True)
    assert isinstance(t, torch.Tensor) and t.shape == (2,) and t.dtype == torch.float32
    as_list = ours.predict([pair, pair], convert_to_numpy=False)
    assert isinstance(as_list, list) and len(as_list) == 2 and isinstance(as_list[0], torch.Tensor)
    assert_same(ours.predict(np.array([pair, pair])), theirs.predict([pair, pair]))


def test_activation_given_per_call_or_to_the_model_matches(st_folder):
    ours, theirs = both(st_folder('bert', 1))
    pairs = pairs_for('activation')
    identity = ours.predict(pairs, activation_fn=torch.nn.Identity())
    assert_same(identity, theirs.predict(pairs, activation_fn=torch.nn.Identity()))
    assert_same(ours.predict(pairs, activation_fn='torch.nn.Tanh'), np.tanh(identity), atol=1e-6)
    assert type(ours.activation_fn) is torch.nn.Sigmoid  # a per-call activation is not kept
    tanh = CrossEncoder(st_folder('bert', 1), activation_fn=torch.nn.Tanh())
    assert_same(tanh.predict(pairs), STCrossEncoder(str(st_folder('bert', 1)), activation_fn=torch.nn.Tanh()).predict(pairs))


def test_max_length_matches_sentence_transformers(st_folder):
    ours, theirs = both(st_folder('bert', 1), max_length=24)
    assert ours.max_seq_length == theirs.max_seq_length == 24
    pairs = pairs_for('max_length')
    assert ours.tokenize(pairs).num_truncated > len(pairs) // 2
    assert_same(ours.predict(pairs, max_batch_tokens=48), theirs.predict(pairs, batch_size=16))
    ours.max_seq_length = 40
    assert max(ours.tokenize(pairs).lengths) == 40


def test_saved_max_length_is_read_by_both(tmp_path, hf_folder):
    CrossEncoder(hf_folder('roberta', 1), max_length=40).save(tmp_path)
    ours, theirs = both(tmp_path)
    assert ours.max_seq_length == theirs.max_seq_length == 40
    pairs = pairs_for('saved max_length')
    assert max(ours.tokenize(pairs).lengths) == 40
    assert_same(ours.predict(pairs), theirs.predict(pairs))


@pytest.mark.parametrize('arch,num_labels,activation', [('bert', 1, TANH), ('roberta', 3, IDENTITY), ('distilbert', 1, SIGMOID)])
def test_folder_saved_by_infer_loads_in_sentence_transformers(tmp_path, hf_folder, arch, num_labels, activation):
    ours = CrossEncoder(hf_folder(arch, num_labels), activation_fn=activation)
    ours.save(tmp_path)
    assert read(tmp_path, 'modules.json') == [{'idx': 0, 'name': '0', 'path': '', 'type': 'sentence_transformers.models.Transformer'}]
    assert read(tmp_path, 'sentence_bert_config.json')['transformer_task'] == 'sequence-classification'
    cfg = read(tmp_path, 'config_sentence_transformers.json')
    assert {k: cfg[k] for k in ('model_type', 'activation_fn', 'prompts', 'default_prompt_name')} == \
        {'model_type': 'CrossEncoder', 'activation_fn': activation, 'prompts': {}, 'default_prompt_name': None}
    assert {'infer', 'transformers', 'pytorch'} <= set(cfg['__version__'])
    assert read(tmp_path, 'config.json')['sentence_transformers'] == {'activation_fn': activation}
    theirs, reloaded = STCrossEncoder(str(tmp_path), device='cpu'), CrossEncoder(tmp_path)
    assert f'{type(theirs.activation_fn).__module__}.{type(theirs.activation_fn).__name__}' == activation
    assert type(reloaded.activation_fn) is type(ours.activation_fn)
    assert theirs.num_labels == reloaded.num_labels == num_labels and theirs.max_seq_length == MAX_LEN
    pairs = pairs_for('infer-saved', arch)
    expected = ours.predict(pairs)
    assert_same(theirs.predict(pairs, batch_size=16), expected)
    assert_same(reloaded.predict(pairs, **SMALL_BATCHES), expected)


def test_older_sentence_transformers_reads_the_activation_from_config_json(tmp_path, hf_folder):
    "Without modules.json and config_sentence_transformers.json, sentence-transformers reads what 4.x and 5.x read."
    CrossEncoder(hf_folder('bert', 1), activation_fn='torch.nn.Tanh').save(tmp_path)
    for name in ('modules.json', 'config_sentence_transformers.json', 'sentence_bert_config.json'): (tmp_path / name).unlink()
    ours, theirs = both(tmp_path)
    assert type(ours.activation_fn) is type(theirs.activation_fn) is torch.nn.Tanh
    pairs = pairs_for('older')
    assert_same(ours.predict(pairs), theirs.predict(pairs))


@pytest.mark.parametrize('key,value,expected', [
    ('sbert_ce_default_activation_function', IDENTITY, torch.nn.Identity),
    ('sentence_transformers', {'activation_fn': TANH}, torch.nn.Tanh),
    (None, None, torch.nn.Sigmoid)])
def test_plain_hugging_face_folder_loads_with_its_activation(tmp_path, hf_folder, key, value, expected):
    shutil.copytree(hf_folder('bert', 1), tmp_path, dirs_exist_ok=True)
    if key:
        config = read(tmp_path, 'config.json')
        (tmp_path / 'config.json').write_text(json.dumps({**config, key: value}))
    assert not (tmp_path / 'modules.json').exists()
    ours, theirs = both(tmp_path)
    assert type(ours.activation_fn) is type(theirs.activation_fn) is expected
    pairs = pairs_for('plain', key)
    assert_same(ours.predict(pairs, **SMALL_BATCHES), theirs.predict(pairs, batch_size=16))


def test_three_label_plain_folder_defaults_to_identity(hf_folder):
    ours, theirs = both(hf_folder('distilbert', 3))
    assert type(ours.activation_fn) is type(theirs.activation_fn) is torch.nn.Identity
    pairs = pairs_for('plain3')
    assert_same(ours.predict(pairs), theirs.predict(pairs))


def test_a_module_given_directly_scores_as_its_folder_does(hf_folder):
    path = hf_folder('roberta', 3)
    direct = CrossEncoder(modules=[ClassifierTransformer.load(path)], activation_fn=torch.nn.Tanh())
    pairs = pairs_for('modules')
    assert_same(direct.predict(pairs), CrossEncoder(path, activation_fn='torch.nn.Tanh').predict(pairs), atol=0)


def test_bfloat16_model_gives_float32_scores(st_folder):
    path = st_folder('bert', 1)
    pairs = pairs_for('bf16')
    half = CrossEncoder(path, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    scores = half.predict(pairs)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, CrossEncoder(path).predict(pairs), atol=0.05)


# ---- bad input: raised before any work, with the fix in the message, and nothing changed

PAIR = ('a query', 'a document')
BAD_PREDICT = [
    (dict(pairs=[]), ValueError, 'no pairs to score'),
    (dict(pairs='just a string'), TypeError, 'not a single string'),
    (dict(pairs=None), TypeError, 'not NoneType'),
    (dict(pairs=['q', 'd', 'e']), ValueError, 'a pair is two texts'),
    (dict(pairs=[PAIR, ('q', 'd', 'e')]), ValueError, r'pairs\[1\] has 3 members'),
    (dict(pairs=[PAIR, ('q',)]), ValueError, r'pairs\[1\] has 1 members'),
    (dict(pairs=[PAIR, 'q']), TypeError, r'pairs\[1\] is a str, not a \(query, document\) pair'),
    (dict(pairs=[PAIR, ('q', 3)]), TypeError, r'pairs\[1\]\[1\] is a int, not a string'),
    (dict(pairs=('q', None)), TypeError, r'pair\[1\] is a NoneType'),
    (dict(pairs=[PAIR], batch_size=0), ValueError, 'batch_size must be a positive number'),
    (dict(pairs=[PAIR], batch_size=2.5), ValueError, 'batch_size must be a positive number'),
    (dict(pairs=[PAIR], max_batch_tokens=0), ValueError, 'max_batch_tokens must be a positive number'),
    (dict(pairs=[PAIR], max_batch_tokens=MAX_LEN - 1), ValueError, 'smaller than max_seq_length=64'),
    (dict(pairs=[PAIR], activation_fn='os.system'), ValueError, 'is not supported'),
    (dict(pairs=[PAIR], activation_fn=3), TypeError, 'activation_fn must be a callable'),
]
BAD_RANK = [
    (dict(query='q', documents=[]), ValueError, 'no documents to rank'),
    (dict(query='q', documents='one document'), TypeError, r'wrap it: \[document\]'),
    (dict(query=None, documents=['d']), TypeError, 'query must be a string'),
    (dict(query='q', documents=['d', 5]), TypeError, r'documents\[1\] is a int'),
    (dict(query='q', documents=['d'], top_k=0), ValueError, 'top_k must be a positive number'),
    (dict(query='q', documents=['d'], top_k=-3), ValueError, 'top_k must be a positive number'),
    (dict(query='q', documents=['d'], top_k=1.5), ValueError, 'top_k must be a positive number'),
    (dict(query='q', documents=['d'], batch_size=-1), ValueError, 'batch_size must be a positive number'),
    (dict(query='q', documents=['d'], max_batch_tokens=8), ValueError, 'smaller than max_seq_length=64'),
]


@pytest.fixture(scope='module')
def model_and_scores(st_folder):
    ours = CrossEncoder(st_folder('bert', 1))
    return ours, ours.predict(pairs_for('unchanged'))


BAD_INPUT = [('predict', *case) for case in BAD_PREDICT] + [('rank', *case) for case in BAD_RANK]


@pytest.mark.parametrize('method,kwargs,error,match', BAD_INPUT, ids=[f'{m}-{e}' for m, _, _, e in BAD_INPUT])
def test_bad_input_raises_before_any_work(model_and_scores, monkeypatch, method, kwargs, error, match):
    ours, expected = model_and_scores
    monkeypatch.setattr(type(ours), '_logits', lambda *a, **k: pytest.fail('work started before the input was checked'))
    with pytest.raises(error, match=match):
        getattr(ours, method)(**kwargs)
    monkeypatch.undo()
    assert np.array_equal(ours.predict(pairs_for('unchanged')), expected)


def test_rank_needs_one_label(st_folder):
    with pytest.raises(ValueError, match=r'one label .* this one has 3; score the pairs with predict'):
        CrossEncoder(st_folder('bert', 3)).rank('q', ['d'])


def test_bad_settings_raise(st_folder):
    path = st_folder('bert', 1)
    with pytest.raises(ValueError, match='max_length must be a positive number of tokens'):
        CrossEncoder(path, max_length=0)
    with pytest.raises(ValueError, match='torch.nn activations Identity, Tanh'):
        CrossEncoder(path, activation_fn='mypackage.Scorer')
    with pytest.raises(ValueError, match='not both'):
        CrossEncoder(path, modules=[])
    with pytest.raises(ValueError, match='one ClassifierTransformer'):
        CrossEncoder(modules=[])
    ours = CrossEncoder(path)
    with pytest.raises(ValueError, match='is not supported'):
        ours.activation_fn = torch.nn.Softmax(dim=-1)
    with pytest.raises(ValueError, match='max_length must be a positive'):
        ours.max_seq_length = -1
    assert type(ours.activation_fn) is torch.nn.Sigmoid and ours.max_seq_length == MAX_LEN


def test_folders_that_are_not_one_classifier_are_refused_by_name(tmp_path, st_folder, hf_folder):
    with pytest.raises(ValueError, match=r"lists \['sentence_transformers.models.Transformer', 'sentence_transformers.models.Pooling'"):
        CrossEncoder(minilm_path())  # a bi-encoder
    bi = tmp_path / 'bi'
    SentenceTransformer(str(minilm_path()), device='cpu')[0].save(str(bi))  # one Transformer, feature-extraction
    (bi / 'modules.json').write_text(json.dumps([{'idx': 0, 'name': '0', 'path': '', 'type': 'sentence_transformers.models.Transformer'}]))
    with pytest.raises(ValueError, match="'feature-extraction' Transformer.*infer.encoder.SentenceEncoder"):
        CrossEncoder(bi)
    sparse = tmp_path / 'sparse'
    shutil.copytree(st_folder('bert', 1), sparse)
    (sparse / 'config_sentence_transformers.json').write_text(json.dumps({'model_type': 'SparseEncoder'}))
    with pytest.raises(ValueError, match='holds a SparseEncoder, not a CrossEncoder; load it with infer.sparse.SparseEncoder'):
        CrossEncoder(sparse)
    causal = tmp_path / 'causal'
    shutil.copytree(hf_folder('bert', 1), causal)
    (causal / 'config.json').write_text(json.dumps({**read(causal, 'config.json'), 'architectures': ['Qwen3ForCausalLM']}))
    with pytest.raises(ValueError, match='causal language model.*LogitScore'):
        CrossEncoder(causal)


def test_unsupported_activation_in_a_folder_is_named_with_the_fix(tmp_path, st_folder):
    shutil.copytree(st_folder('bert', 1), tmp_path, dirs_exist_ok=True)
    cfg = read(tmp_path, 'config_sentence_transformers.json')
    (tmp_path / 'config_sentence_transformers.json').write_text(json.dumps({**cfg, 'activation_fn': 'mypackage.Scorer'}))
    with pytest.raises(ValueError, match=r"config_sentence_transformers.json: activation_fn.*'mypackage.Scorer'.*pass activation_fn="):
        CrossEncoder(tmp_path)
    assert type(CrossEncoder(tmp_path, activation_fn='torch.nn.Sigmoid').activation_fn) is torch.nn.Sigmoid


def test_a_base_model_without_a_trained_head_warns(tmp_path):
    from transformers import BertModel
    torch.manual_seed(0)
    BertModel(BertConfig(**SHAPE, **ARCHS['bert'][2])).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm_path(), model_max_length=MAX_LEN).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match='holds a BertModel, not a sequence-classification model'):
        CrossEncoder(tmp_path)
