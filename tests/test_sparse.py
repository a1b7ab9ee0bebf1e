"""`SparseEncoder` gives sentence-transformers' SPLADE vectors, proved on tiny random masked-language models.

Tiny BERT and DistilBERT MLMs (random weights, seeded) carry the real bert-base-uncased tokenizer of
all-MiniLM-L6-v2, cut to 64 tokens so that some texts are truncated. Their output bias is shifted so that
about 1% of the vocabulary is active, as in trained SPLADE models (a random model lights up nearly every
word, which would make "the same active dimensions" say little). sentence-transformers builds and saves the
folders and is the reference: for both pooling strategies and both activations the vectors have the same
active dimensions and the same weights to 1e-5 (float32, CPU), on real texts of varied length, in batches
that differ between the two libraries. The one exception allowed is a weight within rounding of zero
(below 1e-5, and at most one in 10,000 active dimensions): log1p(relu(x)) of an x that rounds to either
side of 0 is active in one batch layout and not in another, in either library against itself too. So do inference-free models (a Router with a static query table),
`max_active_dims`, and folders travelling both ways.
"""
import json
import zlib

import numpy as np
import pytest
import torch
from sentence_transformers import SparseEncoder as STSparseEncoder
from sentence_transformers.sparse_encoder.modules import Router as STRouter
from sentence_transformers.sparse_encoder.modules import SparseStaticEmbedding as STStatic
from sentence_transformers.sparse_encoder.modules import SpladePooling as STSpladePooling
from sentence_transformers.sparse_encoder.modules import Transformer as STTransformer
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

from infer.encoder import minilm_path
from infer.sparse import SparseEncoder, SparseIndex, keep_top
from infer.texts import sample_texts

pytestmark = pytest.mark.filterwarnings('ignore:.*were truncated:UserWarning')

MAX_LEN, VOCAB = 64, 30522
ARCHS = {
    'bert': lambda: BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                               max_position_embeddings=128, vocab_size=VOCAB, initializer_range=0.2)),
    'distilbert': lambda: DistilBertForMaskedLM(DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                                 max_position_embeddings=128, vocab_size=VOCAB, initializer_range=0.2)),
}
SMALL_BATCHES = dict(max_batch_tokens=4 * MAX_LEN)


def texts_for(*key, n=60): return sample_texts(n, seed=zlib.crc32(repr(key).encode()))


@pytest.fixture(scope='module')
def mlm_folder(tmp_path_factory):
    "A plain Hugging Face folder of a tiny random MLM of `arch`, about 1% of its vocabulary active on real text."
    made = {}
    def make(arch='bert'):
        if arch not in made:
            path = tmp_path_factory.mktemp(f'mlm-{arch}')
            torch.manual_seed(0)
            model = ARCHS[arch]().eval()
            tokenizer = AutoTokenizer.from_pretrained(minilm_path(), model_max_length=MAX_LEN)
            with torch.no_grad():
                batch = tokenizer(sample_texts(16, seed=99), padding=True, truncation=True, return_tensors='pt')
                batch.pop('token_type_ids', None)
                logits = model(**batch).logits[batch['attention_mask'].bool()]
                model.get_output_embeddings().bias -= torch.quantile(logits.flatten()[::7], 0.999)
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[arch] = path
        return made[arch]
    return make


def st_splade_folder(path, base, strategy='max', activation='relu'):
    modules = [STTransformer(str(base), transformer_task='fill-mask'), STSpladePooling(strategy, activation)]
    STSparseEncoder(modules=modules, device='cpu').save(str(path), create_model_card=False)
    return path


def st_inference_free_folder(path, base):
    document = STTransformer(str(base), transformer_task='fill-mask')
    weight = torch.rand(VOCAB, generator=torch.Generator().manual_seed(3)) * 3
    weight[torch.randperm(VOCAB, generator=torch.Generator().manual_seed(4))[:VOCAB // 2]] = 0
    query = STStatic(tokenizer=document.tokenizer, weight=weight, frozen=True)
    router = STRouter.for_query_document(query_modules=[query], document_modules=[document, STSpladePooling('max')])
    STSparseEncoder(modules=[router], similarity_fn_name='dot', device='cpu').save(str(path), create_model_card=False)
    return path


def assert_same(ours, theirs):
    "Same shape, the same active dimensions, the same weights to 1e-5."
    ours, theirs = ours.to_dense(), theirs.to_dense()
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.float32
    differ = (ours != 0) != (theirs != 0)
    flips = torch.maximum(ours, theirs)[differ]
    assert (flips < 1e-5).all(), f'active dimensions differ at weights {flips[flips >= 1e-5].tolist()}'
    assert len(flips) <= 1e-4 * int((theirs != 0).sum()) + 1, f'{len(flips)} active dimensions differ'
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_tiny_models_are_sparse_and_tell_texts_apart(tmp_path, mlm_folder):
    encoder = SparseEncoder(st_splade_folder(tmp_path, mlm_folder('bert')))
    vectors = encoder.encode(texts_for('apart'), **SMALL_BATCHES)
    stats = encoder.sparsity(vectors)
    assert 20 < stats['active_dims'] < 0.05 * VOCAB, stats
    dense = vectors.to_dense()
    cos = torch.nn.functional.normalize(dense, dim=1) @ torch.nn.functional.normalize(dense, dim=1).T
    assert cos[torch.triu_indices(len(cos), len(cos), 1).unbind()].median() < 0.9


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('strategy', ['max', 'sum'])
@pytest.mark.parametrize('activation', ['relu', 'log1p_relu'])
def test_splade_matches(tmp_path, mlm_folder, arch, strategy, activation):
    path = st_splade_folder(tmp_path, mlm_folder(arch), strategy, activation)
    ours, theirs = SparseEncoder(path), STSparseEncoder(str(path), device='cpu')
    texts = texts_for(arch, strategy, activation)
    assert ours.tokenize(texts).num_truncated > 0
    assert_same(ours.encode(texts, **SMALL_BATCHES), theirs.encode(texts, batch_size=16))


def test_chunk_size_does_not_change_the_vectors(tmp_path, mlm_folder):
    ours = SparseEncoder(st_splade_folder(tmp_path, mlm_folder('bert')))
    texts = texts_for('chunks')
    expected = ours.encode(texts, **SMALL_BATCHES)
    for chunk in (0, 1, 7):
        ours.splade_pooling.chunk_size = chunk
        assert_same(ours.encode(texts, **SMALL_BATCHES), expected)


def test_max_active_dims_matches(tmp_path, mlm_folder):
    path = st_splade_folder(tmp_path, mlm_folder('bert'))
    ours, theirs = SparseEncoder(path), STSparseEncoder(str(path), device='cpu')
    texts = texts_for('max_active_dims')
    a = ours.encode(texts, max_active_dims=16, **SMALL_BATCHES)
    assert ours.sparsity(a)['active_dims'] <= 16
    assert_same(a, theirs.encode(texts, max_active_dims=16))
    configured = SparseEncoder(path, max_active_dims=16)
    assert_same(configured.encode(texts), a)
    configured.save(tmp_path / 'saved')
    assert json.loads((tmp_path / 'saved' / 'config_sentence_transformers.json').read_text())['max_active_dims'] == 16
    assert_same(STSparseEncoder(str(tmp_path / 'saved'), device='cpu').encode(texts), a)


def test_inference_free_routes_match(tmp_path, mlm_folder):
    path = st_inference_free_folder(tmp_path, mlm_folder('bert'))
    ours, theirs = SparseEncoder(path), STSparseEncoder(str(path), device='cpu')
    queries, documents = texts_for('if-queries', n=20), texts_for('if-documents')
    q = ours.encode_query(queries, **SMALL_BATCHES)
    assert_same(q, theirs.encode_query(queries))
    assert ours.sparsity(q)['active_dims'] < 40
    assert_same(ours.encode_document(documents, **SMALL_BATCHES), theirs.encode_document(documents))
    assert_same(ours.encode(documents, **SMALL_BATCHES), theirs.encode(documents))
    torch.testing.assert_close(ours.similarity(q, ours.encode_document(documents)),
                               theirs.similarity(theirs.encode_query(queries), theirs.encode_document(documents)).to_dense(),
                               rtol=1e-5, atol=1e-5)


def test_folders_saved_by_infer_load_in_sentence_transformers(tmp_path, mlm_folder):
    for name, path in [('splade', st_splade_folder(tmp_path / 'a', mlm_folder('distilbert'), 'sum', 'log1p_relu')),
                       ('inference-free', st_inference_free_folder(tmp_path / 'b', mlm_folder('bert')))]:
        SparseEncoder(path).save(tmp_path / f'{name}-infer')
        ours, theirs = SparseEncoder(tmp_path / f'{name}-infer'), STSparseEncoder(str(tmp_path / f'{name}-infer'), device='cpu')
        texts = texts_for(name, 'saved')
        assert_same(ours.encode_document(texts, **SMALL_BATCHES), theirs.encode_document(texts))
        assert_same(ours.encode_query(texts, **SMALL_BATCHES), theirs.encode_query(texts))
        assert_same(ours.encode(texts), SparseEncoder(path).encode(texts))


def test_plain_mlm_folder_is_splade_max_in_both(mlm_folder):
    path = mlm_folder('distilbert')
    ours, theirs = SparseEncoder(path), STSparseEncoder(str(path), device='cpu')
    assert [type(m).__name__ for m in ours.layers] == ['MLMTransformer', 'SpladePooling']
    texts = texts_for('plain')
    assert_same(ours.encode(texts, **SMALL_BATCHES), theirs.encode(texts))


def test_outputs_come_in_every_shape(tmp_path, mlm_folder):
    ours = SparseEncoder(st_splade_folder(tmp_path, mlm_folder('bert')))
    texts = texts_for('shapes', n=5)
    full = ours.encode(texts)
    assert full.is_sparse and full.shape == (5, VOCAB)
    assert torch.equal(ours.encode(texts, convert_to_sparse_tensor=False), full.to_dense())
    rows = ours.encode(texts, convert_to_tensor=False)
    assert len(rows) == 5 and torch.equal(rows[3].to_dense(), full.to_dense()[3])
    one = ours.encode(texts[2])
    assert one.shape == (VOCAB,)
    assert_same(one.unsqueeze(0), full.to_dense()[2:3])
    words = ours.decode(one, top_k=4)
    assert len(words) == 4 and [w for _, w in words] == sorted([w for _, w in words], reverse=True)
    assert [w for w, _ in ours.decode(full)[2][:4]] == [w for w, _ in words]
    assert ours.encode([]).shape == (0, VOCAB)


def test_inverted_index_search_is_exact(tmp_path, mlm_folder):
    ours = SparseEncoder(st_splade_folder(tmp_path, mlm_folder('bert')))
    documents, queries = ours.encode(texts_for('corpus', n=200)), ours.encode(texts_for('queries', n=8))
    brute = queries.to_dense() @ documents.to_dense().T
    results = SparseIndex(documents).search(queries, top_k=10)
    for row, hits in zip(brute, results):
        top = row.topk(10)
        np.testing.assert_allclose([h['score'] for h in hits], top.values.numpy(), rtol=1e-5)
        assert {h['corpus_id'] for h in hits} == set(top.indices.tolist())


def test_keep_top_keeps_the_largest_magnitudes():
    x = torch.tensor([[0.0, -3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.5]])
    assert keep_top(x, 2).tolist() == [[0.0, -3.0, 0.0, 2.0], [5.0, 0.0, 0.0, 0.5]]
    assert keep_top(x, None) is x


def test_bad_input_is_refused_and_changes_nothing(tmp_path, mlm_folder):
    path = st_inference_free_folder(tmp_path, mlm_folder('bert'))
    ours = SparseEncoder(path)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    cases = [(dict(sentences=['a', 3]), TypeError, r'sentences\[1\] is a int'),
             (dict(sentences=['a'], max_active_dims=0), ValueError, 'max_active_dims must be a positive integer'),
             (dict(sentences=['a'], task='passage'), ValueError, "no route for task 'passage'"),
             (dict(sentences=['a'], batch_size=0), ValueError, 'batch_size must be positive'),
             (dict(sentences=['a'], max_batch_tokens=8), ValueError, 'smaller than max_seq_length')]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message): ours.encode(**kwargs)
    with pytest.raises(ValueError, match='top_k must be a positive integer'): ours.decode(ours.encode('a'), top_k=0)
    with pytest.raises(ValueError, match='encode them with the model that encoded the documents'):
        SparseIndex(ours.encode(['a b'])).search(torch.zeros(3, 100))
    with pytest.raises(ValueError, match='max_active_dims must be a positive integer'): SparseEncoder(path, max_active_dims=-1)
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
