import json
import subprocess
import sys
from pathlib import Path

import pytest

from exigo.cli import build_parser, config_from_args, main
from exigo.config import DATASETS

from conftest import REPO
from dataset_files import write_image_folder


@pytest.mark.parametrize(
    "option",
    [
        ["--epochs", "0"],
        ["--batch-size", "-3"],
        ["--lr", "0"],
        ["--lr", "nan"],
        ["--lr", "abc"],
        ["--probe-size", "0"],
    ],
)
def test_nonsense_options_exit_2(option, capsys):
    with pytest.raises(SystemExit) as raised:
        main(option)
    assert raised.value.code == 2
    assert option[0] in capsys.readouterr().err


def test_help_lists_every_option_with_its_default():
    text = build_parser().format_help()
    for option in [
        "--epochs",
        "--batch-size",
        "--lr",
        "--seed",
        "--data-dir",
        "--save-dir",
        "--device",
    ]:
        assert option in text
    assert "(default: 2)" in text


def test_config_from_args():
    config = config_from_args(build_parser().parse_args(["--epochs", "3", "--no-download"]))
    assert config.epochs == 3 and config.download is False


def test_missing_data_exit_2_without_traceback_and_nothing_written(tmp_path):
    save = tmp_path / "save"
    process = subprocess.run(
        [
            sys.executable,
            str(REPO / "runner.py"),
            "--data-dir",
            str(tmp_path / "none"),
            "--no-download",
            "--save-dir",
            str(save),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 2
    assert "Traceback" not in process.stderr
    assert "train-images-idx3-ubyte" in process.stderr and "--data-dir" in process.stderr
    assert not (save / "metrics.json").exists() and not (save / "plots").exists()


def test_unwritable_save_dir_exit_2(tmp_path, mnist_root):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = main(["--data-dir", str(mnist_root), "--save-dir", str(blocker / "save")])
    assert code == 2


def test_run_and_exit_runs_exit_handlers_and_keeps_buffered_output(tmp_path):
    # os._exit skips Python's shutdown: the atexit handlers and the pipe-buffered stdout
    # must still come out, with main's exit code
    script = (
        "import atexit\n"
        "from exigo.cli import run_and_exit\n"
        "atexit.register(lambda: print('exit handler ran'))\n"
        "print('buffered before main')\n"
        f"run_and_exit(['--data-dir', {str(tmp_path / 'none')!r}, '--no-download',"
        f" '--save-dir', {str(tmp_path / 'save')!r}])\n"
    )
    process = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert process.returncode == 2
    assert process.stdout.splitlines() == ["buffered before main", "exit handler ran"]
    assert "--data-dir" in process.stderr and "Traceback" not in process.stderr


# ---------------------------------------------------------------- datasets and models by name


def nothing_written(save: Path) -> bool:
    return not save.exists() or not any(save.iterdir())


def test_unknown_dataset_lists_the_names(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["--dataset", "imagenet"])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert "--dataset" in err and all(name in err for name in DATASETS)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("one class", "1 class folder(s) (only)"),
        ("bad image", "square/000b.png is not a readable image"),
    ],
)
def test_bad_image_folder_exit_2_nothing_written(tmp_path, capsys, damage, expected):
    folder, save = tmp_path / "images", tmp_path / "save"
    if damage == "one class":
        write_image_folder(folder, ["only"], per_class=3)
    else:
        write_image_folder(folder, ["circle", "square"], per_class=3)
        (folder / "square" / "000b.png").write_bytes(b"not a png")
    code = main(["--dataset", "imagefolder", "--data-dir", str(folder), "--save-dir", str(save)])
    assert code == 2 and expected in capsys.readouterr().err
    assert nothing_written(save)


def test_unknown_model_exit_2_before_the_data(tmp_path, capsys):
    save = tmp_path / "save"
    code = main(
        ["--model", "resnet19", "--data-dir", str(tmp_path / "none"), "--save-dir", str(save)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "did you mean resnet18" in err and "mobilenet_v3_small" in err
    assert nothing_written(save)


def test_pretrained_offline_exit_2_nothing_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # refused at once: offline
    folder, save = tmp_path / "images", tmp_path / "save"
    write_image_folder(folder, ["circle", "square"], per_class=3)
    options = ["--dataset", "imagefolder", "--data-dir", str(folder), "--save-dir", str(save)]
    code = main([*options, "--model", "resnet18", "--pretrained"])
    err = capsys.readouterr().err
    assert code == 2 and "--pretrained: torchvision's weights for resnet18" in err
    assert nothing_written(save)


def test_pretrained_needs_a_model(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["--pretrained"])
    assert raised.value.code == 2 and "needs --model" in capsys.readouterr().err


def test_an_image_folder_from_the_command_line(tmp_path):
    folder, save = tmp_path / "images", tmp_path / "save"
    write_image_folder(folder, ["circle", "square", "triangle"], per_class=8, size=32)
    code = main(
        [
            *("--dataset", "imagefolder", "--data-dir", str(folder), "--save-dir", str(save)),
            *("--epochs", "1", "--no-attribution-checks", "--projection-limit", "0"),
            *("--val-fraction", "0.25", "--probe-size", "3", "--sequential"),
        ]
    )
    assert code == 0
    info = json.loads((save / "run.json").read_text())
    assert info["model"] == "SmallResNet" and info["class_names"] == [
        "circle",
        "square",
        "triangle",
    ]
    assert info["data"]["source"].startswith(f"image folder {folder}")
    assert (
        info["data"]["image_shape"] == [3, 32, 32]
        and len(info["data"]["normalization"]["mean"]) == 3
    )
    assert f"image folder {folder}" in (save / "report.html").read_text()
