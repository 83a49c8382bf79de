"""Typed configuration: dataclasses with their defaults, YAML files and ``--set key=value``.

Defaults follow the paper (Zhang et al., arXiv 1908.10136, §4.1) where it gives one and
TSN (Wang et al., 2016) for the two-stream training details it inherits; each comment
says which.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ccs_fast.base.atomic import write_text
from ccs_fast.base.errors import CCSError, bad_file
from ccs_fast.dataloader import BACKENDS
from ccs_fast.dataloader.formats import MODALITIES
from ccs_fast.dataloader.multicrop import CROP_COUNTS

VARIANTS = ("baseline", "cb", "cs", "all")
CONSENSUS = ("avg", "max", "mul", "concat", "trn")
TEST_CROPS = CROP_COUNTS  # TSN / MMAction2 test views: centre, three along the long side, TenCrop


@dataclass
class ModelConfig:
    variant: str = "all"  # paper Table 3: baseline | cb (connection block) | cs (shared block) | all (CCS)
    backbone: str = "resnet50"  # torchvision name or "timm:<name>"; same architecture for both streams
    pretrained: Optional[str] = None  # local RGB checkpoint (never downloaded at run time)
    num_classes: int = 101  # UCF-101
    num_segments: int = 3  # TSN training segments K
    flow_length: int = 5  # TSN: L = 5 flow pairs, 2L = 10 input channels
    cb_stages: list[int] = field(default_factory=lambda: [-1])  # stages followed by a connection block (1-based, -1 = last); paper: the last
    cb_reduction: int = 2  # C_e = C / r (paper §3.1)
    cb_heads: int = 1  # the paper uses a single head
    cb_scale: Optional[float] = None  # None: C_e ** -0.5; 1.0 is Eq. 2 literally
    cb_gamma_init: float = 0.0  # BN γ of the block's output: 0 = identity at init (paper); >0 helps from scratch
    consensus: str = "avg"  # segment consensus, paper Fig. 5a: avg | max | mul | concat; trn: multi-scale temporal relations (paper Table 2, TRN)
    clip_len: int = 16  # 3-D backbones only: frames per clip T (MMAction2 SampleFrames; 16 frames at 224 give an 8x7x7 map)
    frame_interval: int = 2  # 3-D backbones only: frames between sampled frames (MMAction2 i3d: 32x2, here 16x2)
    embed_dim: int = 512  # D_s of the shared projection
    dropout: float = 0.5  # before the classifier (TSN uses 0.8 for RGB, 0.7 for flow with BN-Inception)
    partial_bn: bool = True  # TSN: freeze BN statistics except the first layer's
    impl: str = "auto"  # kernels: auto (Triton on CUDA) | triton | eager
    fusion_weights: list[float] = field(default_factory=lambda: [1.0, 1.0])  # RGB : flow late fusion, paper 1:1
    class_names: Optional[list[str]] = None  # label i's name; None: found by train (classInd.txt or class folders)

    @property
    def video(self) -> bool:
        """Whether ``backbone`` is a 3-D model (clips of ``clip_len`` frames, 2 flow channels per
        frame) rather than a 2-D one (TSN segments with 2L-channel flow stacks). The names
        belong to ccs_fast.video_backbones; every layer asks this property."""
        from ccs_fast.video_backbones import is_video_backbone
        return is_video_backbone(self.backbone)


@dataclass
class LossConfig:
    lambda1: float = 0.5  # weight of the cross-modal triplet loss L1 (paper §4.1)
    lambda2: float = 0.5  # weight of the discriminative embedding loss L2 (paper §4.1)
    alpha1: float = 0.3  # triplet margin (paper §4.1)
    alpha2: float = 0.3  # intra-class hinge (paper §4.1)
    alpha3: float = 0.8  # inter-class hinge (paper §4.1)
    ranking_warmup_epochs: float = 0.0  # λ1, λ2 ramp linearly from 0 over these epochs; the paper uses none (from scratch: README, demo)


@dataclass
class DataConfig:
    root: str = ""  # data root: rawframes folder (or videos folder for modality=video)
    train_list: str = ""  # MMAction2 annotation list for training
    val_list: str = ""  # MMAction2 annotation list for evaluation
    modality: str = "rawframes"  # rawframes | video (RGB decoded from the videos)
    flow_root: Optional[str] = None  # rawframes folder holding the flow when modality=video
    filename_tmpl: str = "img_{:05d}.jpg"  # RGB frame names (MMAction2's RawFrameDecode default)
    flow_tmpl: str = "flow_{}_{:05d}.jpg"  # flow names, {} = x | y (denseflow; "{}_{:05d}.jpg" for x_00001.jpg)
    start_index: int = 1  # number of the first frame file (MMAction2: 1; 0 allowed)
    flow_count: Optional[bool] = None  # total_frames of the lists counts flow frames; None: detect from the files
    backend: str = "torch"  # torch | dali | synthetic
    batch_size: int = 32  # clips per batch and GPU
    eval_batch_size: Optional[int] = None  # clips per evaluation batch (25 segments each); None: batch_size
    classes_per_batch: Optional[int] = None  # balanced batches of N classes x M videos (paper §4.1); None: shuffled
    input_size: int = 224  # paper §4.1
    test_segments: int = 25  # TSN test protocol (2-D backbones)
    test_clips: int = 10  # 3-D backbones: clips per test video (MMAction2 I3D test: 10 clips)
    test_crops: int = 1  # views per test clip: 1 centre | 3 along the long side | 10 (TenCrop); TSN tests with 10
    num_workers: Optional[int] = None  # torch backend workers; None: every core
    skip_bad: bool = False  # skip unreadable samples instead of stopping
    synthetic_batches: int = 50  # batches per epoch of the synthetic backend (benchmarks)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd (paper §4.1) | adamw
    lr: float = 1e-3  # paper §4.1
    momentum: float = 0.9  # paper §4.1 (sgd)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw (torch's defaults)
    weight_decay: float = 5e-4  # paper §4.1
    epochs: int = 80  # paper: lr divided by 10 after 50 epochs; 80 in all (TSN-style schedule)
    lr_steps: list[int] = field(default_factory=lambda: [50])  # epochs at which lr is divided by 10 (paper §4.1)
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0  # linear warm-up; the paper uses none
    clip_grad: Optional[float] = 40.0  # TSN clips the gradient norm at 40 (20 for flow)
    fused: bool = True  # torch's fused SGD on CUDA
    use_apex: bool = False  # apex FusedSGD when installed and asked for


@dataclass
class TrainConfig:
    out_dir: str = "runs/ccs"
    seed: int = 0
    precision: str = "bf16"  # bf16 | fp16 (with a GradScaler) | fp32
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    deterministic: bool = False  # bit-identical runs on a GPU too: deterministic torch ops, no fp atomics in the kernels
    device: str = "auto"  # auto: cuda when available, else cpu
    log_interval: int = 20  # steps between host syncs for logging
    eval_interval: int = 5  # epochs between evaluations (and at the end)
    save_interval: int = 1  # epochs between checkpoints
    save_every_steps: int = 0  # also a mid-epoch last.pt every N steps (0: off), for jobs killed without a signal
    stop_timeout_s: float = 20.0  # after SIGTERM/SIGINT/SIGUSR1: longest wait for a step boundary (below Slurm's and Kubernetes' 30 s grace)
    progress: bool = True  # progress bar with clips/s
    tensorboard: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # ``section.key`` -> where its value came from (YAML file, --set, checkpoint), filled by
    # load_config; a setting not in it holds its default. Not a field: not saved or compared.
    sources: typing.ClassVar[dict[str, str]] = {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, source: str = "config", sources: Optional[dict[str, str]] = None) -> "Config":
        """Check every choice and every numeric range; CCSError naming the field, its value and
        the allowed values. ``sources`` maps ``section.key`` to where that value came from (a
        YAML file or ``--set``); fields not in it are attributed to ``source``."""
        sources = sources or {}

        def fail(name: str, value, allowed: str):
            raise CCSError(f"{sources.get(name, source)}: {name} = {value!r}: {allowed}")

        choices = (
            ("model.variant", VARIANTS), ("model.consensus", CONSENSUS),
            ("model.impl", ("auto", "triton", "eager")), ("train.precision", ("bf16", "fp16", "fp32")),
            ("data.backend", BACKENDS), ("optim.name", ("sgd", "adamw")),
            ("data.modality", MODALITIES), ("data.test_crops", TEST_CROPS),
        )
        for name, allowed in choices:
            value = self.get(name)
            if value not in allowed:
                fail(name, value, f"must be one of {', '.join(map(str, allowed))}")
        for name, allowed in NUMERIC_RANGES.items():
            value = self.get(name)
            values = value if isinstance(value, list) else [value]
            if value is None and allowed.optional:
                continue
            if not all(allowed.contains(v) for v in values):
                each = "each value " if isinstance(value, list) else ""
                fail(name, value, f"{each}must be {allowed}")
        for name, length in (("optim.betas", 2), ("model.fusion_weights", 2)):
            if len(self.get(name)) != length:
                fail(name, self.get(name), f"must hold {length} values")
        if not any(self.model.fusion_weights):
            fail("model.fusion_weights", self.model.fusion_weights, "must not all be 0")
        if self.model.consensus == "trn" and self.model.num_segments < 2:
            fail("model.consensus", "trn", f"relates segments and needs model.num_segments >= 2, "
                                           f"got {self.model.num_segments}")
        if self.model.consensus == "trn":
            name = "data.test_clips" if self.model.video else "data.test_segments"
            if self.get(name) < 2:
                fail(name, self.get(name), "model.consensus=trn relates the segments a video is tested on "
                                           "and needs at least 2")
        names = self.model.class_names
        if names is not None and len(names) != self.model.num_classes:
            fail("model.class_names", names, f"must hold model.num_classes = {self.model.num_classes} names")
        from ccs_fast.dataloader.rawframes import check_templates
        try:
            check_templates(self.data.filename_tmpl, self.data.flow_tmpl, self.data.start_index)
        except ValueError as exc:
            name = "data.filename_tmpl" if "filename_tmpl" in str(exc) else "data.flow_tmpl"
            raise CCSError(f"{sources.get(name, source)}: {exc}") from None
        check_out_dir(self.train.out_dir, sources.get("train.out_dir", source))
        n = self.data.classes_per_batch
        if n is not None and self.data.batch_size % n:
            where = "--set" if "--set" in (sources.get("data.batch_size"), sources.get("data.classes_per_batch")) else \
                sources.get("data.classes_per_batch", source)
            raise CCSError(f"{where}: data.batch_size ({self.data.batch_size}) must be a multiple of "
                           f"data.classes_per_batch ({n})")
        return self

    def get(self, dotted: str) -> Any:
        """The value of ``section.key``."""
        section, key = dotted.split(".", 1)
        return getattr(getattr(self, section), key)


def check_out_dir(out_dir, source: str = "config") -> None:
    """``train.out_dir`` must name a folder (``Config.validate``; the CLI's ``--out``)."""
    if not str(out_dir).strip():
        raise CCSError(f"{source}: train.out_dir = {out_dir!r}: must name a folder")


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric setting: finite numbers between ``low`` and ``high``
    (each bound included unless ``*_open``); ``optional``: None is allowed too."""
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False

    def contains(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = "a finite number"
        return text + (" (or none)" if self.optional else "")


# Every numeric setting and its range; lists are checked value by value. Config.validate
# applies them before anything is built or written.
NUMERIC_RANGES: dict[str, Range] = {
    "model.num_classes": Range(2),
    "model.num_segments": Range(1),
    "model.flow_length": Range(1),
    "model.clip_len": Range(1),
    "model.frame_interval": Range(1),
    "model.cb_reduction": Range(1),
    "model.cb_heads": Range(1),
    "model.cb_scale": Range(0, low_open=True, optional=True),
    "model.cb_gamma_init": Range(),
    "model.embed_dim": Range(1),
    "model.dropout": Range(0, 1, high_open=True),
    "model.fusion_weights": Range(0),
    "loss.lambda1": Range(0),
    "loss.lambda2": Range(0),
    "loss.alpha1": Range(0),
    "loss.alpha2": Range(0),
    "loss.alpha3": Range(0),
    "loss.ranking_warmup_epochs": Range(0),
    "data.batch_size": Range(1),
    "data.eval_batch_size": Range(1, optional=True),
    "data.classes_per_batch": Range(1, optional=True),
    "data.input_size": Range(1),
    "data.test_segments": Range(1),
    "data.test_clips": Range(1),
    "data.num_workers": Range(0, optional=True),
    "data.synthetic_batches": Range(1),
    "data.start_index": Range(0),
    "optim.lr": Range(0, low_open=True),
    "optim.momentum": Range(0, 1, high_open=True),
    "optim.betas": Range(0, 1, high_open=True),
    "optim.weight_decay": Range(0),
    "optim.epochs": Range(1),
    "optim.lr_steps": Range(0),
    "optim.lr_gamma": Range(0, low_open=True),
    "optim.warmup_epochs": Range(0),
    "optim.clip_grad": Range(0, low_open=True, optional=True),
    "train.seed": Range(0),
    "train.log_interval": Range(1),
    "train.eval_interval": Range(1),
    "train.save_interval": Range(1),
    "train.save_every_steps": Range(0),
    "train.stop_timeout_s": Range(0, low_open=True),
}

# Settings a resumed run may change: the schedule's length and base learning rate, how
# often to evaluate and save, loader workers, logging, and where the same data and outputs
# live (model.pretrained is unused on resume: the weights come from the checkpoint).
# Every other setting defines the run being continued and must equal the checkpoint's.
RESUME_CHANGEABLE = (
    "optim.lr", "optim.epochs", "train.eval_interval", "train.save_interval", "train.save_every_steps",
    "train.stop_timeout_s", "data.num_workers",
    "train.log_interval", "train.progress", "train.tensorboard", "train.out_dir", "data.root",
    "data.flow_root", "model.pretrained", "model.class_names",
)


def resume_differences(saved: dict, cfg: "Config") -> tuple[dict, dict]:
    """Settings where ``cfg`` differs from a checkpoint's ``Config.to_dict()``:
    ``(changeable, refused)``, each ``{"section.key": (checkpoint value, cfg value)}``.
    Keys the checkpoint lacks (an older format) are not compared."""
    changeable, refused = {}, {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            old = (saved.get(section) or {}).get(key, value)
            if old != value:
                name = f"{section}.{key}"
                (changeable if name in RESUME_CHANGEABLE else refused)[name] = (old, value)
    return changeable, refused


# Settings that name a file or folder: ``~`` and environment variables are expanded in them
# wherever the value comes from (YAML, ``--set``, a checkpoint's config), since a shell
# expands no ``~`` after ``=`` (``--set model.pretrained=~/w.pth``).
PATH_SETTINGS = (
    "model.pretrained", "data.root", "data.train_list", "data.val_list", "data.flow_root", "train.out_dir",
)

_ENV_REFERENCE = re.compile(r"\$(\w+|\{[^}]*\})")


def expand_path(value: str, where: str) -> str:
    """``value`` with a leading ``~`` (or ``~user``) and ``$NAME`` / ``${NAME}`` expanded;
    CCSError naming ``where`` when a referenced environment variable is not set."""
    missing = [m.strip("{}") for m in _ENV_REFERENCE.findall(value) if m.strip("{}") not in os.environ]
    if missing:
        raise CCSError(f"{where} = {value!r}: environment variable ${missing[0]} is not set")
    return os.path.expanduser(os.path.expandvars(value)) if value else value


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _strip_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce(value: Any, tp, where: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type."""
    tp, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise CCSError(f"{where}: may not be empty")
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value if value.strip().startswith("[") else f"[{value}]")
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item_tp, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise CCSError(f"{where}: expected true or false, got {value!r}")
    try:
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise CCSError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    return value


def _is_text_field(section: str, key: str) -> bool:
    """Whether ``section.key`` is a plain (non-optional) str field."""
    for f in dataclasses.fields(Config):
        if f.name == section:
            return _field_types(f.default_factory).get(key) is str
    return False


def _apply(cfg: Config, section: str, key: str, value: Any, source: str,
           sources: Optional[dict[str, str]] = None) -> None:
    sub = getattr(cfg, section, None)
    if sub is None or not dataclasses.is_dataclass(sub):
        sections = ", ".join(f.name for f in dataclasses.fields(Config))
        raise CCSError(f"{source}: unknown config section {section!r} (sections: {sections})")
    types_ = _field_types(type(sub))
    if key not in types_:
        raise CCSError(f"{source}: unknown config key {section}.{key} (keys of {section}: {', '.join(types_)})")
    value = _coerce(value, types_[key], f"{source}: {section}.{key}")
    if f"{section}.{key}" in PATH_SETTINGS and isinstance(value, str):
        value = expand_path(value, f"{source}: {section}.{key}")
    setattr(sub, key, value)
    if sources is not None:
        sources[f"{section}.{key}"] = source


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                base: Optional[dict] = None, base_source: str = "checkpoint") -> Config:
    """Defaults (or ``base``, a ``Config.to_dict()`` such as a checkpoint's), then the YAML
    file at ``path``, then ``key=value`` overrides (``section.key=value``), validated: the one
    validation of a config read from files and the command line (the trainer trusts it).
    Errors name the source of the offending value: the YAML file, ``--set`` or ``base_source``."""
    cfg = read_config(path, overrides, base, base_source)
    return cfg.validate(str(path) if path else "config", cfg.sources)


def read_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                base: Optional[dict] = None, base_source: str = "checkpoint") -> Config:
    """``load_config`` without the validation, for a caller that changes the config further
    and validates it once when it is complete (the demo); ``cfg.sources`` says where each
    value came from."""
    cfg = Config()
    sources: dict[str, str] = {}
    for section, values in (base or {}).items():
        for key, value in values.items():
            _apply(cfg, section, key, value, base_source, sources)
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise bad_file(path, "config file not found") from None
        except IsADirectoryError:
            raise bad_file(path, "is a folder, not a config file; name a YAML file") from None
        except UnicodeDecodeError as exc:
            raise bad_file(path, f"not a text file (byte {exc.start} is not UTF-8); a config is YAML text") from None
        except OSError as exc:
            raise bad_file(path, f"cannot read the config file ({exc.strerror or exc})") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise bad_file(path, f"not valid YAML{where}") from None
        if not isinstance(data, dict):
            raise bad_file(path, "expected a mapping of sections (model, loss, data, optim, train)")
        for section, values in data.items():
            if not isinstance(values, dict):
                raise bad_file(path, f"section {section!r} must be a mapping")
            for key, value in values.items():
                _apply(cfg, section, key, value, str(path), sources)
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise CCSError(f"--set {item!r}: expected section.key=value, e.g. optim.lr=0.01")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        if _is_text_field(section.strip(), key.strip()):
            # a file name template such as {}_{:05d}.jpg is not valid YAML: taken as written
            parsed = value
        else:
            try:
                parsed = yaml.safe_load(value) if value.strip() else None
            except yaml.YAMLError:
                raise CCSError(f"--set {item!r}: the value is not valid YAML") from None
        _apply(cfg, section.strip(), key.strip(), parsed, "--set", sources)
    cfg.sources = dict(sources)
    return cfg


def data_class_count(cfg: Config) -> Optional[tuple[int, str]]:
    """How many classes the data of ``cfg`` has and a phrase saying where that was read
    ("<file> names", "the labels of <lists> (largest + 1) give"): the nearest ``classInd.txt``
    of the training list (``formats.class_ind_files``), else 1 + the largest label of the
    training and validation lists. None without a training list file."""
    from ccs_fast.dataloader.formats import class_ind_files, default_num_classes, read_annotation, read_ucf101_classes

    train_list = cfg.data.train_list
    if not train_list or not Path(train_list).is_file():
        return None
    found = class_ind_files(train_list, cfg.data.root)
    if found:
        return len(read_ucf101_classes(found[0])), f"{found[0]} names"
    lists = [name for name in (train_list, cfg.data.val_list) if name and Path(name).is_file()]
    labels = [r.label for name in lists for r in read_annotation(name, cfg.data.modality, labels=False)]
    return default_num_classes(labels), f"the labels of {' and '.join(lists)} (largest + 1) give"


def settle_num_classes(cfg: Config) -> Optional[str]:
    """Match ``model.num_classes`` to the data's class count (``data_class_count``) before
    training. Set explicitly (YAML, ``--set`` or a checkpoint) and different: CCSError naming
    both numbers and the setting to change. Left at its default: the data's count is taken
    and a line saying so is returned (None when nothing changed)."""
    found = data_class_count(cfg)
    if found is None or found[0] == cfg.model.num_classes:
        return None
    count, where = found
    source = cfg.sources.get("model.num_classes")
    if source is not None:
        raise CCSError(f"the data has {count} classes ({where} {count}) but model.num_classes = "
                       f"{cfg.model.num_classes} (from {source}); set model.num_classes to {count} "
                       f"(--set model.num_classes={count}) or train on data with {cfg.model.num_classes} classes")
    if count < 2:
        raise CCSError(f"the data has {count} class ({where} {count}); training needs at least 2")
    cfg.model.num_classes = count
    if cfg.model.class_names is not None and len(cfg.model.class_names) != count:
        cfg.model.class_names = None
    return f"model.num_classes = {count}, from the data ({where} {count}; the config leaves it unset)"


def config_from_dict(data: dict, source: str = "checkpoint") -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. stored in a checkpoint)."""
    cfg = Config()
    for section, values in data.items():
        for key, value in values.items():
            _apply(cfg, section, key, value, source)
    return cfg.validate(source)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML; CCSError naming ``path`` when the write fails."""
    try:
        write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    except OSError as exc:
        raise bad_file(path, f"could not write the config ({exc.strerror or exc})") from None
