import os

# Nothing is downloaded at run time: models load from local folders.
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

# Triton kernels run in Triton's interpreter where there is no GPU; it must be chosen before triton is imported.
import torch  # noqa: E402

if not torch.cuda.is_available(): os.environ.setdefault('TRITON_INTERPRET', '1')


import pytest  # noqa: E402


@pytest.fixture(scope='module')
def one_torch_thread():
    """Models this small gain nothing from a second thread, and where the cores are shared (pytest-xdist workers,
    other jobs) every operator would wait for the second thread's turn on a core: one thread for a module that asks
    (`pytestmark = pytest.mark.usefixtures('one_torch_thread')`), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: takes minutes; runs when NB_FLAGS names it (NB_FLAGS="slow gpu" pytest), '
                                       'as the slow notebook cells do')


def pytest_collection_modifyitems(config, items):
    flags = os.environ.get('NB_FLAGS', '').split()
    for item in items:
        if 'slow' in item.keywords and 'slow' not in flags:
            item.add_marker(pytest.mark.skip(reason='flagged slow; NB_FLAGS=slow runs it'))
