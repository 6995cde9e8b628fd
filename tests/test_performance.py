import pytest
import torch

import exigo._system
from exigo import cli
from exigo.engine.devices import set_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("option", "environment", "cpus", "expected"),
    [
        (0, None, 8, 4),  # half the CPUs
        (0, None, 2, 1),
        (0, None, 1, 1),  # at least one
        (3, None, 8, 3),  # --threads wins
        (3, "2", 8, 3),
        (0, "2", 8, 2),  # OMP_NUM_THREADS set: its count
        (0, "3,1", 8, 3),  # nested levels: the outer one
        (0, "many", 8, 4),  # not a count: the rule without it
    ],
)
def test_threads(monkeypatch, restore_threads, option, environment, cpus, expected):
    if environment is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", environment)
    monkeypatch.setattr(exigo._system, "available_cpus", lambda: cpus)
    torch.set_num_threads(5)
    assert set_threads(option) == expected
    assert torch.get_num_threads() == expected


def test_threads_option_reaches_config():
    args = cli.build_parser().parse_args(["--threads", "2"])
    assert cli.config_from_args(args).threads == 2
    negative = cli.build_parser().parse_args(["--threads", "-1"])
    with pytest.raises(ValueError, match=r"threads \(--threads\) must be at least 0, got -1"):
        cli.config_from_args(negative)
    with pytest.raises(SystemExit) as raised:  # main: argparse's error, exit 2
        cli.main(["--threads", "-1"])
    assert raised.value.code == 2
