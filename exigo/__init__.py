"""exigo: watch a PyTorch image classifier learn, and see why it decides what it decides.

`exigo.pipeline.run` trains any image classifier and, after every epoch, hands one evaluation
pass to a list of analyses (confusion matrix, saliency maps, embedding projections, ...) that
write figures, TensorBoard logs and metrics. `python runner.py` is its MNIST instance.
"""

__version__ = "0.1.0"
