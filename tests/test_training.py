"""infer.training end to end on tiny random models (2-layer BERT, hidden 32, dropout off so that runs are exact):
training parity with sentence-transformers' trainers (dense and cross-encoder: the same weights after the same AdamW
steps, to 1e-4 of the distance the weights moved), the losses' own parameters training, gradient checkpointing and
accumulation and GradCache giving the steps plain training gives, resuming from a checkpoint, evaluation loss,
SPLADE warm-up, prompts, and distributed data parallel on 2 CPU processes (slow)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from sentence_transformers import CrossEncoder as STCrossEncoder
from sentence_transformers import SentenceTransformer
from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss as STBinaryCrossEntropyLoss
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from infer.cross_encoder import CrossEncoder
from infer.cross_losses import BinaryCrossEntropyLoss
from infer.encoder import SentenceEncoder, batch_features, minilm_path, tiny_encoder_folder
from infer.losses import (CachedMultipleNegativesRankingLoss, CosineSimilarityLoss, MultipleNegativesRankingLoss,
                          SoftmaxLoss)
from infer.sparse import SparseEncoder, tiny_splade_folder
from infer.sparse_losses import SparseMultipleNegativesRankingLoss, SpladeLoss
from infer.texts import sample_texts
from infer.training import Trainer, TrainingArguments, TrainingInputError

pytestmark = [pytest.mark.filterwarnings('ignore::UserWarning'), pytest.mark.filterwarnings('ignore::FutureWarning'),
              pytest.mark.usefixtures('one_torch_thread')]

TEXTS = sample_texts(200, seed=3)
QUIET = dict(report_to='none', use_cpu=True, disable_tqdm=True, save_strategy='no', seed=0)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    "A sentence-transformers folder of a tiny random BERT without dropout."
    root = tmp_path_factory.mktemp('training')
    SentenceTransformer(str(tiny_encoder_folder(root / 'plain', dropout=0.0)), device='cpu').save(str(root / 'st'))
    return root / 'st'


def weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.transformer.auto_model.parameters()])


def assert_same_steps(trained, reference, start):
    "The two runs moved the weights alike: their difference is under 1e-4 of the distance either moved."
    moved = (trained - start).norm()
    assert moved > 1e-3 * start.norm()
    assert (trained - reference).norm() < 1e-4 * moved, ((trained - reference).norm() / moved).item()


def pairs(n=32, offset=0):
    return datasets.Dataset.from_dict({'anchor': TEXTS[offset:offset + n], 'positive': TEXTS[100 + offset:100 + offset + n]})


def train(model, loss, data, tmp_path, **args):
    run = Trainer(model, TrainingArguments(output_dir=str(tmp_path / 'run'), **{**QUIET, **args}), train_dataset=data, loss=loss)
    run.train()
    return run


def test_the_losses_own_parameters_train(folder, tmp_path):
    model = SentenceEncoder(folder)
    loss = SoftmaxLoss(model, model.embedding_dimension, num_labels=3)
    before = loss.classifier.weight.detach().clone()
    data = datasets.Dataset.from_dict({'premise': TEXTS[:16], 'hypothesis': TEXTS[16:32], 'label': [0, 1, 2, 1] * 4})
    train(model, loss, data, tmp_path, per_device_train_batch_size=8, num_train_epochs=1, learning_rate=1e-2)
    assert (loss.classifier.weight - before).norm() > 1e-3


@pytest.mark.parametrize('trick', ['gradient_checkpointing', 'cached'])
def test_memory_tricks_take_the_same_steps(folder, tmp_path, trick):
    "Gradient checkpointing and GradCache change what is kept for backward, not the step."
    args = dict(per_device_train_batch_size=32, num_train_epochs=2, learning_rate=1e-3, lr_scheduler_type='constant')
    plain, tricked = SentenceEncoder(folder), SentenceEncoder(folder)
    start = weights(plain)
    train(plain, MultipleNegativesRankingLoss(plain), pairs(), tmp_path / 'plain', **args)
    if trick == 'cached':
        train(tricked, CachedMultipleNegativesRankingLoss(tricked, mini_batch_size=8), pairs(), tmp_path / 'trick', **args)
    else:
        train(tricked, MultipleNegativesRankingLoss(tricked), pairs(), tmp_path / 'trick', gradient_checkpointing=True, **args)
    assert_same_steps(weights(tricked), weights(plain), start)


def test_gradient_accumulation_takes_the_step_of_the_whole_batch(folder, tmp_path):
    "A per-row loss: two accumulated batches of 16 are one batch of 32."
    data = datasets.Dataset.from_dict({'sentence1': TEXTS[:32], 'sentence2': TEXTS[32:64],
                                       'score': np.random.default_rng(0).random(32).tolist()})
    args = dict(num_train_epochs=2, learning_rate=1e-3, lr_scheduler_type='constant')
    whole, accumulated = SentenceEncoder(folder), SentenceEncoder(folder)
    start = weights(whole)
    train(whole, CosineSimilarityLoss(whole), data, tmp_path / 'whole', per_device_train_batch_size=32, **args)
    train(accumulated, CosineSimilarityLoss(accumulated), data, tmp_path / 'acc', per_device_train_batch_size=16,
          gradient_accumulation_steps=2, **args)
    assert_same_steps(weights(accumulated), weights(whole), start)


def test_cached_loss_replays_under_the_trainers_autocast(folder, tmp_path):
    """GradCache's second pass runs inside backward, outside the trainer's bf16 autocast: it must enter the same
    autocast again, or it would embed in float32 (twice the memory) what the first pass embedded in bf16."""
    model = SentenceEncoder(folder)
    under_autocast = []
    model.transformer.auto_model.register_forward_hook(lambda *_: under_autocast.append(torch.is_autocast_enabled('cpu')))
    train(model, CachedMultipleNegativesRankingLoss(model, mini_batch_size=8), pairs(), tmp_path,
          per_device_train_batch_size=32, num_train_epochs=1, bf16=True)
    assert under_autocast == [True] * 16  # 2 columns of 4 mini-batches, embedded without and then with gradients


def test_resuming_from_a_checkpoint_ends_where_an_unbroken_run_ends(folder, tmp_path):
    args = dict(per_device_train_batch_size=8, num_train_epochs=2, learning_rate=1e-3, save_strategy='steps', save_steps=3)
    whole = SentenceEncoder(folder)
    start = weights(whole)
    train(whole, MultipleNegativesRankingLoss(whole), pairs(), tmp_path / 'whole', **args)
    resumed = SentenceEncoder(folder)
    run = Trainer(resumed, TrainingArguments(output_dir=str(tmp_path / 'whole' / 'run'), **{**QUIET, **args}),
                  train_dataset=pairs(), loss=MultipleNegativesRankingLoss(resumed))
    run.train(resume_from_checkpoint=str(tmp_path / 'whole' / 'run' / 'checkpoint-3'))
    assert_same_steps(weights(resumed), weights(whole), start)
    checkpoint = SentenceTransformer(str(tmp_path / 'whole' / 'run' / 'checkpoint-6'), device='cpu')
    assert checkpoint.encode(TEXTS[:3]).shape == (3, 32)


def test_eval_loss_is_the_loss_of_the_evaluation_data(folder, tmp_path):
    model = SentenceEncoder(folder)
    loss = MultipleNegativesRankingLoss(model)
    held_out = pairs(16, offset=40)
    run = Trainer(model, TrainingArguments(output_dir=str(tmp_path / 'run'), per_device_eval_batch_size=16, **QUIET),
                  train_dataset=pairs(), eval_dataset=held_out, loss=loss)
    metrics = run.evaluate()
    model.eval()
    with torch.no_grad():
        want = loss([batch_features(model, held_out[c]) for c in ('anchor', 'positive')]).item()
    assert abs(metrics['eval_loss'] - want) < 1e-5


def test_named_evaluation_datasets_share_the_one_loss(folder, tmp_path):
    model = SentenceEncoder(folder)
    run = Trainer(model, TrainingArguments(output_dir=str(tmp_path / 'run'), per_device_eval_batch_size=16, **QUIET),
                  train_dataset=pairs(), eval_dataset={'x': pairs(16, offset=40), 'y': pairs(16, offset=60)},
                  loss=MultipleNegativesRankingLoss(model))
    metrics = run.evaluate()
    assert {'eval_x_loss', 'eval_y_loss'} <= set(metrics) and metrics['eval_x_loss'] != metrics['eval_y_loss']


def test_prompts_reach_the_model(folder, tmp_path):
    "A prompt before the anchors changes the step; the same prompt written into the data takes the same step."
    prompted, written = SentenceEncoder(folder), SentenceEncoder(folder)
    args = dict(per_device_train_batch_size=32, num_train_epochs=1, learning_rate=1e-3)
    start = weights(prompted)
    train(prompted, MultipleNegativesRankingLoss(prompted), pairs(), tmp_path / 'p', prompts={'anchor': 'query: '}, **args)
    data = datasets.Dataset.from_dict({'anchor': ['query: ' + t for t in TEXTS[:32]], 'positive': TEXTS[100:132]})
    train(written, MultipleNegativesRankingLoss(written), data, tmp_path / 'w', **args)
    assert_same_steps(weights(prompted), weights(written), start)


def test_splade_regularizers_warm_up_over_the_first_third(tmp_path):
    model = SparseEncoder(tiny_splade_folder(tmp_path / 'splade', max_len=32))
    loss = SpladeLoss(model, SparseMultipleNegativesRankingLoss(model), document_regularizer_weight=3e-3,
                      query_regularizer_weight=5e-3)
    seen = []
    original = loss.forward
    loss.forward = lambda *a, **k: (seen.append((loss.document_regularizer_weight, loss.query_regularizer_weight)), original(*a, **k))[1]
    run = train(model, loss, pairs(24), tmp_path, per_device_train_batch_size=4, num_train_epochs=1)
    assert len(seen) == 6 and seen[0] == (0.0, 0.0) and seen[-1] == (3e-3, 5e-3)
    assert seen[1][0] < 3e-3  # warm-up: 2 steps of 6
    run.save_model(str(tmp_path / 'saved'))
    from sentence_transformers import SparseEncoder as STSparseEncoder
    theirs = STSparseEncoder(str(tmp_path / 'saved'), device='cpu').encode(TEXTS[:4], convert_to_tensor=True).to_dense()
    assert torch.allclose(theirs, model.encode(TEXTS[:4], convert_to_tensor=True).to_dense(), atol=1e-4)


def test_cross_encoder_training_matches_sentence_transformers(tmp_path):
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                             vocab_size=30522, num_labels=1, hidden_dropout_prob=0.0,
                                             attention_probs_dropout_prob=0.0)).save_pretrained(tmp_path / 'ce')
    AutoTokenizer.from_pretrained(minilm_path(), model_max_length=64).save_pretrained(tmp_path / 'ce')
    data = datasets.Dataset.from_dict({'query': TEXTS[:24], 'document': TEXTS[24:48], 'label': [0.0, 1.0, 1.0] * 8})
    same = dict(per_device_train_batch_size=24, num_train_epochs=3, learning_rate=1e-3, lr_scheduler_type='constant',
                warmup_steps=0, **QUIET)
    theirs = STCrossEncoder(str(tmp_path / 'ce'), device='cpu')
    CrossEncoderTrainer(theirs, CrossEncoderTrainingArguments(output_dir=str(tmp_path / 'st'), **same), train_dataset=data,
                        loss=STBinaryCrossEntropyLoss(theirs)).train()
    ours = CrossEncoder(tmp_path / 'ce')
    start = weights(CrossEncoder(tmp_path / 'ce'))
    run = Trainer(ours, TrainingArguments(output_dir=str(tmp_path / 'ours'), **same), train_dataset=data,
                  loss=BinaryCrossEntropyLoss(ours))
    run.train()
    assert_same_steps(weights(ours), torch.cat([p.detach().flatten() for p in theirs.model.parameters()]), start)
    run.save_model(str(tmp_path / 'saved'))
    pairs_ = list(zip(TEXTS[50:54], TEXTS[60:64]))
    assert np.allclose(STCrossEncoder(str(tmp_path / 'saved'), device='cpu').predict(pairs_), ours.predict(pairs_), atol=1e-5)


def test_bad_input_is_refused_before_training(folder, tmp_path):
    model = SentenceEncoder(folder)
    with pytest.raises(TrainingInputError, match=r"no loss for the datasets \['b'\]"):
        Trainer(model, train_dataset={'a': pairs()}, eval_dataset={'b': pairs()}, loss={'a': MultipleNegativesRankingLoss(model)})
    with pytest.raises(TrainingInputError, match='takes no labels'):
        Trainer(model, train_dataset=pairs().add_column('label', [1] * 32), loss=MultipleNegativesRankingLoss(model))
    with pytest.raises(TrainingInputError, match='dots'):
        Trainer(model, train_dataset={'a.b': pairs()}, loss=MultipleNegativesRankingLoss(model))
    with pytest.raises(TrainingInputError, match='needs a label column'):
        train(model, MultipleNegativesRankingLoss(model), pairs(), tmp_path, batch_sampler='group_by_label')
    with pytest.raises(TrainingInputError, match='no rows'):
        Trainer(model, train_dataset=pairs().select([]), loss=MultipleNegativesRankingLoss(model))


DDP_WORKER = textwrap.dedent('''
    import json, os, sys
    import torch, datasets
    torch.set_num_threads(1)
    from infer.encoder import SentenceEncoder
    from infer.losses import MultipleNegativesRankingLoss
    from infer.texts import sample_texts
    from infer.training import Trainer, TrainingArguments, TextCollator
    folder, out = sys.argv[1], sys.argv[2]
    texts = sample_texts(200, seed=3)
    data = datasets.Dataset.from_dict({'anchor': texts[:32], 'positive': texts[100:132]})
    model = SentenceEncoder(folder)
    seen = []
    class Recording(TextCollator):
        def __call__(self, rows):
            seen.append([r['anchor'] for r in rows])
            return super().__call__(rows)
    run = Trainer(model, TrainingArguments(output_dir=out, per_device_train_batch_size=8, num_train_epochs=1,
                                           learning_rate=0.1, lr_scheduler_type='constant', optim='sgd', ddp_backend='gloo',
                                           report_to='none', use_cpu=True, disable_tqdm=True, save_strategy='no', seed=0),
                  train_dataset=data, loss=MultipleNegativesRankingLoss(model))
    run.data_collator = Recording(model)
    run.train()
    rank = int(os.environ['RANK'])
    torch.save({'weights': [p.detach() for p in model.transformer.auto_model.parameters()], 'batches': seen},
               f'{out}/rank{rank}.pt')
''')


@pytest.mark.slow
def test_distributed_data_parallel_on_two_processes(folder, tmp_path):
    """Two gloo processes, each with its share of the batches: both end with the same weights, and those are SGD steps
    (gradients clipped to norm 1, as the Trainer does) on the mean of the two processes' losses, computed here in one
    process."""
    script = tmp_path / 'worker.py'
    script.write_text(DDP_WORKER)
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false', 'OMP_NUM_THREADS': '1'}
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29533',
                    str(script), str(folder), str(tmp_path)], check=True, env=env, capture_output=True, timeout=600)
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in (0, 1)]
    for a, b in zip(ranks[0]['weights'], ranks[1]['weights']): assert torch.equal(a, b)
    model = SentenceEncoder(folder)
    model.train()
    loss = MultipleNegativesRankingLoss(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    positive_of = dict(zip(TEXTS[:32], TEXTS[100:132]))
    steps = list(zip(ranks[0]['batches'], ranks[1]['batches']))
    assert len(steps) == 2 and sorted(t for s in steps for b in s for t in b) == sorted(TEXTS[:32])
    for shares in steps:
        optimizer.zero_grad()
        sum(loss([batch_features(model, anchors), batch_features(model, [positive_of[a] for a in anchors])])
            for anchors in shares).div(2).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the Trainer's max_grad_norm
        optimizer.step()
    want = torch.cat([p.detach().flatten() for p in model.transformer.auto_model.parameters()])
    got = torch.cat([w.flatten() for w in ranks[0]['weights']])
    start = weights(SentenceEncoder(folder))
    assert_same_steps(got, want, start)
