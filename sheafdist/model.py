"""The feedforward ReLU network: parameters, forward pass, initialisation, files.

A model with architecture ``[n0, n1, ..., nK]`` has K affine layers. Hidden layers
use ReLU with the paper's convention that ``z = 0`` counts as active; the output
``phi`` is ``identity``, ``sigmoid`` or ``softmax`` (over axis 0). Arrays are
``(dim, batch)``, ``W_l`` is ``(n_l, n_{l-1})`` and ``b_l`` is ``(n_l, 1)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .files import MAX_MAGNITUDE, atomic_savez, read_npz, real_array

OUTPUTS = ("identity", "sigmoid", "softmax")


@dataclass
class MLP:
    """Weights ``W[l-1] = W_l`` and biases ``b[l-1] = b_l`` for l = 1..K."""

    W: list[np.ndarray]
    b: list[np.ndarray]
    output: str = "identity"

    @property
    def arch(self) -> list[int]:
        return [self.W[0].shape[1]] + [w.shape[0] for w in self.W]

    @property
    def depth(self) -> int:
        """K, the number of affine layers (k hidden layers plus the output one)."""
        return len(self.W)

    def copy(self) -> MLP:
        return MLP([w.copy() for w in self.W], [b.copy() for b in self.b], self.output)

    def params(self) -> dict[str, np.ndarray]:
        out = {}
        for layer, (w, b) in enumerate(zip(self.W, self.b, strict=True), start=1):
            out[f"W{layer}"] = w
            out[f"b{layer}"] = b
        return out


def relu_mask(z: np.ndarray) -> np.ndarray:
    """The activation pattern ``1[z >= 0]`` as float (zero counts as active)."""
    return (z >= 0).astype(z.dtype)


def phi(output: str, z: np.ndarray) -> np.ndarray:
    """The output nonlinearity applied column by column."""
    if output == "identity":
        return z
    if output == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    if output == "softmax":
        e = np.exp(z - z.max(axis=0, keepdims=True))
        return e / e.sum(axis=0, keepdims=True)
    raise ValueError(f"unknown output {output!r}")


def phi_pullback(output: str, z: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``J_phi(z)^T d``: the adjoint of the output map's Jacobian applied to d."""
    if output == "identity":
        return d
    s = phi(output, z)
    if output == "sigmoid":
        return s * (1.0 - s) * d
    # softmax: J = diag(s) - s s^T is symmetric
    return s * (d - (s * d).sum(axis=0, keepdims=True))


def forward(model: MLP, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every intermediate quantity: ``a0, z1, a1, ..., zK`` and ``a_out`` if any."""
    state = {"a0": x}
    a = x
    for layer, (w, b) in enumerate(zip(model.W, model.b, strict=True), start=1):
        z = w @ a + b
        state[f"z{layer}"] = z
        if layer < model.depth:
            a = relu_mask(z) * z
            state[f"a{layer}"] = a
    if model.output != "identity":
        state["a_out"] = phi(model.output, state[f"z{model.depth}"])
    return state


def predict(model: MLP, x: np.ndarray) -> np.ndarray:
    state = forward(model, x)
    return state.get("a_out", state[f"z{model.depth}"])


def he_init(arch: list[int], seed: int | np.random.Generator, output="identity") -> MLP:
    """He initialisation ``W_l ~ N(0, 2/n_{l-1})`` with zero biases."""
    rng = np.random.default_rng(seed)
    W, b = [], []
    for n_in, n_out in zip(arch[:-1], arch[1:], strict=True):
        W.append(rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in))
        b.append(np.zeros((n_out, 1)))
    return MLP(W, b, output)


def mse(model: MLP, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((predict(model, x) - y) ** 2))


def loss(model: MLP, x: np.ndarray, y: np.ndarray) -> float:
    """MSE for identity output, mean cross-entropy (clamped) otherwise."""
    if model.output == "identity":
        return mse(model, x, y)
    p = np.clip(predict(model, x), 1e-12, 1 - 1e-12)
    if model.output == "sigmoid":
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return float(-np.mean(np.sum(y * np.log(p), axis=0)))


# ---------------------------------------------------------------- files


def parse_arch(text: str, arg: str = "--arch") -> list[int]:
    try:
        arch = [int(t) for t in text.split(",")]
    except ValueError:
        arch = []
    if len(arch) < 2 or min(arch) < 1:
        raise InputError(
            arg, text, "give at least two positive layer widths, e.g. 2,30,1"
        )
    return arch


def check_model(model: MLP, source: str = "model") -> None:
    """Shapes chain, biases are columns, values are finite."""
    if model.output not in OUTPUTS:
        raise InputError(source, f"output={model.output!r}", f"use one of {OUTPUTS}")
    for layer, (w, b) in enumerate(zip(model.W, model.b, strict=True), start=1):
        if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
            raise InputError(source, f"W{layer} of shape {w.shape}", "W must be 2-D")
        if layer > 1 and w.shape[1] != model.W[layer - 2].shape[0]:
            raise InputError(
                source,
                f"W{layer} of shape {w.shape} after W{layer - 1} of shape "
                f"{model.W[layer - 2].shape}",
                f"W{layer} needs {model.W[layer - 2].shape[0]} columns",
            )
        if b.shape != (w.shape[0], 1):
            raise InputError(
                source, f"b{layer} of shape {b.shape}", f"b{layer} must be "
                f"({w.shape[0]}, 1)"
            )
        for name, arr in ((f"W{layer}", w), (f"b{layer}", b)):
            if not np.all(np.isfinite(arr)):
                raise InputError(source, f"{name} with NaN or inf", "fix the file")
            # the Laplacian holds W^T W: its entries are at most |W|_F^2
            peak = float(np.max(np.abs(arr)))
            norm = peak * float(np.linalg.norm(arr / peak)) if peak > 0 else 0.0
            if norm > MAX_MAGNITUDE:
                raise InputError(
                    source, f"{name} with values up to {peak:.3g} (norm {norm:.3g})",
                    "the sheaf Laplacian squares the weights, which overflows "
                    f"float64; scale them down (to a norm below {MAX_MAGNITUDE:g})")


def load_model(path: str, arg: str = "--model") -> MLP:
    data = read_npz(path, arg)
    output = "identity"
    if "output" in data:
        output = str(data["output"])
    # str.isdigit also takes digits such as "²", which int() refuses
    odd = sorted(k for k in data if k[:1] in "Wb" and k[1:].isdigit()
                 and not k[1:].isascii())
    if odd:
        raise InputError(arg, f"{path} with the key {odd[0]!r}", "name the "
                         "layers W1..WK and b1..bK with the ASCII digits 0-9")
    layers = sorted(int(k[1:]) for k in data if k[:1] in "Wb" and k[1:].isdigit())
    K = max(layers, default=0)
    if K == 0:
        raise InputError(arg, f"{path} with keys {sorted(data)}", "it needs W1..WK "
                         "and b1..bK")
    W, b = [], []
    for layer in range(1, K + 1):
        for key in (f"W{layer}", f"b{layer}"):
            if key not in data:
                raise InputError(arg, f"{path} without {key} (it has layers up to "
                                 f"{K})", f"add {key}")
        # strings and complex numbers are refused, not parsed or cut to real
        w_l = real_array(data[f"W{layer}"], arg, f"W{layer}", f" in {path}")
        b_l = real_array(data[f"b{layer}"], arg, f"b{layer}", f" in {path}")
        if b_l.ndim == 1:
            b_l = b_l.reshape(-1, 1)
        W.append(w_l)
        b.append(b_l)
    model = MLP(W, b, output)
    check_model(model, f"{arg} {path}")
    return model


def save_model(model: MLP, path: str) -> None:
    atomic_savez(path, {**model.params(), "output": np.array(model.output)})


# ---------------------------------------------------------------- PyTorch

TORCH_LAYERS = ("Linear", "ReLU", "Sigmoid", "Softmax")


def from_torch(seq, source: str = "--torch") -> MLP:
    """An :class:`MLP` from a PyTorch ``nn.Sequential`` of ``Linear`` and ``ReLU``
    layers, maybe ending in ``Sigmoid`` or ``Softmax``.

    The layers must alternate ``Linear, ReLU, Linear, ..., Linear``, optionally
    ending in ``Sigmoid`` or ``Softmax(dim=-1 or 1)`` (the output nonlinearity).
    ``Linear.weight`` is ``(out, in)``, which is ``W_l`` as it is; a missing bias
    becomes zeros. Values are copied to float64. Torch itself is not imported:
    the layers are recognised by their class names.
    """
    layers = list(seq.children()) if hasattr(seq, "children") else list(seq)
    names = [type(m).__name__ for m in layers]
    output = "identity"
    if names and names[-1] in ("Sigmoid", "Softmax"):
        if names[-1] == "Softmax" and getattr(layers[-1], "dim", None) not in (-1, 1):
            raise InputError(source, f"Softmax(dim={layers[-1].dim})", "the softmax "
                             "must run over the features: Softmax(dim=-1)")
        output = names[-1].lower()
        layers, names = layers[:-1], names[:-1]
    expected = ["ReLU" if i % 2 else "Linear" for i in range(len(names))]
    if not names or names != expected or names[-1] != "Linear":
        shown = ", ".join(type(m).__name__ for m in
                          (list(seq.children()) if hasattr(seq, "children") else seq))
        raise InputError(source, f"nn.Sequential({shown})", "give Linear layers "
                         "with a ReLU between each pair, optionally ending in "
                         "Sigmoid or Softmax(dim=-1)")
    W, b = [], []
    for m in layers[::2]:
        w = m.weight.detach().cpu().double().numpy().copy()
        W.append(w)
        if m.bias is None:
            b.append(np.zeros((w.shape[0], 1)))
        else:
            b.append(m.bias.detach().cpu().double().numpy().reshape(-1, 1).copy())
    model = MLP(W, b, output)
    check_model(model, source)
    return model


def load_torch(path: str, arg: str = "--torch") -> MLP:
    """Read a ``torch.save``-d ``nn.Sequential`` with ``weights_only=True``.

    Only the classes of :func:`from_torch` are allowed through the unpickler, so
    loading a file cannot run code. Torch is an optional extra (``sheafdist[torch]``).
    """
    try:
        import torch
    except ImportError:
        raise InputError(arg, path, "reading a PyTorch file needs torch: pip "
                         "install 'sheafdist[torch]' (or give an .npz with --model)"
                         ) from None
    from torch import nn

    allowed = [nn.Sequential, nn.Linear, nn.ReLU, nn.Sigmoid, nn.Softmax]
    try:
        with torch.serialization.safe_globals(allowed):
            seq = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(arg, path, "no such file; check the path") from None
    except Exception as exc:  # unpickling refused, or not a torch file
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        reason = (f"it holds {refused[1]}, which is not allowed" if refused
                  else f"unreadable by torch.load: {type(exc).__name__}: "
                  + " ".join(str(exc).split())[:160])
        raise InputError(arg, f"{path} ({reason})", "save an nn.Sequential of "
                         "Linear layers with a ReLU between each pair, optionally "
                         "ending in Sigmoid or Softmax(dim=-1), with "
                         "torch.save(model, path)") from None
    if not isinstance(seq, nn.Sequential):
        raise InputError(arg, f"{path} holding a {type(seq).__name__}", "save the "
                         "nn.Sequential itself with torch.save(model, path)")
    return from_torch(seq, arg)
