"""`SentenceEncoder` gives sentence-transformers' vectors, proved on tiny random models built on the fly.

Tiny BERT and RoBERTa encoders (random weights, seeded) carry the real bert-base-uncased tokenizer of
all-MiniLM-L6-v2, cut to 64 tokens so that some texts are truncated. sentence-transformers builds and saves
the folders and is the reference: every pooling mode and a multi-mode mix, under Dense (tanh) and Normalize,
give the same vectors (cosine >= 0.99999 per row, float32, CPU) on real texts of varied length, in batches
that differ between the two libraries; so do left padding, a prompt that pooling leaves out, and
`truncate_dim` with `normalize_embeddings`. Folders travel both ways: infer's (legacy config keys) loads in
sentence-transformers, sentence-transformers 6's (new keys) and plain Hugging Face folders load in infer.
A broken folder raises instead of giving an encoder.
"""
import json
import zlib
from functools import cache

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Dense as STDense
from sentence_transformers.base.modules import Normalize as STNormalize
from sentence_transformers.base.modules import Transformer as STTransformer
from sentence_transformers.sentence_transformer.modules import Pooling as STPooling
from transformers import AutoTokenizer, BertConfig, BertModel, RobertaConfig, RobertaModel

from infer.encoder import Dense, Normalize, SentenceEncoder, Transformer, minilm_path
from infer.pooling import Pooling
from infer.texts import sample_texts

pytestmark = pytest.mark.filterwarnings('ignore:.*were truncated:UserWarning')

MAX_LEN, DIM, OUT = 64, 32, 24
TINY = dict(hidden_size=DIM, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128, vocab_size=30522, pad_token_id=0, initializer_range=0.2)
ARCHS = {'bert': (BertConfig, BertModel), 'roberta': (RobertaConfig, RobertaModel)}
MODES = ('cls', 'max', 'mean', 'mean_sqrt_len_tokens', 'weightedmean', 'lasttoken')
MIX = ('lasttoken', 'mean', 'cls')
SMALL_BATCHES = dict(max_batch_tokens=4 * MAX_LEN)


@pytest.fixture(scope='module')
def hf_folder(tmp_path_factory):
    "A plain Hugging Face folder of a tiny random `arch` model whose tokenizer pads on `side`."
    made = {}
    def make(arch='bert', side='right'):
        if (arch, side) not in made:
            path = tmp_path_factory.mktemp(f'{arch}-{side}')
            config_cls, model_cls = ARCHS[arch]
            torch.manual_seed(0)
            model_cls(config_cls(**TINY)).save_pretrained(path)
            AutoTokenizer.from_pretrained(minilm_path(), model_max_length=MAX_LEN, padding_side=side).save_pretrained(path)
            made[arch, side] = path
        return made[arch, side]
    return make


@cache
def st_transformer(base): return STTransformer(str(base))


def st_folder(path, base, modes, dense=True, normalize=True, include_prompt=True, prompts=None):
    "A folder saved by sentence-transformers: `base` + Pooling(`modes`) [+ Dense(tanh)] [+ Normalize]."
    modules = [st_transformer(base), STPooling(DIM, modes, include_prompt=include_prompt)]
    torch.manual_seed(1)
    if dense: modules.append(STDense(DIM * (1 if isinstance(modes, str) else len(modes)), OUT, activation_function=torch.nn.Tanh()))
    if normalize: modules.append(STNormalize())
    SentenceTransformer(modules=modules, prompts=prompts, device='cpu').save(str(path), create_model_card=False)
    return path


def mode_id(modes): return modes if isinstance(modes, str) else '+'.join(modes)

def both(path): return SentenceEncoder(path), SentenceTransformer(str(path), device='cpu')

def texts_for(*key, n=60): return sample_texts(n, seed=zlib.crc32(repr(key).encode()))

def module_config(path, kind):
    entry = next(e for e in json.loads((path / 'modules.json').read_text()) if e['type'].endswith(kind))
    return path / entry['path'], json.loads((path / entry['path'] / 'config.json').read_text())

def snapshot(path): return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob('*'))


def assert_same(ours, theirs):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    norms = np.linalg.norm(ours, axis=1), np.linalg.norm(theirs, axis=1)
    cos = (ours * theirs).sum(1) / (norms[0] * norms[1])
    assert cos.min() >= 0.99999, f'row {cos.argmin()}: cosine {cos.min():.7f}'
    np.testing.assert_allclose(*norms, rtol=1e-4)


def test_tiny_models_tell_texts_apart(tmp_path, hf_folder):
    vectors = SentenceEncoder(st_folder(tmp_path, hf_folder('bert'), 'cls')).encode(texts_for('apart'))
    cos = vectors @ vectors.T
    assert np.median(cos[np.triu_indices(len(cos), 1)]) < 0.9


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('modes', [*MODES, MIX], ids=mode_id)
def test_every_pooling_mode_matches(tmp_path, hf_folder, arch, modes):
    ours, theirs = both(st_folder(tmp_path, hf_folder(arch), modes))
    texts = texts_for(arch, modes)
    assert_same(ours.encode(texts, **SMALL_BATCHES), theirs.encode(texts, batch_size=16))


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('modes', [*MODES, MIX], ids=mode_id)
def test_left_padding_matches(tmp_path, hf_folder, arch, modes):
    ours, theirs = both(st_folder(tmp_path, hf_folder(arch, 'left'), modes))
    assert ours.tokenizer.padding_side == theirs.tokenizer.padding_side == 'left'
    assert theirs.tokenizer(['a', 'a b c'], padding=True)['attention_mask'][0][:2] == [0, 0]
    texts = texts_for(arch, modes, 'left')
    # BERT counts positions from the left edge, pads included: its vectors depend on the batch, in either library.
    batches = (dict(batch_size=len(texts), max_batch_tokens=MAX_LEN * len(texts)), dict(batch_size=len(texts))) \
        if arch == 'bert' else (SMALL_BATCHES, dict(batch_size=16))
    assert_same(ours.encode(texts, **batches[0]), theirs.encode(texts, **batches[1]))


@pytest.mark.parametrize('arch,side', [('bert', 'right'), ('roberta', 'left')])
@pytest.mark.parametrize('modes', ['mean', 'cls', 'weightedmean', 'lasttoken', ('cls', 'max')], ids=mode_id)
def test_prompt_left_out_of_pooling_matches(tmp_path, hf_folder, arch, side, modes):
    path = st_folder(tmp_path, hf_folder(arch, side), modes, include_prompt=False, prompts={'query': 'query: '})
    ours, theirs = both(path)
    assert ours.prompts == theirs.prompts and ours.prompts['query'] == 'query: '
    texts = texts_for(arch, modes, 'prompt')
    assert_same(ours.encode(texts, prompt_name='query', **SMALL_BATCHES),
                theirs.encode(texts, prompt_name='query', batch_size=16))


def test_folder_saved_by_infer_loads_in_sentence_transformers(tmp_path, hf_folder):
    torch.manual_seed(2)
    encoder = SentenceEncoder(modules=[Transformer.load(hf_folder('bert')), Pooling(DIM, ('cls', 'mean')),
                                       Dense(2 * DIM, OUT), Normalize()], prompts={'query': 'query: '})
    encoder.save(tmp_path)
    _, cfg = module_config(tmp_path, 'Pooling')
    assert cfg['word_embedding_dimension'] == DIM and 'embedding_dimension' not in cfg and 'pooling_mode' not in cfg
    assert {k for k, v in cfg.items() if k.startswith('pooling_mode_') and v} == {'pooling_mode_cls_token', 'pooling_mode_mean_tokens'}
    theirs, reloaded = SentenceTransformer(str(tmp_path), device='cpu'), SentenceEncoder(tmp_path)
    texts = texts_for('infer-saved')
    expected = encoder.encode(texts)
    assert_same(expected, theirs.encode(texts, batch_size=16))
    assert_same(reloaded.encode(texts, **SMALL_BATCHES), expected)
    assert_same(encoder.encode(texts, prompt_name='query'), theirs.encode(texts, prompt_name='query'))


def test_sentence_transformers_6_dialect_loads_in_infer(tmp_path, hf_folder):
    path = st_folder(tmp_path, hf_folder('roberta'), MIX)
    _, cfg = module_config(path, 'Pooling')
    assert cfg['embedding_dimension'] == DIM and cfg['pooling_mode'] == list(MIX)
    assert not [k for k in cfg if k == 'word_embedding_dimension' or k.startswith('pooling_mode_')]
    ours, theirs = both(path)
    assert ours.layers[1].modes == MIX and ours.embedding_dimension == theirs.get_embedding_dimension() == OUT
    texts = texts_for('st6-dialect')
    assert_same(ours.encode(texts, **SMALL_BATCHES), theirs.encode(texts))


@pytest.mark.parametrize('arch', ARCHS)
def test_plain_hugging_face_folder_is_mean_pooled_in_both(hf_folder, arch):
    path = hf_folder(arch)
    assert not (path / 'modules.json').exists()
    ours, theirs = both(path)
    assert [type(m).__name__ for m in ours.layers] == ['Transformer', 'Pooling'] and ours.layers[1].modes == ('mean',)
    texts = texts_for(arch, 'plain')
    assert_same(ours.encode(texts, **SMALL_BATCHES), theirs.encode(texts))


@pytest.mark.parametrize('normalize', [True, False], ids=['Normalize', 'no-Normalize'])
def test_truncate_dim_with_normalize_embeddings_matches(tmp_path, hf_folder, normalize):
    ours, theirs = both(st_folder(tmp_path, hf_folder('bert'), 'mean', normalize=normalize))
    texts = texts_for('truncate_dim', normalize)
    args = dict(truncate_dim=8, normalize_embeddings=True)
    a, b = ours.encode(texts, **args, **SMALL_BATCHES), theirs.encode(texts, **args)
    assert a.shape == (len(texts), 8)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, rtol=1e-5)
    assert_same(a, b)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_missing_dense_weights_raise_and_leave_nothing(tmp_path, hf_folder):
    path = st_folder(tmp_path, hf_folder('bert'), 'mean')
    dense, _ = module_config(path, 'Dense')
    for f in dense.iterdir():
        if f.name != 'config.json': f.unlink()
    before, encoder = snapshot(path), None
    with pytest.raises(FileNotFoundError, match='model.safetensors'):
        encoder = SentenceEncoder(path)
    assert encoder is None and snapshot(path) == before


def test_unsupported_module_type_is_named(tmp_path, hf_folder):
    path = st_folder(tmp_path, hf_folder('bert'), 'mean', dense=False)
    entries = json.loads((path / 'modules.json').read_text())
    n = len(entries)
    entries.append({'idx': n, 'name': str(n), 'path': f'{n}_LayerNorm', 'type': 'sentence_transformers.models.LayerNorm'})
    (path / 'modules.json').write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r'sentence_transformers\.models\.LayerNorm'):
        SentenceEncoder(path)
