"""Training utilities shared by every neural method.

One training loop (:func:`fit_module`) with early stopping on a validation
loss and an optional learning-rate schedule (:func:`scheduled_lr`), seeding,
mini-batching and (de)serialisation of module weights to the plain arrays
that :meth:`he2st.methods.Method.get_state` returns.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from he2st._utils import is_quiet
from he2st.errors import He2stInputError

#: How an encoder-based method treats its image encoder: features from the cache with only
#: the heads trained (``"frozen"``, the CPU default) or trained end to end (``"finetune"``).
MODES = ("frozen", "finetune")

#: How :func:`inner_split` holds out validation rows.
VAL_SPLITS = ("auto", "slide", "spot", "spot_per_slide")

#: Learning-rate schedules of :func:`fit_module` (see :func:`scheduled_lr`).
SCHEDULERS = ("none", "cosine", "step")


def set_seed(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def inner_split(
    slide_index: np.ndarray, n_slides: int, how: str, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation row indices of an inner validation split.

    Parameters
    ----------
    slide_index
        Slide number (0..n_slides-1) of each training row.
    n_slides
        Number of training slides.
    how
        ``"slide"``, ``"spot"``, ``"auto"`` (slide with >= 3 slides, else spot)
        or ``"spot_per_slide"`` (``fraction`` of the spots of EVERY slide, as
        CMRCNet's per-slide 80/20 split).
    fraction
        Share held out; 0 gives no validation rows.
    seed
        Seed of the random choice.

    Returns
    -------
    tuple of numpy.ndarray
        Training rows and validation rows (int64, ascending).
    """
    n = len(slide_index)
    if fraction <= 0:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    if how == "auto":
        how = "slide" if n_slides >= 3 else "spot"
    val = np.zeros(n, dtype=bool)
    if how == "slide":
        if n_slides < 2:
            raise He2stInputError("val_split='slide' needs at least 2 training slides; use 'spot' or pass val_slides")
        k = min(n_slides - 1, max(1, int(round(fraction * n_slides))))
        val = np.isin(slide_index, rng.choice(n_slides, size=k, replace=False))
    elif how == "spot_per_slide":
        for s in range(n_slides):
            rows = np.flatnonzero(slide_index == s)
            # A slide keeps at least one training spot.
            k = min(len(rows) - 1, int(round(fraction * len(rows))))
            if k > 0:
                val[rng.choice(rows, size=k, replace=False)] = True
    else:
        k = min(n - 1, max(1, int(round(fraction * n))))
        val[rng.choice(n, size=k, replace=False)] = True
    return np.flatnonzero(~val), np.flatnonzero(val)


def default_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def minibatches(n: int, batch_size: int, generator: torch.Generator | None = None, shuffle: bool = True) -> Iterator[torch.Tensor]:
    """Yield index tensors covering ``range(n)`` in batches (shuffled with ``generator``).

    Parameters
    ----------
    n
        Number of rows.
    batch_size
        Rows per batch (the last batch may be smaller).
    generator
        Torch generator of the shuffle (None: the global one).
    shuffle
        Shuffle the rows; False gives them in order.

    Returns
    -------
    Iterator[torch.Tensor]
        int64 row indices of each batch.
    """
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


@dataclass
class History:
    """Losses per epoch and the epoch whose weights were kept.

    Parameters
    ----------
    train, val
        Mean training and validation loss of every epoch.
    best_epoch
        Epoch whose weights were kept (-1 before training).
    lr
        Learning rate the optimiser used in every epoch.
    """

    train: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    best_epoch: int = -1
    lr: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"train": self.train, "val": self.val, "best_epoch": self.best_epoch, "lr": self.lr}


def scheduled_lr(epoch: int, epochs: int, lr: float, scheduler: str = "none", lr_min: float = 0.0,
                 step_size: int = 30, gamma: float = 0.1) -> float:
    """Learning rate of ``epoch`` (0-based) under a schedule.

    ``"none"``: ``lr`` throughout. ``"cosine"``: cosine annealing from ``lr``
    to ``lr_min``, ``lr_min + (lr - lr_min) (1 + cos(pi (epoch + 1) / epochs)) / 2``:
    the scheduler is stepped once BEFORE each epoch, as CMRCNet's training
    loop does (``train.py``: ``scheduler.step(epoch)`` opens the epoch), so the
    last epoch trains at ``lr_min``. ``"step"``: ``lr * gamma ** (epoch // step_size)``.

    Parameters
    ----------
    epoch
        Epoch number, from 0.
    epochs
        Number of epochs of the run (the cosine period).
    lr
        Base (initial) learning rate.
    scheduler
        ``"none"``, ``"cosine"`` or ``"step"``.
    lr_min
        Floor of the cosine schedule.
    step_size, gamma
        Epochs between decays and decay factor of the step schedule.

    Returns
    -------
    float
        The learning rate.
    """
    if scheduler == "none":
        return float(lr)
    if scheduler == "cosine":
        t = min(epoch + 1, epochs) / max(epochs, 1)
        return float(lr_min + (lr - lr_min) * (1.0 + math.cos(math.pi * t)) / 2.0)
    if scheduler == "step":
        return float(lr * gamma ** (epoch // max(int(step_size), 1)))
    raise ValueError(f"unknown scheduler {scheduler!r}; use one of {SCHEDULERS}")


def make_optimizer(params: Iterable[nn.Parameter], name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9) -> torch.optim.Optimizer:
    """Optimiser by name: ``adamw``, ``adam`` or ``sgd`` (with momentum).

    Parameters
    ----------
    params
        Parameters to optimise.
    name
        ``"adamw"``, ``"adam"`` or ``"sgd"``.
    lr, weight_decay, momentum
        Learning rate, weight decay and SGD momentum.

    Returns
    -------
    torch.optim.Optimizer
        The optimiser.
    """
    params = [p for p in params if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use adamw, adam or sgd")


def fit_module(
    model: nn.Module,
    loss_fn: Callable[[Any], torch.Tensor],
    train_batches: Callable[[int], Iterable[Any]],
    *,
    epochs: int,
    lr: float,
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    val_batches: Callable[[], Iterable[Any]] | None = None,
    val_loss_fn: Callable[[Any], torch.Tensor] | None = None,
    patience: int | None = None,
    grad_clip: float | None = None,
    scheduler: str = "none",
    lr_min: float = 0.0,
    lr_step: int = 30,
    lr_gamma: float = 0.1,
    description: str = "training",
) -> History:
    """Train ``model`` by minimising ``loss_fn`` over ``train_batches(epoch)``.

    With ``val_batches`` the validation loss is computed after each epoch and the
    weights of the best epoch are restored at the end (early stopping after
    ``patience`` epochs without improvement, when given). Without validation
    the final weights are kept.

    Parameters
    ----------
    model
        The module to train (in place).
    loss_fn
        Training loss of one batch.
    train_batches
        ``train_batches(epoch)`` yields the batches of an epoch.
    epochs, lr, optimizer, weight_decay, momentum
        Epochs and optimiser settings (see :func:`make_optimizer`).
    val_batches, val_loss_fn
        Validation batches and their loss (default ``loss_fn``).
    patience
        Early stopping after this many epochs without improvement (None: never).
    grad_clip
        Maximum gradient norm (None: no clipping).
    scheduler, lr_min, lr_step, lr_gamma
        Learning-rate schedule over ``epochs`` (:func:`scheduled_lr`); the
        rate of each epoch is set on the optimiser before it and recorded in
        :attr:`History.lr`. Early stopping does not shorten the schedule.
    description
        Label of the progress bar.

    Returns
    -------
    History
        Losses per epoch and the kept epoch.
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; use one of {SCHEDULERS}")
    opt = make_optimizer(model.parameters(), optimizer, lr, weight_decay, momentum)
    history = History()
    best_state: dict[str, torch.Tensor] | None = None
    best_val = float("inf")
    stale = 0
    val_loss_fn = val_loss_fn or loss_fn
    for epoch in _epoch_iter(epochs, description):
        epoch_lr = scheduled_lr(epoch, epochs, lr, scheduler, lr_min, lr_step, lr_gamma)
        for group in opt.param_groups:
            group["lr"] = epoch_lr
        history.lr.append(float(opt.param_groups[0]["lr"]))
        model.train()
        total, count = 0.0, 0
        for batch in train_batches(epoch):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{description}: loss became {loss.item()} at epoch {epoch}")
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            total += float(loss.detach())
            count += 1
        history.train.append(total / max(count, 1))
        if val_batches is None:
            history.best_epoch = epoch
            continue
        val = evaluate_loss(model, val_loss_fn, val_batches())
        history.val.append(val)
        if val < best_val:
            best_val, stale, history.best_epoch = val, 0, epoch
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if patience is not None and stale >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history


def schedule_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """The learning-rate schedule arguments of :func:`fit_module` from method parameters.

    Parameters
    ----------
    params
        Method parameters with ``scheduler``, ``lr_min``, ``lr_step`` and ``lr_gamma``.

    Returns
    -------
    dict
        Keyword arguments ``scheduler``, ``lr_min``, ``lr_step``, ``lr_gamma``.
    """
    return {"scheduler": str(params["scheduler"]), "lr_min": float(params["lr_min"]),
            "lr_step": int(params["lr_step"]), "lr_gamma": float(params["lr_gamma"])}


@torch.no_grad()
def evaluate_loss(model: nn.Module, loss_fn: Callable[[Any], torch.Tensor], batches: Iterable[Any]) -> float:
    """Mean loss over ``batches`` in eval mode.

    Parameters
    ----------
    model
        The module (put in eval mode).
    loss_fn
        Loss of one batch.
    batches
        The batches.

    Returns
    -------
    float
        Mean of the batch losses.
    """
    model.eval()
    vals = [float(loss_fn(b)) for b in batches]
    return float(np.mean(vals)) if vals else float("nan")


def _epoch_iter(epochs: int, description: str) -> Iterable[int]:
    if is_quiet():
        return range(epochs)
    from he2st._utils import progress

    return progress(range(epochs), description=description, total=epochs)


def module_state(module: nn.Module, prefix: str = "model.") -> dict[str, np.ndarray]:
    """A module's state dict as float32/int numpy arrays with ``prefix`` on every key.

    Parameters
    ----------
    module
        The module.
    prefix
        Prefix of every key.

    Returns
    -------
    dict[str, numpy.ndarray]
        Arrays for :meth:`he2st.methods.Method.get_state`.
    """
    out = {}
    for k, v in module.state_dict().items():
        t = v.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        out[prefix + k] = t.numpy().copy()
    return out


def load_module_state(module: nn.Module, state: dict[str, np.ndarray], prefix: str = "model.") -> None:
    """Load arrays saved by :func:`module_state` (strict: every key must match).

    Parameters
    ----------
    module
        The module to load into.
    state
        Saved arrays (other prefixes are ignored).
    prefix
        The prefix they were saved with.
    """
    sub = {k[len(prefix) :]: torch.from_numpy(np.asarray(v)) for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = module.load_state_dict(sub, strict=False)
    if missing or unexpected:
        raise ValueError(f"saved state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


@torch.no_grad()
def predict_batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    """Apply ``fn`` to ``x`` in batches without gradients.

    Parameters
    ----------
    fn
        Function of a batch.
    x
        Inputs, batched along the first axis.
    batch_size
        Rows per call.

    Returns
    -------
    numpy.ndarray
        float32 outputs, concatenated.
    """
    outs = [fn(x[i : i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(outs).numpy().astype(np.float32)
