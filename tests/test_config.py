"""Config: defaults, YAML files, --set overrides, types, and one-line errors (SPEC §5, §9)."""
import pytest
import yaml

from ccs_fast.config import Config, config_from_dict, load_config, save_config
from ccs_fast.errors import CCSError


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
    (["model.variant=huge"], "model.variant must be one of"),
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
