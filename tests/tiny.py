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
