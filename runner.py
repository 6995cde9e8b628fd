"""Train a small CNN on MNIST and watch it learn (see `python runner.py --help`)."""

from exigo.cli import run_and_exit

if __name__ == "__main__":
    run_and_exit()
