"""Config: defaults, YAML files, --set overrides, types, and one-line errors (SPEC §5, §9)."""
import pytest
import yaml

from ccs_fast.config import Config, config_from_dict, load_config, save_config
from ccs_fast.base.errors import CCSError


def test_defaults_are_the_papers():
    cfg = load_config()
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 1e-3, 0.9, 5e-4)
    assert cfg.optim.lr_steps == [50] and cfg.data.input_size == 224
    assert (cfg.loss.lambda1, cfg.loss.lambda2, cfg.loss.alpha1, cfg.loss.alpha2, cfg.loss.alpha3) == (0.5, 0.5, 0.3, 0.3, 0.8)
    assert cfg.model.cb_stages == [-1] and cfg.model.cb_gamma_init == 0.0


def test_yaml_then_overrides_with_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"backbone": "resnet18", "cb_stages": [3]}, "optim": {"lr": 0.1}}))
    cfg = load_config(path, ["optim.lr=0.02", "model.cb_stages=[2,3]", "data.classes_per_batch=4",
                             "data.batch_size=8", "train.compile=true", "model.pretrained=none", "optim.epochs=7"])
    assert cfg.model.backbone == "resnet18"
    assert cfg.optim.lr == 0.02 and isinstance(cfg.optim.lr, float)
    assert cfg.model.cb_stages == [2, 3]
    assert cfg.data.classes_per_batch == 4 and cfg.train.compile is True
    assert cfg.model.pretrained is None and cfg.optim.epochs == 7


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = load_config(None, ["model.variant=cs", "optim.lr_steps=[10,20]"])
    assert config_from_dict(cfg.to_dict()) == cfg
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize("overrides, match", [
    (["model.nope=1"], "unknown config key model.nope"),
    (["nosection.lr=1"], "unknown config section"),
    (["optim.lr=fast"], "optim.lr: expected float"),
    (["optim.epochs=2.5"], "optim.epochs: expected int"),
    (["train.compile=maybe"], "expected true or false"),
    (["model.variant=huge"], "model.variant = .huge.: must be one of"),
    (["data.batch_size=10", "data.classes_per_batch=4"], "multiple of data.classes_per_batch"),
    (["lr=1"], "expected section.key=value"),
])
def test_bad_overrides_are_one_line_errors(overrides, match):
    with pytest.raises(CCSError, match=match) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def test_bad_files_name_the_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(CCSError, match="missing.yaml: config file not found"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(CCSError, match="broken.yaml: not valid YAML"):
        load_config(broken)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  bakbone: resnet18\n")
    with pytest.raises(CCSError, match=r"unknown.yaml: unknown config key model.bakbone"):
        load_config(unknown)


def test_packaged_configs_load():
    from ccs_fast.cli import packaged_configs, resolve_config_path

    names = packaged_configs()
    assert {"demo", "ucf101", "hmdb51"} <= set(names)
    for name in names:
        assert isinstance(load_config(resolve_config_path(name)), Config)


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=0", "data.batch_size = 0: must be >= 1"),
    ("optim.lr=-0.01", "optim.lr = -0.01: must be > 0"),
    ("optim.lr=.nan", "optim.lr = nan: must be > 0"),
    ("data.num_workers=-2", "data.num_workers = -2: must be >= 0 (or none)"),
    ("model.num_segments=0", "model.num_segments = 0: must be >= 1"),
    ("optim.epochs=0", "optim.epochs = 0: must be >= 1"),
    ("model.dropout=1.0", "model.dropout = 1.0: must be in [0, 1)"),
    ("optim.betas=[0.9,1.5]", "optim.betas = [0.9, 1.5]: each value must be in [0, 1)"),
    ("optim.clip_grad=0", "optim.clip_grad = 0.0: must be > 0 (or none)"),
    ("train.save_interval=0", "train.save_interval = 0: must be >= 1"),
    ("model.fusion_weights=[1]", "model.fusion_weights = [1.0]: must hold 2 values"),
])
def test_numeric_settings_are_range_checked(override, message):
    """Issue 11 #6: out-of-range settings crashed later with tracebacks, or trained nothing."""
    with pytest.raises(CCSError) as info:
        load_config(None, [override])
    assert str(info.value) == f"--set: {message}"


def test_errors_name_where_the_value_came_from(tmp_path):
    """Issue 11 #6: a bad --set value was reported against the YAML file."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"batch_size": 8}, "optim": {"epochs": 0}}))
    with pytest.raises(CCSError, match=r"^--set: data.batch_size = -1: must be >= 1$"):
        load_config(path, ["data.batch_size=-1", "optim.epochs=3"])
    with pytest.raises(CCSError, match=rf"^{path}: optim.epochs = 0: must be >= 1$"):
        load_config(path, [])
    assert load_config(path, ["optim.epochs=3"]).optim.epochs == 3  # --set may repair the file's value
    base = Config().to_dict()
    base["optim"]["lr"] = -1.0
    with pytest.raises(CCSError, match=r"^runs/x/last.pt: optim.lr = -1.0: must be > 0$"):
        load_config(None, [], base=base, base_source="runs/x/last.pt")


def test_resume_differences():
    from ccs_fast.config import resume_differences

    saved = Config().to_dict()
    del saved["model"]["cb_gamma_init"]  # a checkpoint from before a field existed
    cfg = load_config(None, ["optim.lr=0.1", "optim.epochs=90", "data.num_workers=2", "optim.momentum=0.5",
                             "model.cb_gamma_init=1.0"])
    changeable, refused = resume_differences(saved, cfg)
    assert changeable == {"optim.lr": (1e-3, 0.1), "optim.epochs": (80, 90), "data.num_workers": (None, 2)}
    assert refused == {"optim.momentum": (0.9, 0.5)}


# ---------------------------------------------------------------------------- issue 22

def test_path_settings_expand_home_and_environment(tmp_path, monkeypatch):
    """Issue 22 #1: a shell expands no ``~`` after ``=``; every path setting expands ``~`` and
    environment variables, from YAML and from --set; an unset variable is one line."""
    import secrets

    from ccs_fast.config import PATH_SETTINGS

    home, var = tmp_path / "home", f"CCS_TEST_{secrets.token_hex(4).upper()}"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv(var, str(tmp_path / "data"))
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(yaml.safe_dump({"data": {"root": f"${{{var}}}/rawframes", "val_list": "~/val.txt"}}))
    cfg = load_config(yaml_file, ["model.pretrained=~/weights/resnet50.pth", f"data.train_list=${var}/train.txt",
                                  "train.out_dir=~/runs/a", f"data.flow_root=${var}/flow"])
    assert cfg.model.pretrained == str(home / "weights" / "resnet50.pth")
    assert cfg.data.root == str(tmp_path / "data" / "rawframes") and cfg.data.val_list == str(home / "val.txt")
    assert cfg.data.train_list == str(tmp_path / "data" / "train.txt")
    assert cfg.train.out_dir == str(home / "runs" / "a") and cfg.data.flow_root == str(tmp_path / "data" / "flow")
    assert set(PATH_SETTINGS) >= {"model.pretrained", "data.root", "data.train_list", "data.val_list",
                                  "data.flow_root", "train.out_dir"}
    assert load_config(None, ["data.filename_tmpl=img_{:05d}.jpg"]).data.filename_tmpl == "img_{:05d}.jpg"
    monkeypatch.delenv(var)
    with pytest.raises(CCSError, match=rf"--set: data.root = '\${var}/x': environment variable \${var} is not set"):
        load_config(None, [f"data.root=${var}/x"])


def _rawframe_tree(tmp_path, classes: int, class_ind: bool):
    """Lists of a ``classes``-class data set (2 videos per class), optionally a classInd.txt."""
    data = tmp_path / f"data{classes}{class_ind}"
    data.mkdir()
    lines = [f"Class{c}/v_{c}_{i} 10 {c}" for c in range(classes) for i in range(2)]
    (data / "train_rawframes_split1.txt").write_text("\n".join(lines) + "\n")
    (data / "val_rawframes_split1.txt").write_text("\n".join(lines[::2]) + "\n")
    if class_ind:
        (data / "classInd.txt").write_text("".join(f"{c + 1} Class{c}\n" for c in range(classes)))
    return [f"data.train_list={data / 'train_rawframes_split1.txt'}",
            f"data.val_list={data / 'val_rawframes_split1.txt'}", f"data.root={data / 'rawframes'}"]


@pytest.mark.parametrize("class_ind", [True, False])
def test_class_count_mismatch_is_refused_or_taken_from_the_data(tmp_path, class_ind):
    """Issue 22 #3: ``--config ucf101`` (num_classes 101) on a 3-class tree is one line naming
    both numbers and the setting; with num_classes left unset the data's count is taken."""
    import random

    from ccs_fast.config import settle_num_classes

    classes = random.randint(3, 7)
    sets = _rawframe_tree(tmp_path, classes, class_ind)
    cfg = load_config("ccs_fast/configs/ucf101.yaml", sets)
    with pytest.raises(CCSError) as info:
        settle_num_classes(cfg)
    message = str(info.value)
    assert "\n" not in message and f"the data has {classes} classes" in message
    assert "model.num_classes = 101" in message and f"--set model.num_classes={classes}" in message
    assert ("classInd.txt" in message) == class_ind
    # explicit and equal: nothing to say
    assert settle_num_classes(load_config("ccs_fast/configs/ucf101.yaml", [*sets, f"model.num_classes={classes}"])) is None
    # left at its default: the data's count, and a line saying so
    cfg = load_config(None, sets)
    note = settle_num_classes(cfg)
    assert cfg.model.num_classes == classes and note.startswith(f"model.num_classes = {classes}, from ")
    # from a checkpoint's config (resume, eval): explicit
    cfg = load_config(None, sets[:2], base={"model": {"num_classes": 101}}, base_source="ckpt.pt")
    with pytest.raises(CCSError, match="from ckpt.pt"):
        settle_num_classes(cfg)
