import os

# Nothing is downloaded at run time: models load from local folders.
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

# Triton kernels run in Triton's interpreter where there is no GPU; it must be chosen before triton is imported.
import torch  # noqa: E402

if not torch.cuda.is_available(): os.environ.setdefault('TRITON_INTERPRET', '1')
