"""STimage: ResNet-50 features, a negative-binomial head per gene and an ensemble for uncertainty (Tan et al. 2023)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from he2st.pp.normalize import CPM_SCALE, Normalizer
from he2st.data.slide import require_counts
from he2st.errors import He2stInputError
from he2st.methods.base import Capabilities
from he2st.methods.registry import register_method
from he2st.methods.nn.likelihoods import NBHead, nb_nll, nb_variance
from he2st.methods.families.spot import SPOT_DEFAULTS, SpotRegressor


def library_sizes(slide: Any) -> np.ndarray:
    """Total count of each spot over ALL genes of the slide (float64), as for CPM."""
    return np.asarray(slide.X.sum(axis=1), dtype=np.float64).ravel()


def exact_log1p_moments(
    mu: torch.Tensor, theta: torch.Tensor, k: float, max_count: int = 512, chunk: int = 8192
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of ``log1p(k X)`` for ``X ~ NB(mu, theta)``, elementwise.

    Sums the NB probabilities over ``x = 0 .. max_count`` where the NB puts
    (almost) all of its mass there (``mu + 10 sd <= max_count``); elsewhere the
    counts are large and the delta method (``f(mu)``, ``f'(mu)**2 Var X``) is
    accurate and used instead.

    Parameters
    ----------
    mu
        NB means (any shape).
    theta
        NB inverse dispersions, of the shape of ``mu``.
    k
        Scale inside the logarithm (``log1p(k X)``).
    max_count
        Largest count summed exactly.
    chunk
        Elements summed at once (bounds memory to ``chunk * (max_count + 1)``).

    Returns
    -------
    mean, var
        float64 arrays of the shape of ``mu``: mean and variance of
        ``log1p(k X)``.
    """
    from he2st.methods.nn.likelihoods import nb_log_prob

    mu, theta = mu.double(), theta.double()
    var_x = nb_variance(mu, theta)
    mean = torch.log1p(k * mu)
    var = (k / (1.0 + k * mu)) ** 2 * var_x
    small = (mu + 10.0 * var_x.sqrt()) <= max_count
    if small.any():
        m_s, t_s = mu[small], theta[small]
        xs = torch.arange(max_count + 1, dtype=torch.float64)
        f = torch.log1p(k * xs)
        e_out, v_out = torch.empty_like(m_s), torch.empty_like(m_s)
        for i in range(0, m_s.numel(), chunk):
            mm, tt = m_s[i : i + chunk, None], t_s[i : i + chunk, None]
            p = torch.exp(nb_log_prob(xs[None, :], mm, tt))
            p = p / p.sum(dim=1, keepdim=True)  # the mass beyond max_count is negligible here
            e = p @ f
            e_out[i : i + chunk] = e
            v_out[i : i + chunk] = (p @ f.pow(2) - e.pow(2)).clamp_min(0.0)
        mean[small], var[small] = e_out, v_out
    return mean.numpy(), var.numpy()


@register_method("stimage")
class STimage(SpotRegressor):
    """STimage: frozen ResNet-50, negative-binomial parameters per gene, an ensemble of runs.

    Tan X. et al., "STimage: robust, confident and interpretable models for
    predicting gene markers from cancer histopathological images", bioRxiv
    2023.05.14; settings from Jiang et al. 2024 (seed paper 002: "STimage",
    Table S1, Suppl. 7.1) and the authors' repository
    (``BiomedicalMachineLearning/STimage``: ``CNN_NB_multiple_genes``, ``example.ini``):

    - 299 x 299 px tiles, Vahadane stain normalisation (``stain="vahadane"``,
      fitted on patches of the TRAINING slides only), tiles with less than 70 %
      tissue dropped from training (``min_tissue=0.7``; at prediction they are
      still predicted and :meth:`flagged_spots` marks them);
    - ImageNet ResNet-50, frozen (the repository's default ``fine_tuning =
      False``; ``mode="finetune"`` trains it too), global average pooling;
    - distribution module: per gene, a linear layer giving the negative
      binomial mean and inverse dispersion (:class:`~he2st.methods.nn.likelihoods.NBHead`),
      trained by the NB negative log-likelihood of the COUNTS;
    - Adam, lr 1e-5, batch 64, up to 100 epochs, early stopping after 10
      epochs without improvement, best weights restored; validation = 30 % of
      the training slides (``valid_ratio = 0.3``; a random 30 % of spots with
      fewer than 3 training slides);
    - an ensemble of ``n_models=5`` independent runs (seeds ``seed..seed+4``):
      as the repository's ``development/ensemble_training.py`` (one job per
      member, ``tf.random.set_seed(job_id)``, line 20; the same 70/30 split,
      ``random_state=1``, line 58), members share the split and differ by
      their random head initialisation (``head_init="random"``: Keras'
      Glorot-uniform ``Dense(2)`` per gene) and data order;
      ``member_data="bootstrap"`` also resamples each member's training rows.

    Library size
        Spots differ in sequencing depth. The head predicts ``r[s, g]``, the
        mean count at a reference library size ``L_ref`` (the median total
        count of the training spots); during training the NB mean is
        ``mu = r * L_s / L_ref`` with ``L_s`` the spot's total count over all
        genes (an offset, as in GLMs). At prediction the test spot's depth is
        unknown (it is a measurement, not an image property), so the
        prediction is made at ``L_ref``.
    Prediction
        The repository fits the NB to the log-normalised values and reports
        the NB MEAN of that variable (``nbinom.mean(n, p)``,
        ``Figure_scripts/Figure2/benchmarking_her2st/stimage_her2st.py:143``),
        i.e. the expected value on the log scale. With the NB on counts, that
        is ``E[f(X)]``, ``X ~ NB(r, theta)``, ``f`` the normalisation
        (``cpm_log1p``: ``log1p(1e6 X / L_ref)``; ``log1p``: ``log1p(X)``;
        ``minmax``: the ``cpm_log1p`` value scaled with the normaliser's
        training min/max; ``raw``: ``r``), computed by ``moments="exact"``
        (the default) and averaged over the members. ``moments="delta"`` gives
        the plug-in ``f(r)`` (log of the NB mean), which is NOT what the
        repository reports and predicts much worse at low counts.
    Uncertainty (:meth:`predict_uncertainty`)
        Per spot and gene, a standard deviation on the same scale. Each member
        ``m`` gives the variance ``a_m`` of ``f(X)``, ``X ~ NB(r_m, theta_m)``
        at ``L_ref`` (exact with ``moments="exact"``; with ``"delta"``,
        ``f'(r)**2 (r + r**2 / theta)``, ``f'(r) = k / (1 + k r)``) and its
        mean ``e_m``. The total is the law of total variance over the
        ensemble: ``mean_m a_m + var_m e_m`` (aleatoric + spread of the
        members, which differ by their random head initialisation), and its
        square root is returned. The runner writes it to
        ``layers["uncertainty"]``.
    ``moments``
        ``"exact"`` (default): the mean and variance of ``f(X)`` for
        ``X ~ NB(r, theta)`` are computed by summing the NB probabilities
        (:func:`exact_log1p_moments`; delta method where counts are large).
        ``"delta"``: plug-in mean ``f(r)`` and delta-method variance. At low
        counts (many zeros) the delta method understates the spread badly;
        ``"exact"`` is then much better calibrated (see
        ``benchmarks/her2st_loocv.py``).

    Defaults
    --------
    normalization="cpm_log1p", seed=0, mode="frozen", encoder="resnet50",
    weights="imagenet", patch_px=299, input_px=None, tta=False,
    stain="vahadane", stain_fit_spots=64, min_tissue=0.7, augment="stimage",
    n_models=5, epochs=100, batch_size=64, lr=1e-5, optimizer="adam",
    weight_decay=0.0, momentum=0.9 (unused), patience=10, scheduler="none",
    val_split="auto", val_fraction=0.3, member_data="same", head_init="random",
    moments="exact", standardize=True, device="auto",
    patch_um=None, context=None (:func:`he2st.methods.base.parse_context`), feature_scaling="standard" (:mod:`he2st.methods.scaling`).

    Departures (see ``docs/fidelity.md#stimage``): the NB is fitted to
    counts with a library-size offset (the repository fits it to log1p
    values); the mean's bias starts at the log of the per-gene mean count at
    ``L_ref`` (Keras starts it at 0), the weights are random as in Keras
    (``head_init="mean"``: zero weights, every member starting at the
    per-gene mean, which leaves the members nearly identical).
    """

    paper: ClassVar[str] = "Tan et al. 2023 (STimage)"

    capabilities: ClassVar[Capabilities] = Capabilities(frozen_features=True, finetune=True, uncertainty=True)
    defaults: ClassVar[dict[str, Any]] = {
        **SPOT_DEFAULTS,
        "normalization": "cpm_log1p",
        "encoder": "resnet50",
        "weights": "imagenet",
        "patch_px": 299,
        "tta": False,
        "stain": "vahadane",
        "min_tissue": 0.7,
        "augment": "stimage",
        "n_models": 5,
        "epochs": 100,
        "batch_size": 64,
        "lr": 1e-5,
        "optimizer": "adam",
        "weight_decay": 0.0,
        "patience": 10,
        "val_split": "auto",
        "val_fraction": 0.3,
        "member_data": "same",
        "head_init": "random",
        "moments": "exact",
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if self.params["moments"] not in ("delta", "exact"):
            raise He2stInputError(f"stimage: moments must be 'delta' or 'exact', got {self.params['moments']!r}")
        if self.params["head_init"] not in ("random", "mean"):
            raise He2stInputError(f"stimage: head_init must be 'random' or 'mean', got {self.params['head_init']!r}")
        self.lib_ref_: float | None = None
        self._memo: tuple[Any, list[dict[str, np.ndarray]]] | None = None

    # -- data ---------------------------------------------------------------------
    def _prepare(self, train_slides: list[Any]) -> None:
        for s in train_slides:
            require_counts(s, "STimage's negative binomial likelihood")
        libs = np.concatenate([library_sizes(s) for s in train_slides])
        libs = libs[libs > 0]
        if libs.size == 0:
            raise He2stInputError("stimage: every training spot has a total count of zero")
        self.lib_ref_ = float(np.median(libs))

    def _targets(self, slide: Any) -> tuple[np.ndarray, ...]:
        counts = Normalizer("raw").transform(slide, self.genes)
        size_factor = (library_sizes(slide) / float(self.lib_ref_)).astype(np.float32)[:, None]
        return counts.astype(np.float32), size_factor

    def _keep(self, slide: Any) -> np.ndarray | None:
        thr = float(self.params["min_tissue"])
        if thr <= 0:
            return None
        return np.asarray(self._patches(slide).tissue_fraction, dtype=np.float32) >= thr

    # -- model --------------------------------------------------------------------
    def _make_head(self, in_dim: int) -> nn.Module:
        return NBHead(in_dim, len(self.genes or []))

    def _init_head(self, head: nn.Module, targets: tuple[np.ndarray, ...]) -> None:
        counts, sf = targets
        # Mean count at the reference library size: sum of counts over sum of size factors.
        rate = counts.sum(axis=0, dtype=np.float64) / max(float(sf.sum()), 1e-12)
        with torch.no_grad():
            if self.params["head_init"] == "random":
                # Keras' Glorot-uniform of the repository's per-gene Dense(2): fan_in + fan_out =
                # in_dim + 2. Drawn from the member's seed (set before the model is built), this
                # is what makes the members of the ensemble differ.
                bound = float(np.sqrt(6.0 / (head.mu.in_features + 2)))
                nn.init.uniform_(head.mu.weight, -bound, bound)
                nn.init.uniform_(head.theta.weight, -bound, bound)
            else:
                head.mu.weight.zero_()
                head.theta.weight.zero_()
            head.theta.bias.zero_()
            head.mu.bias.copy_(torch.from_numpy(np.log(np.maximum(rate, 1e-3))).float())

    def _loss(self, out: Any, targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
        mu, theta = out
        counts, sf = targets
        return nb_nll(counts, mu * sf, theta).mean()

    def _scale(self) -> tuple[str, float, np.ndarray, np.ndarray]:
        """How a mean count at ``L_ref`` maps to the normalised scale: ``a * f(k r) + b``.

        Returns ``(kind, k, a, b)`` with ``kind`` ``"log"`` (``f = log1p``) or ``"identity"``.
        """
        method = self.normalizer_.method
        g = len(self.genes or [])
        one, zero = np.ones(g), np.zeros(g)
        if method == "raw":
            return "identity", 1.0, one, zero
        if method == "log1p":
            return "log", 1.0, one, zero
        k = CPM_SCALE / float(self.lib_ref_)
        if method == "cpm_log1p":
            return "log", k, one, zero
        if method == "minmax":
            lo = self.normalizer_.inverse_transform(np.zeros((1, g)), self.genes)[0].astype(np.float64)
            span = self.normalizer_.inverse_transform(np.ones((1, g)), self.genes)[0].astype(np.float64) - lo
            return "log", k, 1.0 / span, -lo / span
        raise He2stInputError(f"stimage: normalization {method!r} is not supported")

    def _decode(self, out: Any) -> dict[str, np.ndarray]:
        mu, theta = (t.double().cpu() for t in out)
        kind, k, a, b = self._scale()
        if self.params["moments"] == "exact" and kind == "log":
            mean, var = exact_log1p_moments(mu, theta, k)
            return {"mean": a * mean + b, "var": a**2 * var}
        var_counts = nb_variance(mu, theta).numpy()
        r = mu.numpy()
        if kind == "identity":
            mean, deriv = r, np.ones_like(r)
        else:
            mean = np.log1p(k * r)
            deriv = k / (1.0 + k * r)
        return {"mean": a * mean + b, "var": (a * deriv) ** 2 * var_counts}

    # -- prediction -----------------------------------------------------------------
    def _member_outputs(self, slide: Any) -> list[dict[str, np.ndarray]]:
        # predict() and predict_uncertainty() on the same slide share one forward pass.
        if self._memo is not None and self._memo[0] is slide:
            return self._memo[1]
        outs = super()._member_outputs(slide)
        self._memo = (slide, outs)
        return outs

    def predict_uncertainty(self, slide: Any) -> np.ndarray:
        """Predictive standard deviation ``(n_spots, n_genes)`` on the normalised scale (see the class docs)."""
        outs = self._member_outputs(slide)
        means = np.stack([o["mean"] for o in outs])
        total = np.mean([o["var"] for o in outs], axis=0) + means.var(axis=0)
        return np.sqrt(total).astype(np.float32)

    def _fit(self, train_slides: list[Any], val_slides: list[Any] | None) -> None:
        self._memo = None
        super()._fit(train_slides, val_slides)

    # -- state -------------------------------------------------------------------------
    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {"lib_ref": np.array([self.lib_ref_], dtype=np.float64)}

    def _set_state_arrays(self, state: dict[str, np.ndarray]) -> None:
        self._memo = None
        self.lib_ref_ = float(np.asarray(state["lib_ref"])[0])
