"""Train an image classifier and watch it learn: MNIST by default (`python runner.py --help`)."""

from exigo.cli import run_and_exit

if __name__ == "__main__":
    run_and_exit()
