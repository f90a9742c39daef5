"""sheafdist: a feedforward ReLU network as a cellular sheaf, run by message passing."""

__version__ = "0.1.0"
