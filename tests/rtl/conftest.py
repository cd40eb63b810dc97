"""Fixtures shared by the rtl tests: one intra-op thread, and tiny CIFAR files in torchvision's on-disk format."""

import pickle
import struct

import numpy as np
import pytest
import torch

from rtl.data import CIFAR10_CLASSES, CIFAR100_CLASSES


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The method layer's tests run tiny models: intra-op threads buy nothing there, and on a loaded 2-core
    # machine OpenMP barriers made small steps 10-60x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_budget():
    """The smallest budget that runs every stage of `rtl run`: the arguments the run tests add to each command."""
    settings = ["single_epochs=1", "ticket_steps=2", "retrain_epochs=1", "prune_fraction=0.5"]
    return [arg for setting in settings + ["batch_size=32"] for arg in ("--set", setting)] + ["--no-progress"]


@pytest.fixture
def gloo_workers(tmp_path):
    """``gloo_workers(worker_path) -> the worker module``: runs ``python WORKER RANK 2 INIT_FILE OUT_DIR`` for ranks 0
    and 1 (a gloo group through a file in tmp_path, outputs in tmp_path), fails the test if a rank fails, and returns
    the worker imported in this process, for its one-process reference."""
    import importlib.util
    import os
    import subprocess
    import sys

    def run(worker: str):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        cmd = lambda rank: [sys.executable, worker, str(rank), "2", str(tmp_path / "init"), str(tmp_path)]  # noqa: E731
        procs = [
            subprocess.Popen(cmd(rank), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) for rank in range(2)
        ]
        try:
            outputs = [p.communicate(timeout=120)[0].decode(errors="replace") for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for rank, p in enumerate(procs):
            assert p.returncode == 0, f"rank {rank} failed:\n{outputs[rank][-3000:]}"
        spec = importlib.util.spec_from_file_location(f"rtl_test_{os.path.basename(worker)[:-3]}", worker)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return run


# ------------------------------------------------------------------------------------------------------------ CIFAR
# Tiny files in the official python-pickle layout. The official pickles were written by Python 2, whose str keys
# read back as bytes under pickle.load(encoding="bytes") (b"data") and as str under encoding="latin1" (what
# torchvision uses); a Python 3 str or bytes key would only give one of the two. _Py2Pickler writes Python 2 str
# opcodes so the files behave exactly like the official ones under both.


class _Py2Str(bytes):
    """Bytes that pickle as a Python 2 str."""


class _Py2Pickler(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        raw = bytes(obj)
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[_Py2Str] = save_py2_str


def _py2(value):
    if isinstance(value, str):
        return _Py2Str(value.encode("latin1"))
    if isinstance(value, dict):
        return {_py2(k): _py2(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_py2(v) for v in value]
    return value


def _dump(path, obj):
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(_py2(obj))


def _batch(n, num_classes, rng, fine=False):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=n).tolist()
    entry = {"batch_label": "tiny batch", "data": data, "filenames": [f"img_{i}.png" for i in range(n)]}
    if fine:
        entry.update(fine_labels=labels, coarse_labels=[lab // 5 for lab in labels])
    else:
        entry["labels"] = labels
    return entry


@pytest.fixture()
def cifar10_root(tmp_path):
    rng = np.random.default_rng(10)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {f"data_batch_{i}": _batch(2 + i, 10, rng) for i in range(1, 6)}  # 3..7 images: odd sizes
    batches["test_batch"] = _batch(5, 10, rng)
    for name, entry in batches.items():
        _dump(folder / name, entry)
    _dump(
        folder / "batches.meta", {"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": 10000, "num_vis": 3072}
    )
    return tmp_path, batches


@pytest.fixture()
def cifar100_root(tmp_path):
    rng = np.random.default_rng(100)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    batches = {"train": _batch(9, 100, rng, fine=True), "test": _batch(4, 100, rng, fine=True)}
    for name, entry in batches.items():
        _dump(folder / name, entry)
    _dump(
        folder / "meta",
        {"fine_label_names": list(CIFAR100_CLASSES), "coarse_label_names": [f"coarse_{i}" for i in range(20)]},
    )
    return tmp_path, batches
