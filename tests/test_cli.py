import subprocess
import sys

import pytest

from exigo.cli import build_parser, config_from_args, main

from conftest import REPO


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
