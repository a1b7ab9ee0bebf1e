"""`infer.model_card` writes a README.md that the Hub, sentence-transformers and a person can all read.

Tiny random models (BERT, 2 layers, 32 wide, all-MiniLM-L6-v2's tokenizer) stand for trained ones: a dense
encoder saved by sentence-transformers, a SPLADE encoder and a one-label and a three-label cross-encoder saved
by infer. A dense card with two datasets, two real evaluators and a long training log in the Trainer's
`log_history` format is parsed back: its front matter as YAML and by `huggingface_hub` (metadata errors not
ignored), its tables by a CommonMark parser with GFM tables. The usage snippets are executed against the saved
folders, in both libraries, and must print what their comments say; sentence-transformers loads each folder
with its card and gives infer's vectors and scores.
"""
import contextlib
import dataclasses
import io
import json
import re
import warnings

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load
from markdown_it import MarkdownIt
from sentence_transformers import CrossEncoder as STCrossEncoder
from sentence_transformers import SentenceTransformer
from sentence_transformers import SparseEncoder as STSparseEncoder
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

from infer.cross_encoder import CrossEncoder
from infer.encoder import SentenceEncoder, minilm_path
from infer.evaluation import EmbeddingSimilarityEvaluator, TripletEvaluator
from infer.losses import CoSENTLoss, MultipleNegativesRankingLoss
from infer.model_card import (PLACEHOLDER_MODEL, DatasetInfo, EvaluationInfo, ModelCardData, ModelCardError, describe_model,
                              format_value, model_card, shorten, write_model_card)
from infer.sparse import MLMTransformer, Router, SparseEncoder, SparseStaticEmbedding, SpladePooling, tiny_splade_folder
from infer.texts import sample_texts

pytestmark = [pytest.mark.usefixtures('one_torch_thread'), pytest.mark.filterwarnings('ignore:.*were truncated:UserWarning')]

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=30522,
            max_position_embeddings=512)
STEPS, EVAL_EVERY = 60, 10


def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path(), model_max_length=128)


@pytest.fixture(scope='module')
def dense_folder(tmp_path_factory):
    "A tiny dense model saved by sentence-transformers (Transformer + mean Pooling)."
    hf, st = tmp_path_factory.mktemp('dense-hf'), tmp_path_factory.mktemp('dense-st')
    torch.manual_seed(0)
    BertModel(BertConfig(**TINY)).save_pretrained(hf)
    tokenizer().save_pretrained(hf)
    SentenceTransformer(str(hf), device='cpu').save(str(st), create_model_card=False)
    return st


@pytest.fixture(scope='module')
def sparse_folder(tmp_path_factory):
    "A tiny SPLADE model saved by infer."
    folder = tmp_path_factory.mktemp('sparse')
    SparseEncoder(tiny_splade_folder(tmp_path_factory.mktemp('sparse-hf'))).save(folder)
    return folder


@pytest.fixture(scope='module')
def cross_folder(tmp_path_factory):
    "Tiny cross-encoders (one label and three) saved by infer, by number of labels."
    folders = {}
    for num_labels in (1, 3):
        hf, folder = tmp_path_factory.mktemp(f'cross{num_labels}-hf'), tmp_path_factory.mktemp(f'cross{num_labels}')
        torch.manual_seed(num_labels)
        BertForSequenceClassification(BertConfig(**TINY, num_labels=num_labels)).save_pretrained(hf)
        tokenizer().save_pretrained(hf)
        CrossEncoder(hf).save(folder)
        folders[num_labels] = folder
    return folders


def trainer_log(evaluators, seed=0):
    "A `state.log_history` as the Trainer writes it: a loss per step, an evaluation every EVAL_EVERY steps, a summary."
    rng = np.random.default_rng(seed)
    log = []
    for step in range(1, STEPS + 1):
        epoch = step / STEPS * 2
        log.append({'loss': float(rng.uniform(0.5, 3)), 'grad_norm': float(rng.uniform(1, 9)), 'learning_rate': 2e-5, 'epoch': epoch, 'step': step})
        if step % EVAL_EVERY == 0:
            metrics = {f'eval_{k}': float(rng.uniform()) for e in evaluators for k in e.metrics}
            log.append({'eval_pairs_loss': float(rng.uniform(1, 2)), **metrics, 'eval_pairs_runtime': 0.1, 'epoch': epoch, 'step': step})
            log.append({'eval_scored_loss': float(rng.uniform(0, 1)), 'eval_scored_runtime': 0.1, 'epoch': epoch, 'step': step})
    log.append({'train_runtime': 754.2, 'train_samples_per_second': 9.0, 'train_loss': 1.7, 'epoch': 2.0, 'step': STEPS})
    return log


@pytest.fixture(scope='module')
def dense_card(dense_folder):
    "The model, the data of a training on two datasets with two evaluators, and the card written into its folder."
    model = SentenceEncoder(dense_folder)
    texts = sample_texts(60, seed=11)
    pairs = [{'anchor': a, 'positive': p} for a, p in zip(texts[:20], texts[20:40])]
    scored = [{'sentence1': a, 'sentence2': b, 'score': i / 20} for i, (a, b) in enumerate(zip(texts[40:50], texts[50:60]))]
    sts = EmbeddingSimilarityEvaluator(texts[:10], texts[10:20], [i / 10 for i in range(10)], name='sts-dev')
    triplets = TripletEvaluator(texts[:10], texts[10:20], texts[20:30], name='triplet-dev')
    evaluations = [EvaluationInfo(e.name, type(e).__name__, e(model), e.primary_metric) for e in (sts, triplets)]
    data = ModelCardData(
        base_model='sentence-transformers/all-MiniLM-L6-v2', language=['en', 'de'], license='apache-2.0', tags=['custom'],
        datasets=[DatasetInfo('pairs', 12_345, ['anchor', 'positive'], pairs[:3], 'MultipleNegativesRankingLoss',
                              MultipleNegativesRankingLoss(model).config, hub_id='owner/pairs-data'),
                  DatasetInfo('scored', 678, ['sentence1', 'sentence2', 'score'], scored[:3], 'CoSENTLoss', CoSENTLoss(model).config)],
        evaluations=evaluations, hyperparameters={'learning_rate': 2e-5, 'num_train_epochs': 2, 'fp16': True, 'lr_scheduler_kwargs': {'power': 2}},
        training_log=trainer_log(evaluations), training_time_s=None)
    return model, data, write_model_card(model, dense_folder, data).read_text(encoding='utf-8')


def front(text):
    head, sep, _ = text.removeprefix('---\n').partition('\n---\n')
    assert text.startswith('---\n') and sep, 'a card starts with front matter between --- lines'
    return yaml.safe_load(head)


def section(text, heading):
    "The text under `heading` up to the next heading of its level or above."
    level = len(heading.split(' ')[0])
    rest = text.split(f'\n{heading}\n', 1)[1]
    end = re.search(rf'^#{{1,{level}}} ', rest, re.M)
    return rest[:end.start()] if end else rest


def tables(markdown):
    "Every table of `markdown` as CommonMark + GFM tables parse it: rows of cell texts, the header first."
    tokens = MarkdownIt('commonmark').enable('table').parse(markdown)
    found, row = [], None
    for i, tok in enumerate(tokens):
        if tok.type == 'table_open': found.append([])
        elif tok.type == 'tr_open': row = []; found[-1].append(row)
        elif tok.type == 'inline' and tokens[i - 1].type in ('th_open', 'td_open'):
            kinds = {c.type for c in tok.children}
            assert kinds <= {'text', 'strong_open', 'strong_close', 'code_inline', 'link_open', 'link_close'}, kinds
            row.append(''.join(c.content for c in tok.children))
    return found


def headings(text):
    "The Markdown headings of a card, code blocks skipped."
    found, fenced = [], False
    for line in text.splitlines():
        if line.startswith('```'): fenced = not fenced
        elif not fenced and re.match(r'#{1,6} ', line): found.append(line)
    return found


def empty_sections(text):
    "Headings with no text under them before the next heading of their level or above."
    items, fenced = [], False
    for line in text.split('\n---\n', 1)[1].splitlines():
        heading = not fenced and re.match(r'(#{1,6}) ', line)
        if line.startswith('```'): fenced = not fenced
        if heading: items.append((len(heading.group(1)), line))
        elif line.strip(): items.append((0, line))
    empty = []
    for i, (level, line) in enumerate(items):
        rest = items[i + 1:]
        end = next((j for j, (lv, _) in enumerate(rest) if 0 < lv <= level), len(rest))
        if level and not any(lv == 0 for lv, _ in rest[:end]): empty.append(line)
    return empty


def unprefixed(e):
    return {k.removeprefix(f'{e.name}_'): v for k, v in e.metrics.items()}


def test_front_matter(dense_card):
    model, data, card = dense_card
    meta = front(card)
    assert list(meta) == ['language', 'license', 'library_name', 'pipeline_tag', 'base_model', 'datasets', 'tags', 'model-index']
    assert (meta['library_name'], meta['pipeline_tag']) == ('sentence-transformers', 'sentence-similarity')
    assert (meta['language'], meta['license'], meta['base_model']) == (['en', 'de'], 'apache-2.0', 'sentence-transformers/all-MiniLM-L6-v2')
    assert meta['datasets'] == ['owner/pairs-data']
    assert meta['tags'] == ['sentence-transformers', 'sentence-similarity', 'feature-extraction', 'dense', 'infer', 'generated_from_trainer',
                            f'dataset_size:{12_345 + 678}', 'loss:MultipleNegativesRankingLoss', 'loss:CoSENTLoss', 'custom']
    [index] = meta['model-index']
    assert index['name'] == 'Sentence embedding model based on sentence-transformers/all-MiniLM-L6-v2'
    assert [(r['task']['type'], r['dataset']['type']) for r in index['results']] == [('semantic-similarity', 'sts-dev'), ('triplet', 'triplet-dev')]
    for result, e in zip(index['results'], data.evaluations):
        assert {m['type']: m['value'] for m in result['metrics']} == unprefixed(e)


def test_huggingface_hub_reads_it(dense_card, dense_folder):
    _, data, card = dense_card
    hub = ModelCard(card, ignore_metadata_errors=False)
    assert hub.data.library_name == 'sentence-transformers' and hub.data.base_model == 'sentence-transformers/all-MiniLM-L6-v2'
    got = {(r.dataset_type, r.metric_type): r.metric_value for r in hub.data.eval_results}
    assert got == {(e.name, k): v for e in data.evaluations for k, v in unprefixed(e).items()}
    assert metadata_load(dense_folder / 'README.md') == front(card)


def test_sections(dense_card):
    model, data, card = dense_card
    assert empty_sections(card) == []
    assert [h for h in headings(card) if h.startswith(('## ', '### '))] == [
        '## Model', '### Architecture', '## Usage', '### With infer', '### With sentence-transformers', '## Evaluation',
        '### sts-dev (Semantic Similarity)', '### triplet-dev (Triplet)', '## Training', '### Training data', '### Hyperparameters',
        '### Training log', '### Training time', '## Framework versions']
    summary = dict(tables(section(card, '## Model'))[0][1:])
    assert summary['Base model'] == 'sentence-transformers/all-MiniLM-L6-v2' and summary['Output dimension'] == '32'
    assert summary['Maximum sequence length'] == f'{model.max_seq_length} tokens' and summary['Similarity'] == 'cosine similarity'
    assert summary['Training data'] == 'pairs (12,345 rows), scored (678 rows)'
    assert '(0) Transformer: BertModel, 2 layers, hidden size 32' in card and '(1) Pooling: mean of the token embeddings, 32 → 32' in card

    for e in data.evaluations:
        table = tables(section(card, f'### {e.name} (Semantic Similarity)' if e.name == 'sts-dev' else f'### {e.name} (Triplet)'))[0]
        primary = e.primary_metric.removeprefix(f'{e.name}_')
        assert table[1:] == [[k, format_value(v)] for k, v in unprefixed(e).items()]
        assert f'| **{primary.replace("_", chr(92) + "_")}** |' in card

    training = section(card, '### Training data')
    for d in data.datasets:
        part = section(training, f'#### {d.name}')
        assert f'- Rows: {d.size:,}\n' in part and f'- Loss: `{d.loss}`' in part
        assert f'```json\n{json.dumps(d.loss_config, indent=2)}\n```' in part
        assert tables(part)[0][0] == d.columns and len(tables(part)[0]) == 1 + len(d.samples)
    assert section(card, '### Hyperparameters').strip().splitlines()[-4:] == [
        '- `learning_rate`: 2e-05', '- `num_train_epochs`: 2', '- `fp16`: True', '- `lr_scheduler_kwargs`: {"power": 2}']
    assert '754.2 seconds' not in card and '12.6 minutes.' in section(card, '### Training time')  # the log's train_runtime


def test_training_log_table(dense_card):
    _, data, card = dense_card
    header, *rows = tables(section(card, '### Training log'))[0]
    primaries = [e.primary_metric for e in data.evaluations]
    assert header == ['Epoch', 'Step', 'Training Loss', 'pairs loss', 'scored loss', *primaries]
    assert len(rows) == 20 and f'20 of the {STEPS} logged steps' in card
    steps = [int(r[1]) for r in rows]
    assert steps[0] == 1 and steps[-1] == STEPS and steps == sorted(set(steps))
    merged = {}
    for entry in data.training_log:
        if 'train_runtime' not in entry: merged.setdefault(entry['step'], {}).update(entry)
    for row in rows:
        logged = merged[int(row[1])]
        keys = ['epoch', 'step', 'loss', 'eval_pairs_loss', 'eval_scored_loss', *(f'eval_{p}' for p in primaries)]
        assert row == [format_value(logged[k]) if k in logged else '-' for k in keys]


def test_sentence_transformers_loads_the_folder_with_its_card(dense_card, dense_folder):
    model, _, _ = dense_card
    assert (dense_folder / 'README.md').exists()
    st = SentenceTransformer(str(dense_folder), device='cpu')
    for seed in (1, 2):
        texts = sample_texts(40, seed=seed)
        np.testing.assert_allclose(model.encode(texts), st.encode(texts, batch_size=16), atol=1e-5)


def printed_comments(code):
    "The comment lines right under a `print(...)`: the output the snippet says it prints."
    shown, under_print = [], False
    for line in code.splitlines():
        if line.startswith('#') and under_print: shown.append(line[2:])
        else: under_print = line.strip().startswith('print(')
    return '\n'.join(shown)


def numbers(text): return [float(x) for x in re.findall(r'-?\d+\.?\d*(?:e-?\d+)?', text)]


def run_snippet(card, library, folder):
    "Execute the card's python block for `library` against `folder`: what it prints, and what its comments show."
    code = card.split(f'### With {library}\n', 1)[1].split('```python\n', 1)[1].split('\n```', 1)[0]
    assert repr(PLACEHOLDER_MODEL) in code
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        exec(code.replace(repr(PLACEHOLDER_MODEL), repr(str(folder))), {})
    return out.getvalue(), printed_comments(code)


def check_snippets(card, folder):
    for library in ('infer', 'sentence-transformers'):
        printed, shown = run_snippet(card, library, folder)
        assert shown and len(numbers(printed)) == len(numbers(shown)), (library, printed, shown)
        # both print 4 decimals of the same values (infer's: the very values; sentence-transformers': within 1e-5)
        np.testing.assert_allclose(numbers(printed), numbers(shown), atol=1.5e-4, err_msg=library)
        printed_words, shown_words = (re.sub(r'-?\d+\.?\d*', '#', t).split() for t in (printed, shown))
        if library == 'infer': assert printed_words == shown_words


def test_dense_usage_snippets_run(dense_card, dense_folder):
    _, data, card = dense_card
    check_snippets(card, dense_folder)
    assert "'" + shorten(data.datasets[0].samples[0]['anchor'], 200)[:40] in section(card, '### With infer')


def test_sparse_card(sparse_folder):
    model = SparseEncoder(sparse_folder)
    card = write_model_card(model, sparse_folder, ModelCardData()).read_text(encoding='utf-8')
    meta = front(card)
    assert meta['pipeline_tag'] == 'feature-extraction'
    assert meta['tags'] == ['sentence-transformers', 'sparse-encoder', 'sparse', 'splade', 'infer']
    assert 'model.decode(embeddings[0], top_k=5)' in card and 'from infer.sparse import SparseEncoder' in card
    assert '| Output dimension | 30,522 (the vocabulary) |' in card and '| Similarity | dot product |' in card
    assert empty_sections(card) == []
    check_snippets(card, sparse_folder)
    texts = sample_texts(20, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        np.testing.assert_allclose(model.encode(texts).to_dense(), STSparseEncoder(str(sparse_folder), device='cpu').encode(texts).to_dense(),
                                   atol=1e-5)


def test_inference_free_sparse_description(sparse_folder):
    document = SparseEncoder(sparse_folder)
    router = Router({'query': [SparseStaticEmbedding(document.tokenizer)], 'document': list(document.layers)}, default_route='document')
    model = SparseEncoder(modules=[router])
    info = describe_model(model)
    assert info['modules'][0].splitlines() == [
        "Router, default route 'document'",
        '    query: SparseStaticEmbedding: a learned weight per vocabulary word (30,522), no network',
        '    document: MLMTransformer: BertForMaskedLM, 2 layers, hidden size 32, max_seq_length 128, vocabulary 30,522 → '
        'SpladePooling: max over the tokens of log(1 + relu(logits))']
    assert isinstance(model.transformer, MLMTransformer) and isinstance(model.layers[0].routes['document'][1], SpladePooling)
    assert front(model_card(model))['tags'] == ['sentence-transformers', 'sparse-encoder', 'sparse', 'asymmetric', 'inference-free',
                                                'splade', 'infer']


@pytest.mark.parametrize('num_labels', [1, 3])
def test_cross_encoder_card(cross_folder, num_labels):
    folder = cross_folder[num_labels]
    model = CrossEncoder(folder)
    rows = [{'query': 'how do I compress a file?', 'answer': t, 'label': i % 2} for i, t in enumerate(sample_texts(4, seed=3))]
    data = ModelCardData(datasets=[DatasetInfo('qa', 4, ['query', 'answer', 'label'], rows[:3], 'BinaryCrossEntropyLoss', {})])
    card = write_model_card(model, folder, data).read_text(encoding='utf-8')
    meta = front(card)
    assert meta['pipeline_tag'] == ('text-ranking' if num_labels == 1 else 'text-classification')
    assert meta['tags'][:4] == ['sentence-transformers', 'cross-encoder', 'reranker', 'infer']
    assert 'model.predict([(query, document) for document in documents])' in card
    assert ('model.rank(query, documents)' in card) == (num_labels == 1)
    assert "query = 'how do I compress a file?'" in card  # the query column of the samples, the answers as documents
    activation = 'Sigmoid' if num_labels == 1 else 'Identity'
    assert f'| Output | {num_labels} score{"s" if num_labels > 1 else ""} per pair, after {activation} |' in card
    assert empty_sections(card) == []
    check_snippets(card, folder)
    pairs = list(zip(sample_texts(10, seed=4), sample_texts(10, seed=5)))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        np.testing.assert_allclose(model.predict(pairs), STCrossEncoder(str(folder), device='cpu').predict(pairs), atol=1e-5)


def test_empty_data_gives_a_short_valid_card(dense_folder):
    card = model_card(SentenceEncoder(dense_folder), ModelCardData())
    assert front(card) == {'library_name': 'sentence-transformers', 'pipeline_tag': 'sentence-similarity',
                           'tags': ['sentence-transformers', 'sentence-similarity', 'feature-extraction', 'dense', 'infer']}
    assert ModelCard(card, ignore_metadata_errors=False).data.eval_results is None
    assert headings(card) == ['# Sentence embedding model', '## Model', '### Architecture', '## Usage',
                                               '### With infer', '### With sentence-transformers', '## Framework versions']
    assert empty_sections(card) == [] and 'None' not in card and 'Unknown' not in card
    assert model_card(SentenceEncoder(dense_folder)) == card


def test_odd_samples_do_not_break_tables(dense_folder):
    odd = ['a | b || c', 'two\nlines\r\nand\ttabs', r'already \| escaped \\ and `code` *stars* _under_ <b>html</b> &amp; [x](y) ~~s~~',
           ' '.join(sample_texts(30, seed=9)), '', '|', 'ü 日本語 🙂']
    samples = [{'text': t, 'other': o, 'score': s} for t, o, s in zip(odd, odd[::-1], [0.123456, None, [1, 'a|b'], 7, True, -1e-9, 'x'])]
    data = ModelCardData(model_name='odd | title *', datasets=[DatasetInfo('odd|name', 7, ['text', 'other', 'score'], samples, 'CoSENTLoss', {})])
    card = model_card(SentenceEncoder(dense_folder), data)
    [table] = tables(section(card, '#### odd|name'.replace('|', r'\|')))
    assert table[0] == ['text', 'other', 'score']
    expected = [[shorten(r['text']), shorten(r['other']), shorten(format_value(r['score']))] for r in samples]
    assert table[1:] == expected
    assert all(len(cell) <= 120 for row in table for cell in row) and shorten(odd[3]).endswith('…')
    title = MarkdownIt('commonmark').parse(card.split('\n---\n', 1)[1])[1]
    assert ''.join(c.content for c in title.children) == 'odd | title *'  # the title renders as given
    assert 'model-index' not in front(card) and ModelCard(card, ignore_metadata_errors=False).data.model_name is None


def test_non_finite_metrics_stay_out_of_the_model_index(dense_folder):
    e = EvaluationInfo('dev', 'InformationRetrievalEvaluator', {'dev_ndcg@10': 0.5, 'dev_map@100': float('nan')}, 'dev_ndcg@10')
    card = model_card(SentenceEncoder(dense_folder), ModelCardData(evaluations=[e]))
    [result] = front(card)['model-index'][0]['results']
    assert result['task'] == {'type': 'information-retrieval', 'name': 'Information Retrieval'}
    assert result['metrics'] == [{'type': 'ndcg@10', 'value': 0.5, 'name': 'Ndcg@10'}]
    assert tables(section(card, '### dev (Information Retrieval)'))[0][1:] == [['ndcg@10', '0.5000'], ['map@100', 'nan']]
    ModelCard(card, ignore_metadata_errors=False)


def test_local_base_model_is_named_not_linked(dense_folder, tmp_path):
    card = model_card(SentenceEncoder(dense_folder), ModelCardData(base_model=str(tmp_path / 'my-base')))
    assert 'base_model' not in front(card) and str(tmp_path) not in card
    assert card.count('`my-base`') == 2 and '# Sentence embedding model based on my-base' in card


def test_writing_a_card_keeps_the_training_mode(dense_card):
    model, data, _ = dense_card
    model.train()
    model_card(model, data)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    model_card(model, data)
    assert not model.training


def test_training_time_given(dense_card):
    model, data, _ = dense_card
    card = model_card(model, dataclasses.replace(data, training_time_s=7300.0))
    assert section(card, '### Training time').strip() == '2.0 hours.'


BAD = [
    (lambda d: dict(datasets=[dataclasses.replace(d, samples=[{'anchor': 'a'}])]), "datasets[0].samples[0] has no value for the column(s) ['positive']"),
    (lambda d: dict(datasets=[dataclasses.replace(d, size=2.5)]), 'datasets[0].size must be the number of rows'),
    (lambda d: dict(datasets=[dataclasses.replace(d, columns=[])]), 'datasets[0].columns is empty'),
    (lambda d: dict(datasets=[dataclasses.replace(d, loss=None)]), 'datasets[0].loss must be the loss class name'),
    (lambda d: dict(datasets=[dataclasses.replace(d, hub_id='not a hub id')]), "is not a Hub dataset id"),
    (lambda d: dict(datasets=[{'name': 'x'}]), 'datasets[0] must be a DatasetInfo, not dict'),
    (lambda d: dict(evaluations=[EvaluationInfo('dev', 'TripletEvaluator', {'dev_accuracy': 'high'})]), "metrics['dev_accuracy'] is 'high'"),
    (lambda d: dict(evaluations=[EvaluationInfo('dev', 'TripletEvaluator', {'dev_accuracy': 1.0}, 'accuracy')]),
     "primary_metric 'accuracy' is not one of its metrics ['dev_accuracy']"),
    (lambda d: dict(evaluations=[EvaluationInfo('dev', '', {})]), 'evaluations[0].kind must be the evaluator class name'),
    (lambda d: dict(language=['en', 3]), 'language must be a list of strings'),
    (lambda d: dict(tags='a,b'), 'tags must be a list of strings'),
    (lambda d: dict(license=2), 'license must be a string or None'),
    (lambda d: dict(hyperparameters=[('lr', 1)]), 'hyperparameters must be a dict'),
    (lambda d: dict(training_log=[{'loss': 1}, 'step 2']), 'training_log must be a list of dicts'),
    (lambda d: dict(training_time_s=-1), 'training_time_s must be a number of seconds >= 0'),
]


@pytest.mark.parametrize('make, message', BAD, ids=[m for _, m in BAD])
def test_bad_input_is_refused(dense_card, tmp_path, make, message):
    model, data, _ = dense_card
    with pytest.raises(ModelCardError, match=re.escape(message)):
        write_model_card(model, tmp_path / 'card', ModelCardData(**make(data.datasets[0])))
    assert not (tmp_path / 'card').exists()
    assert issubclass(ModelCardError, ValueError)


def test_bad_model_or_folder_is_refused(dense_card, tmp_path):
    model, data, _ = dense_card
    with pytest.raises(ModelCardError, match='not a Linear'): model_card(torch.nn.Linear(2, 2), data)
    with pytest.raises(ModelCardError, match='data must be a ModelCardData, not dict'): model_card(model, {'license': 'mit'})
    (tmp_path / 'file').write_text('x')
    with pytest.raises(ModelCardError, match='is a file'): write_model_card(model, tmp_path / 'file', data)
    assert front(model_card(model, ModelCardData(language='de')))['language'] == ['de']
