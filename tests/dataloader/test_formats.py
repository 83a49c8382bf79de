import pytest

from ccs_fast.dataloader.formats import (VideoRecord, read_annotation, read_hmdb51_split,
                                         read_rawframe_list, read_ucf101_split, read_video_list,
                                         write_rawframe_list)
from ccs_fast.base.errors import CCSError


def write(path, text):
    path.write_text(text)
    return path


def one_line_error(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_rawframe_list(tmp_path):
    f = write(tmp_path / "train.txt", "a/v1 12 0\n\n# comment\nb/v2 30 2\n")
    records = read_rawframe_list(f)
    assert records == [VideoRecord("a/v1", 12, 0, 1), VideoRecord("b/v2", 30, 2, 4)]
    assert read_annotation(f, "rawframes", num_classes=3) == records


def test_video_list(tmp_path):
    f = write(tmp_path / "videos.txt", "a/v1.mp4 1\nb/v2.avi 0\n")
    assert read_video_list(f) == [VideoRecord("a/v1.mp4", None, 1, 1),
                                  VideoRecord("b/v2.avi", None, 0, 2)]
    assert read_annotation(f, "video") == read_video_list(f)


@pytest.mark.parametrize("text,needle", [
    ("a 12 0\nb 12\n", "expected 'frame_dir total_frames label'"),
    ("a twelve 0\n", "total_frames 'twelve' is not an integer"),
    ("a 12 -1\n", "label -1 is below 0"),
    ("a 0 1\n", "total_frames 0 is below 1"),
])
def test_bad_rawframe_line_names_file_and_line(tmp_path, text, needle):
    f = write(tmp_path / "bad.txt", text)
    with pytest.raises(CCSError) as excinfo:
        read_rawframe_list(f)
    line = text.count("\n") if "b 12" in text else 1
    one_line_error(excinfo, f"{f}:{line}", needle)


def test_label_out_of_range_names_file_and_line(tmp_path):
    f = write(tmp_path / "train.txt", "a 12 0\nb 12 5\n")
    with pytest.raises(CCSError) as excinfo:
        read_rawframe_list(f, num_classes=5)
    one_line_error(excinfo, f"{f}:2", "label 5")
    with pytest.raises(CCSError) as excinfo:
        read_video_list(write(tmp_path / "v.txt", "x.mp4 9\n"), num_classes=3)
    one_line_error(excinfo, "v.txt:1", "label 9")


def test_empty_and_missing_lists(tmp_path):
    f = write(tmp_path / "empty.txt", "\n# nothing\n")
    with pytest.raises(CCSError) as excinfo:
        read_rawframe_list(f)
    one_line_error(excinfo, str(f), "no videos")
    with pytest.raises(CCSError) as excinfo:
        read_video_list(tmp_path / "absent.txt")
    one_line_error(excinfo, "absent.txt", "not found")


@pytest.fixture
def ucf(tmp_path):
    write(tmp_path / "classInd.txt", "1 ApplyEyeMakeup\n2 Archery\n3 YoYo\n")
    write(tmp_path / "trainlist01.txt",
          "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nYoYo/v_YoYo_g01_c01.avi 3\n")
    write(tmp_path / "testlist01.txt", "Archery/v_Archery_g01_c01.avi\nYoYo/v_YoYo_g02_c03.avi\n")
    return tmp_path


def test_ucf101_train_and_test_splits(ucf):
    train = read_ucf101_split(ucf / "trainlist01.txt", ucf / "classInd.txt")
    assert [(r.path, r.label) for r in train] == [
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", 0), ("YoYo/v_YoYo_g01_c01.avi", 2)]
    test = read_ucf101_split(ucf / "testlist01.txt", ucf / "classInd.txt")
    assert [(r.path, r.label, r.line) for r in test] == [
        ("Archery/v_Archery_g01_c01.avi", 1, 1), ("YoYo/v_YoYo_g02_c03.avi", 2, 2)]


def test_ucf101_bad_lines(ucf):
    write(ucf / "testlist02.txt", "Archery/a.avi\nBowling/b.avi\n")
    with pytest.raises(CCSError) as excinfo:
        read_ucf101_split(ucf / "testlist02.txt", ucf / "classInd.txt")
    one_line_error(excinfo, "testlist02.txt:2", "Bowling")
    write(ucf / "trainlist02.txt", "Archery/a.avi 4\n")
    with pytest.raises(CCSError) as excinfo:
        read_ucf101_split(ucf / "trainlist02.txt", ucf / "classInd.txt")
    one_line_error(excinfo, "trainlist02.txt:1", "label 3")


def test_hmdb51_splits(tmp_path):
    write(tmp_path / "wave_test_split1.txt", "w1.avi 1\nw2.avi 2\nw3.avi 0\n")
    write(tmp_path / "drink_test_split1.txt", "d1.avi 2\nd2.avi 1\n")
    write(tmp_path / "drink_test_split2.txt", "d1.avi 1\n")
    train = read_hmdb51_split(tmp_path, split=1, train=True)
    assert [(r.path, r.label) for r in train] == [("drink/d2.avi", 0), ("wave/w1.avi", 1)]
    test = read_hmdb51_split(tmp_path, split=1, train=False)
    assert [(r.path, r.label) for r in test] == [("drink/d1.avi", 0), ("wave/w2.avi", 1)]
    write(tmp_path / "wave_test_split1.txt", "w1.avi 3\n")
    with pytest.raises(CCSError) as excinfo:
        read_hmdb51_split(tmp_path, split=1)
    one_line_error(excinfo, "wave_test_split1.txt:1", "0|1|2")
    with pytest.raises(CCSError) as excinfo:
        read_hmdb51_split(tmp_path, split=3)
    one_line_error(excinfo, str(tmp_path), "split3")


def test_write_rawframe_list_round_trip(tmp_path):
    records = [VideoRecord("a/v1", 12, 0, 1), VideoRecord("b/v2", 30, 2, 2)]
    out = tmp_path / "lists" / "train.txt"
    write_rawframe_list(records, out)
    assert read_rawframe_list(out) == records
    assert [p.name for p in out.parent.iterdir()] == ["train.txt"]


def test_offsets_label_less_and_multi_label_lines(tmp_path):
    """Issue 12: MMAction2's with_offset lists, label-less lists, multi-label lines."""
    f = write(tmp_path / "offset.txt", "imgs 2 5 127\nimgs 0 3 1\n")
    assert read_rawframe_list(f) == [VideoRecord("imgs", 5, 127, 1, 2), VideoRecord("imgs", 3, 1, 2)]
    f = write(tmp_path / "nolabel.txt", "a 12\nb 2 10 -1\nc 12 1\n")
    with pytest.raises(CCSError) as excinfo:
        read_rawframe_list(f)
    one_line_error(excinfo, f"{f}:1", "expected 'frame_dir total_frames label'", "predict")
    records = read_rawframe_list(f, labels=False)
    assert records == [VideoRecord("a", 12, None, 1), VideoRecord("b", 10, None, 2, 2),
                       VideoRecord("c", 12, 1, 3)]
    out = tmp_path / "round.txt"
    write_rawframe_list(records, out)
    assert out.read_text() == "a 12\nb 2 10 -1\nc 12 1\n"
    assert read_rawframe_list(out, labels=False) == records
    v = write(tmp_path / "videos.txt", "x.mp4\ny.mp4 -1\n")
    assert [r.label for r in read_video_list(v, labels=False)] == [None, None]
    with pytest.raises(CCSError) as excinfo:
        read_video_list(v)
    one_line_error(excinfo, f"{v}:1", "predict")
    m = write(tmp_path / "multi.txt", "imgs 5 1 2 3\n")
    with pytest.raises(CCSError) as excinfo:
        read_rawframe_list(m)
    one_line_error(excinfo, f"{m}:1", "multi-label lists are not supported")


def test_class_folder_with_a_space_says_so(ucf):
    """Issue 12 #8: 'Jump Rope/v.avi' gave "label 'Rope/v.avi' is not an integer"."""
    write(ucf / "testlist03.txt", "Jump Rope/v_JumpRope_g01_c01.avi\n")
    with pytest.raises(CCSError) as excinfo:
        read_ucf101_split(ucf / "testlist03.txt", ucf / "classInd.txt")
    one_line_error(excinfo, "testlist03.txt:1", "holds a space", "rename")
    write(ucf / "trainlist03.txt", "Jump Rope/v_JumpRope_g01_c01.avi 2\n")
    with pytest.raises(CCSError) as excinfo:
        read_ucf101_split(ucf / "trainlist03.txt", ucf / "classInd.txt")
    one_line_error(excinfo, "trainlist03.txt:1", "holds a space")
