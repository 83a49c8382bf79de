"""Config files that cannot be read, and settings that only fail late (issue 23 #4): one line
naming the file or setting, before anything runs."""
import os
import secrets

import pytest

from ccs_fast.cli import main
from ccs_fast.config import load_config
from ccs_fast.base.errors import CCSError


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_config_naming_a_folder(tmp_path, capsys):
    folder = tmp_path / f"configs-{secrets.token_hex(3)}"
    folder.mkdir()
    with pytest.raises(CCSError, match="is a folder, not a config file"):
        load_config(folder)
    assert main(["train", "--config", str(folder)]) == 2
    assert _one_error_line(capsys) == f"ccs-fast: error: {folder}: is a folder, not a config file; name a YAML file"


def test_config_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    prefix = b"optim:\n  lr: 0.01\n# "
    path.write_bytes(prefix + bytes([0xff, 0xfe]) + secrets.token_bytes(8))
    assert main(["train", "--config", str(path)]) == 2
    assert _one_error_line(capsys) == (f"ccs-fast: error: {path}: not a text file (byte {len(prefix)} is not UTF-8); "
                                       "a config is YAML text")


def test_config_that_cannot_be_read(tmp_path, capsys, monkeypatch):
    """Tests run as root, who reads a mode-000 file: the refusal is simulated."""
    import pathlib

    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.01\n")
    real = pathlib.Path.read_text

    def read_text(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, os.strerror(13), str(path))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", read_text)
    assert main(["eval", "--config", str(path), "--checkpoint", str(tmp_path / "x.pt")]) == 2
    assert _one_error_line(capsys) == f"ccs-fast: error: {path}: cannot read the config file (Permission denied)"


@pytest.mark.parametrize("backbone, setting", [("resnet18", "data.test_segments"), ("r3d_18", "data.test_clips")])
def test_trn_with_one_test_segment_is_refused_up_front(backbone, setting):
    """Before: a whole training epoch, then a 60-line ValueError in the evaluation."""
    with pytest.raises(CCSError) as info:
        load_config(None, [f"model.backbone={backbone}", "model.consensus=trn", f"{setting}=1"])
    assert str(info.value) == (f"--set: {setting} = 1: model.consensus=trn relates the segments a video is "
                               "tested on and needs at least 2")
    load_config(None, [f"model.backbone={backbone}", "model.consensus=trn", f"{setting}=2"])
