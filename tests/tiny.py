"""A tiny training configuration shared by the trainer, evaluation and DDP tests: a ~0.4 M
parameter timm ResNet per stream on synthetic CPU tensors."""
from ccs_fast.config import Config

BATCHES = 2  # synthetic batches per epoch (train and eval)


def tiny_config(out_dir, epochs=2, **train) -> Config:
    cfg = Config()
    cfg.model.backbone = "timm:test_resnet"  # ~0.4 M parameters per stream
    cfg.model.num_classes = 4
    cfg.model.num_segments = 2
    cfg.model.flow_length = 1
    cfg.data.synthetic_batches = BATCHES
    cfg.model.embed_dim = 16
    cfg.model.impl = "eager"
    cfg.data.backend = "synthetic"
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


def resnet_features(model, x):
    """The feature map of a torchvision ResNet (stem and the four layers, no pooling)."""
    for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
        x = getattr(model, name)(x)
    return x


def start_driver(tmp_path, source: str, name: str, args):
    """Write ``source`` as a driver script and start it with ``args`` in a new process group
    (so a test can signal the trainer and its loader workers together, as a scheduler does),
    one intra-op thread, output to ``<name>.log``; returns (the process, the log's path)."""
    import os
    import subprocess
    import sys

    driver = tmp_path / f"{name}_driver.py"
    driver.write_text(source)
    log = tmp_path / f"{name}.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, str(driver), *map(str, args)], stdout=sink,
                                stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    return proc, log
