"""What the vLLM-anchored benchmarks share: where vLLM is loaded from, and how a run records what it measured."""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sig(xs: list[float]) -> list[float]:
    "Raw timings rounded to 4 significant digits, for the JSON."
    return [float(f'{x:.4g}') for x in xs]


def infer_version() -> dict:
    "The commit infer was measured at, and whether its sources had uncommitted changes."
    def git(*a):
        try: return subprocess.run(['git', *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception: return ''
    return dict(commit=git('rev-parse', '--short', 'HEAD'), dirty=bool(git('status', '--porcelain', 'infer', 'nbs')))


def put_vllm_on_path(path: str) -> str | None:
    """Make the vLLM installed under `path` (pip --target) importable, on the CPU platform, quietly.
    Returns why it cannot be, or None."""
    if not path: return 'no --anchor-path given'
    if not (Path(path) / 'vllm').is_dir():
        return f'no vllm package under {path} (see the install commands in benchmarks/kv_cache.py)'
    sys.path.insert(0, path)
    # vLLM inspects model classes in a subprocess, which must find the same vllm.
    os.environ['PYTHONPATH'] = os.pathsep.join([path] + ([os.environ['PYTHONPATH']] if os.environ.get('PYTHONPATH') else []))
    os.environ.setdefault('VLLM_LOGGING_LEVEL', 'ERROR')
    os.environ.setdefault('VLLM_TARGET_DEVICE', 'cpu')
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    return None


def load_vllm(path: str):
    "vLLM's KV cache manager and scheduler pieces, imported from `path`: (namespace, version, None), or (None, None, why not)."
    if (why := put_vllm_on_path(path)) is not None: return None, None, why
    import torch
    torch_version = torch.__version__
    try:
        import vllm
        from vllm.config import CacheConfig, ModelConfig, SchedulerConfig as VSchedulerConfig, VllmConfig
        from vllm.sampling_params import SamplingParams as VSamplingParams
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_manager import KVCacheManager as VKVCacheManager
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler as VScheduler
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.outputs import ModelRunnerOutput
        from vllm.v1.request import Request as VRequest, RequestStatus as VRequestStatus
        from vllm.v1.structured_output import StructuredOutputManager
    except Exception as e:  # an anchor that does not import is reported, not fatal
        return None, None, f'importing vLLM from {path} failed: {type(e).__name__}: {e}'
    assert torch.__version__ == torch_version, 'the anchor folder must not bring its own torch'
    return argparse.Namespace(**{k: v for k, v in locals().items() if k[0].isupper() or k.startswith(('get_', 'init_'))}), vllm.__version__, None


def load_anchor_and_report(path: str, vllm_hash: str):
    "Load vLLM from `path` if it is there and print what this run compares: (vLLM namespace or None, its version, why not, infer's version)."
    t0 = time.perf_counter()
    v, vllm_version, why = load_vllm(path)
    if v is None: print(f'anchor unavailable, infer alone: {why}', flush=True)
    else:
        import torch
        print(f'anchor: vLLM {vllm_version} from {path} (import {time.perf_counter() - t0:.1f} s), '
              f'hash {vllm_hash}; torch {torch.__version__}', flush=True)
    iv = infer_version()
    print(f"infer {iv['commit']}{' (uncommitted changes)' if iv['dirty'] else ''}; load average {os.getloadavg()[0]:.1f} "
          f'on {os.cpu_count()} CPUs', flush=True)
    return v, vllm_version, why, iv
