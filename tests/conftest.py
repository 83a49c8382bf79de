"""Fixtures the test folders share: the tiny training configuration (a ~0.4 M-parameter timm
ResNet per stream on synthetic CPU clips), the two tiny runs the trainer tests read, rawframe
folders of noise JPEGs for the torch loader, the ``--set`` values of the tiny configuration on
that loader, a driver-script starter for the signal and kill tests, and a torchvision
ResNet's feature map.

The repository's conftest.py (one folder up) sets TRITON_INTERPRET without CUDA and marks the
CUDA cases."""
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest

from ccs_fast.config import Config


@dataclass(frozen=True)
class TinyConfig:
    """``tiny_config(out_dir, epochs=2, **train)``: the tiny training Config, validated, with
    ``train`` fields set from the keywords; ``tiny_config.batches`` synthetic batches per epoch
    (train and eval)."""

    batches: int = 2

    def __call__(self, out_dir, epochs=2, **train) -> Config:
        cfg = Config()
        cfg.model.backbone = "timm:test_resnet"  # ~0.4 M parameters per stream
        cfg.model.num_classes = 4
        cfg.model.num_segments = 2
        cfg.model.flow_length = 1
        cfg.model.embed_dim = 16
        cfg.model.impl = "eager"
        cfg.data.backend = "synthetic"
        cfg.data.synthetic_batches = self.batches
        cfg.data.batch_size = 4
        cfg.data.input_size = 32
        cfg.data.test_segments = 2
        cfg.data.num_workers = 0
        cfg.optim.lr = 0.01
        cfg.optim.epochs = epochs
        cfg.optim.lr_steps = [1]
        cfg.optim.warmup_epochs = 0.5
        cfg.train.out_dir = str(out_dir)
        cfg.train.precision = "fp32"
        cfg.train.device = "cpu"
        cfg.train.log_interval = 2
        cfg.train.eval_interval = 1
        cfg.train.progress = False
        for key, value in train.items():
            setattr(cfg.train, key, value)
        return cfg.validate()

    def torch_loader_settings(self, root, annotation, workers) -> list:
        """``--set`` arguments of this configuration on the torch backend over ``root`` and
        ``annotation`` (train and val), 2 epochs, one log line per step, no TensorBoard;
        dropout stays at its 0.5."""
        cfg = self("unused")
        values = {
            "model.backbone": cfg.model.backbone, "model.num_classes": cfg.model.num_classes,
            "model.num_segments": cfg.model.num_segments, "model.flow_length": cfg.model.flow_length,
            "model.embed_dim": cfg.model.embed_dim, "model.impl": cfg.model.impl,
            "data.backend": "torch", "data.root": root, "data.train_list": annotation, "data.val_list": annotation,
            "data.batch_size": cfg.data.batch_size, "data.input_size": cfg.data.input_size,
            "data.test_segments": cfg.data.test_segments, "data.num_workers": workers,
            "optim.lr": cfg.optim.lr, "optim.epochs": 2, "optim.lr_steps": "[1]",
            "optim.warmup_epochs": cfg.optim.warmup_epochs, "train.precision": "fp32", "train.device": "cpu",
            "train.log_interval": 1, "train.eval_interval": 1, "train.progress": "false",
            "train.tensorboard": "false",
        }
        return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture(scope="session")
def tiny_config() -> TinyConfig:
    return TinyConfig()


@pytest.fixture(scope="session")
def tiny_runs(tiny_config, tmp_path_factory) -> dict:
    """The tiny runs the trainer tests read (the slow part, built once): ``straight`` (2
    epochs; its summary), ``resumed`` (1 epoch in ``root/split``, its last.pt copied to
    ``root/epoch1.pt``, then resumed for the 2nd; the resumed run's summary), ``root``."""
    pytest.importorskip("timm")
    from ccs_fast import trainer

    root = tmp_path_factory.mktemp("runs")
    straight = trainer.train(tiny_config(root / "straight", epochs=2))
    trainer.train(tiny_config(root / "split", epochs=1))
    shutil.copy(root / "split" / "last.pt", root / "epoch1.pt")
    resumed = trainer.train(tiny_config(root / "split", epochs=2), resume=str(root / "split"))
    return {"root": root, "straight": straight, "resumed": resumed}


def write_noise_rawframes(root, videos, frames=6, size=32, classes=4):
    """``videos`` rawframe folders of noise JPEGs (``img_*``, ``flow_x_*``, ``flow_y_*``) under
    ``root/rawframes`` and their annotation list ``root/list.txt`` (class = index % classes);
    returns both paths."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    lines = []
    for v in range(videos):
        folder = root / "rawframes" / f"v{v}"
        folder.mkdir(parents=True)
        for i in range(1, frames + 1):
            cv2.imwrite(str(folder / f"img_{i:05d}.jpg"), rng.integers(0, 256, (size, size, 3), np.uint8))
            if i < frames:
                for axis in "xy":
                    cv2.imwrite(str(folder / f"flow_{axis}_{i:05d}.jpg"), rng.integers(0, 256, (size, size), np.uint8))
        lines.append(f"v{v} {frames} {v % classes}\n")
    (root / "list.txt").write_text("".join(lines))
    return root / "rawframes", root / "list.txt"


@pytest.fixture(scope="session")
def noise_rawframes():
    """``noise_rawframes(root, videos, frames=6, size=32, classes=4)``: rawframe folders of
    noise JPEGs and their list (``write_noise_rawframes``)."""
    return write_noise_rawframes


@pytest.fixture(scope="session")
def tiny_rawframes(tmp_path_factory):
    """8 rawframe folders of the tiny configuration's 4 classes and their list (read-only:
    a test that spoils a frame copies the tree first)."""
    return write_noise_rawframes(tmp_path_factory.mktemp("data"), videos=2 * 4)


@pytest.fixture(scope="session")
def start_driver():
    """``start_driver(folder, source, name, args)``: write ``source`` as a driver script in
    ``folder`` and start it with ``args`` in a new process group (so a test can signal the
    trainer and its loader workers together, as a scheduler does), one intra-op thread, output
    to ``folder/<name>.log``; returns (the process, the log's path)."""

    def start(folder, source: str, name: str, args):
        driver = folder / f"{name}_driver.py"
        driver.write_text(source)
        log = folder / f"{name}.log"
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        with open(log, "w") as sink:
            proc = subprocess.Popen([sys.executable, str(driver), *map(str, args)], stdout=sink,
                                    stderr=subprocess.STDOUT, env=env, cwd=folder, start_new_session=True)
        return proc, log

    return start


@pytest.fixture(scope="session")
def resnet_features():
    """``resnet_features(model, x)``: the feature map of a torchvision ResNet (stem and the four
    layers, no pooling)."""

    def features(model, x):
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            x = getattr(model, name)(x)
        return x

    return features


@pytest.fixture(scope="session")
def assert_whole_loader():
    """``assert_whole_loader(data)``: every member ``dataloader.Loader`` declares, attribute or
    method, is defined on ``data``, and a fresh loader's counters start at zero."""

    def check(data):
        from ccs_fast.dataloader import Loader

        members = [*Loader.__annotations__, "__iter__", "__len__", "set_epoch", "close"]
        assert isinstance(data, Loader)
        assert [name for name in members if not hasattr(data, name)] == []
        assert isinstance(data.skipped_errors, dict) and data.num_skipped == len(data.skipped_errors)
        assert data.batches_done == 0 and isinstance(data.num_videos, int) and len(data) >= 1

    return check
