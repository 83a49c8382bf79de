"""What the trainer tests share: the tiny runs (2 epochs straight, and 1 epoch then a resumed
2nd), built once per test session, and rawframe folders of noise JPEGs for the torch loader."""
import shutil

from ccs_fast import trainer
from tiny import tiny_config

_RUNS = {}


def shared_runs(tmp_path_factory) -> dict:
    """The shared runs (the slow part): ``straight`` (2 epochs), ``split`` (1 epoch, its
    last.pt copied to ``epoch1.pt``, then resumed for the 2nd); built on first use."""
    if not _RUNS:
        root = tmp_path_factory.mktemp("runs")
        straight = trainer.train(tiny_config(root / "straight", epochs=2))
        trainer.train(tiny_config(root / "split", epochs=1))
        shutil.copy(root / "split" / "last.pt", root / "epoch1.pt")
        resumed = trainer.train(tiny_config(root / "split", epochs=2), resume=str(root / "split"))
        _RUNS.update(root=root, straight=straight, resumed=resumed)
    return _RUNS


def write_rawframes(root, videos, frames=6, size=32, classes=4):
    """``videos`` rawframe folders of noise JPEGs and their annotation list."""
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


def torch_loader_settings(root, annotation, workers):
    """--set values of the tiny config on the torch backend (dropout stays at its 0.5)."""
    cfg = tiny_config("unused")
    values = {
        "model.backbone": cfg.model.backbone, "model.num_classes": 4, "model.num_segments": 2,
        "model.flow_length": 1, "model.embed_dim": 16, "model.impl": "eager",
        "data.backend": "torch", "data.root": root, "data.train_list": annotation, "data.val_list": annotation,
        "data.batch_size": 4, "data.input_size": 32, "data.test_segments": 2, "data.num_workers": workers,
        "optim.lr": 0.01, "optim.epochs": 2, "optim.lr_steps": "[1]", "optim.warmup_epochs": 0.5,
        "train.precision": "fp32", "train.device": "cpu", "train.log_interval": 1, "train.eval_interval": 1,
        "train.progress": "false", "train.tensorboard": "false",
    }
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
