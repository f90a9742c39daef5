"""The baseline: full-batch gradient descent with backpropagation.

This is what the sheaf is compared against (paper.md section 7.3), so it is the one
place in the package where a backward pass is allowed. It reproduces the authors'
``TraditionalNN``: plain gradient descent, no momentum, the whole training set in
every step, and the gradient of the same mean losses as :func:`sheafdist.model.loss`:

- identity output: MSE, the mean over all ``N = n_out * batch`` elements, so
  ``dL/dz_K = 2 (yhat - y) / N``;
- sigmoid output: binary cross-entropy, the mean over all elements, so
  ``dL/dz_K = (p - y) / N``;
- softmax output: cross-entropy summed over classes and averaged over the batch,
  so ``dL/dz_K = (p - y) / batch``.

The ReLU derivative at exactly ``z = 0`` is 0, as in ``torch.relu`` (the sheaf's
masks count ``z = 0`` as active; for generic data the two never meet).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .model import MLP, loss, phi

# called at every logged step with the step count, the current weights and the
# losses just logged (test loss NaN without test data)
SGDCallback = Callable[[int, MLP, float, float], None]


def gradients(
    model: MLP, x: np.ndarray, y: np.ndarray
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``dL/dW_l`` and ``dL/db_l`` for the model's mean loss over ``(x, y)``."""
    # forward, keeping what the backward pass needs
    acts, pres = [x], []
    for layer, (w, b) in enumerate(zip(model.W, model.b, strict=True), start=1):
        z = w @ acts[-1] + b
        pres.append(z)
        if layer < model.depth:
            acts.append(np.maximum(z, 0.0))

    # the output error dL/dz_K
    z_out = pres[-1]
    if model.output == "identity":
        g = 2.0 * (z_out - y) / y.size
    elif model.output == "sigmoid":
        g = (phi("sigmoid", z_out) - y) / y.size
    else:
        g = (phi("softmax", z_out) - y) / y.shape[1]

    # backward, layer by layer: this is the chain rule the sheaf does without
    dW, db = [None] * model.depth, [None] * model.depth
    for layer in range(model.depth, 0, -1):
        dW[layer - 1] = g @ acts[layer - 1].T
        db[layer - 1] = g.sum(axis=1, keepdims=True)
        if layer > 1:
            g = (model.W[layer - 1].T @ g) * (pres[layer - 2] > 0)
    return dW, db


def sgd_train(
    model: MLP,
    X: np.ndarray,
    Y: np.ndarray,
    lr: float,
    steps: int,
    log_every: int,
    X_test: np.ndarray | None = None,
    Y_test: np.ndarray | None = None,
    callback: SGDCallback | None = None,
    start_step: int = 0,
    history: dict[str, list] | None = None,
) -> tuple[MLP, dict[str, list]]:
    """Take ``steps`` full-batch steps ``theta -= lr * grad L(theta)`` from a copy
    of ``model``.

    Losses are logged at step 0, every ``log_every`` steps and after the last step.
    Returns the trained copy and the history ``{"step", "train_loss", "test_loss"}``
    (lists; the test loss is NaN without test data).

    To resume, pass the weights reached at ``start_step`` as ``model`` and the
    history so far: the run then takes steps ``start_step+1 .. steps`` and appends
    to ``history`` (the same dict), giving what an unbroken run gives.
    """
    if steps < 0 or log_every < 1:
        raise ValueError(
            f"need steps >= 0 and log_every >= 1, got {steps} and {log_every}"
        )
    if not 0 <= start_step <= steps:
        raise ValueError(f"need 0 <= start_step <= steps, got {start_step}")
    model = model.copy()
    if history is None:
        history = {"step": [], "train_loss": [], "test_loss": []}

    def log(step: int) -> None:
        train = loss(model, X, Y)
        test = loss(model, X_test, Y_test) if X_test is not None else float("nan")
        history["step"].append(step)
        history["train_loss"].append(train)
        history["test_loss"].append(test)
        if callback is not None:
            callback(step, model, train, test)

    if start_step == 0 and not history["step"]:  # resumed at 0: logged already
        log(0)
    with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported
        for step in range(start_step + 1, steps + 1):
            dW, db = gradients(model, X, Y)
            for layer in range(model.depth):
                model.W[layer] = model.W[layer] - lr * dW[layer]
                model.b[layer] = model.b[layer] - lr * db[layer]
            if not all(np.all(np.isfinite(w)) for w in model.W):
                log(step)  # diverged: the loss it logs is not finite; stop here
                break
            if step % log_every == 0 or step == steps:
                log(step)
    return model, history
