r"""Learned proposals of a guided particle filter, trained by maximising the SMC bound.

A state-space model \(x_0 \sim p(x_0)\), \(x_t \sim p(x_t \mid x_{t-1})\),
\(y_t \sim p(y_t \mid x_t)\) is filtered with a parametrised proposal
\(q_\phi(x_t \mid x_{t-1}, y_t)\) (the guided filter of :mod:`ppl.state_space`), whose potentials

\[
G_t(x_{t-1}, x_t) = \frac{p(y_t \mid x_t)\, p(x_t \mid x_{t-1})}{q_\phi(x_t \mid x_{t-1}, y_t)}
\]

keep \(\hat Z\) unbiased for \(Z = p(y_{0:T-1})\) whatever \(\phi\). The proposal is fitted by
maximising the SMC bound \(\mathcal{L}_N(\phi) = \mathbb{E}[\log \hat Z_N(\phi)] \le \log Z\)
(:class:`~samplers.variational.objectives.SMCBound`, :func:`~samplers.variational.optimise.fit`)
with reparameterised draws \(x_t = \mu_\phi + L_\phi \varepsilon\) and the resampling indices under
stop-gradient — variational SMC (Naesseth, Linderman, Ranganath & Blei 2018), auto-encoding SMC
(Le, Igl, Rainforth, Jin & Wood 2018), filtering variational objectives (Maddison, Lawson, Tucker,
Heess, Norouzi, Mnih, Doucet & Teh 2017). Dropping the score term of the resampling indices biases
the gradient slightly; all three papers do so, and it is what makes the gradient usable.

Proposals (strategies, small ``equinox`` modules called as ``q(t, x_prev, y) -> Distribution``,
``x_prev`` ``None`` at \(t = 0\) and batched over a leading particle axis or not):

- :class:`LinearGaussianProposal`: \(q = \mathcal{N}(A x_{t-1} + B y_t + c,\ L L^\top)\), \(L\)
  diagonal or a Cholesky factor. Its parameters have a leading axis of \(R\) rows: row
  \(\min(t, R-1)\) serves step \(t\), so \(R = 2\) is one law for \(t = 0\) (no \(x_{-1}\); the
  \(A\) term is dropped) and one shared by every \(t \ge 1\), and \(R = T\) is one per step. Two
  exact members for the linear-Gaussian model \(x_t = A x_{t-1} + \mathcal{N}(0, Q)\),
  \(y_t = H x_t + \mathcal{N}(0, R)\):

  * :meth:`LinearGaussianProposal.locally_optimal`: \(p(x_t \mid x_{t-1}, y_t) =
    \mathcal{N}(\Sigma (Q^{-1} A x_{t-1} + H^\top R^{-1} y_t),\ \Sigma)\),
    \(\Sigma = (Q^{-1} + H^\top R^{-1} H)^{-1}\) (Doucet, Godsill & Andrieu 2000), whose weight
    \(G_t = p(y_t \mid x_{t-1})\) no longer depends on \(x_t\) but still on \(x_{t-1}\): the
    best a one-step proposal can do, with a variance of \(\log \hat Z\) that is small but not zero;
  * :meth:`LinearGaussianProposal.smoothing`: \(p(x_t \mid x_{t-1}, y_{t:T-1})\) (a backward
    information filter), per step. Along a path the weights telescope to
    \(\prod_t G_t = p(y_{0:T-1})\), so without resampling every path has weight \(Z\) and
    \(\log \hat Z = \log Z\) for every draw (zero variance); with resampling every step the
    per-step weights \(p(y_{t:} \mid x_{t-1}) / p(y_{t+1:} \mid x_t)\) still vary between particles.

- :class:`MLPProposal`: \(q = \mathcal{N}(\mu_\phi, \mathrm{diag}\, \sigma_\phi^2)\) with
  \((\mu_\phi, \log \sigma_\phi) = \mathrm{MLP}_\phi(x_{t-1}, y_t, \mathbf{1}[t = 0])\) (an
  ``eqx.nn.MLP``; \(x_{-1} := 0\)).

:class:`GuidedTarget` turns a :class:`~ppl.state_space.StateSpaceModel` and observations into the
target of :func:`~samplers.variational.objectives.bound` / :func:`~samplers.variational.optimise.fit`:
a callable ``proposal -> GuidedFilter`` (the model's own parameters θ stay fixed; the proposal
module is the trainable ``params``).

The linear-Gaussian constructors read the fields ``m0, P0, A, Q, H, R`` of any parameter object
(e.g. :class:`models.linear_gaussian.LGSSMParams`); this module does not import ``models``.
"""

from __future__ import annotations

import abc
import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ppl import checks
from ppl.state_space import GuidedFilter, StateSpaceModel

__all__ = [
    "AbstractProposal",
    "LinearGaussianProposal",
    "MLPProposal",
    "GuidedTarget",
    "guided_target",
]


class AbstractProposal(eqx.Module):
    r"""A proposal \(q_\phi(x_t \mid x_{t-1}, y_t)\): ``q(t, x_prev, y) -> Distribution`` of event
    shape ``[d]``; ``x_prev`` is ``None`` at \(t = 0\), one state ``[d]`` or a batch ``[N, d]``
    (then the law has batch shape ``(N,)``). Its inexact array leaves are the trainable \(\phi\)."""

    @abc.abstractmethod
    def __call__(self, t: Int[Array, ""], x_prev: Array | None, y: Array) -> dist.Distribution:
        """The law of \\(x_t\\) given \\(x_{t-1}\\) (``None`` at \\(t = 0\\)) and \\(y_t\\)."""


# ------------------------------------------------------------------------------------------------
# linear-Gaussian proposals
# ------------------------------------------------------------------------------------------------


def _rows(x, t):
    return x[jnp.minimum(t, x.shape[0] - 1)]


class LinearGaussianProposal(AbstractProposal):
    r"""\(q = \mathcal{N}(A_r x_{t-1} + B_r y_t + c_r,\ L_r L_r^\top)\), \(r = \min(t, R-1)\).

    Attributes:
        A: ``[R, d, d]`` (row 0 unused: \(t = 0\) has no previous state).
        B: ``[R, d, k]``.
        c: ``[R, d]``.
        log_diag: ``[R, d]``, \(\log\) of the diagonal of \(L\).
        tril: ``[R, d, d]`` whose strictly lower triangle is that of \(L\) (a Cholesky factor), or
            ``None`` for a diagonal \(L\).
    """

    A: Float[Array, "R d d"]
    B: Float[Array, "R d k"]
    c: Float[Array, "R d"]
    log_diag: Float[Array, "R d"]
    tril: Float[Array, "R d d"] | None = None

    def __check_init__(self):
        r, d = jnp.shape(self.c)
        k = jnp.shape(self.B)[-1]
        want = {"A": (r, d, d), "B": (r, d, k), "log_diag": (r, d)}
        if self.tril is not None:
            want["tril"] = (r, d, d)
        for name, shape in want.items():
            if tuple(jnp.shape(getattr(self, name))) != shape:
                raise ValueError(
                    f"LinearGaussianProposal.{name} must have shape {shape} (from c: [R={r}, "
                    f"d={d}], B: [..., k={k}]), got {tuple(jnp.shape(getattr(self, name)))}"
                )

    @classmethod
    def init(cls, state_dim: int, obs_dim: int, *, num_rows: int = 2, scale: float = 1.0,
             cholesky: bool = False) -> "LinearGaussianProposal":
        r"""Zero mean, \(L = \text{scale} \cdot I\): a starting point that knows nothing."""
        d = checks.positive_int("state_dim", state_dim)
        k = checks.positive_int("obs_dim", obs_dim)
        r = checks.positive_int("num_rows", num_rows)
        if not (isinstance(scale, (int, float)) and scale > 0):
            raise ValueError(f"scale must be a positive number, got {scale!r}")
        return cls(
            A=jnp.zeros((r, d, d)), B=jnp.zeros((r, d, k)), c=jnp.zeros((r, d)),
            log_diag=jnp.full((r, d), float(np.log(scale)), jnp.float32),
            tril=jnp.zeros((r, d, d)) if cholesky else None,
        )

    @classmethod
    def from_gaussian(cls, A, B, c, cov) -> "LinearGaussianProposal":
        r"""The proposal with the given ``[R, ...]`` coefficients and covariances ``[R, d, d]``
        (stored as their Cholesky factors)."""
        cov = np.asarray(cov, np.float64)
        chol = np.linalg.cholesky(0.5 * (cov + np.swapaxes(cov, -1, -2)))
        diag = np.diagonal(chol, axis1=-2, axis2=-1)
        f32 = lambda x: jnp.asarray(np.asarray(x, np.float64), jnp.float32)  # noqa: E731
        return cls(A=f32(A), B=f32(B), c=f32(c), log_diag=f32(np.log(diag)),
                   tril=f32(np.tril(chol, -1)))

    @classmethod
    def locally_optimal(cls, params: Any) -> "LinearGaussianProposal":
        r"""\(p(x_t \mid x_{t-1}, y_t)\) of a linear-Gaussian model (``params`` with fields
        ``m0, P0, A, Q, H, R``); two rows: \(p(x_0 \mid y_0)\) and the step law."""
        m0, P0, A, Q, H, R = (np.asarray(getattr(params, f), np.float64)
                              for f in ("m0", "P0", "A", "Q", "H", "R"))
        d, k = A.shape[0], H.shape[0]
        ht_ri = H.T @ np.linalg.inv(R)
        s0 = np.linalg.inv(np.linalg.inv(P0) + ht_ri @ H)
        s1 = np.linalg.inv(np.linalg.inv(Q) + ht_ri @ H)
        a = np.stack([np.zeros((d, d)), s1 @ np.linalg.solve(Q, A)])
        b = np.stack([s0 @ ht_ri, s1 @ ht_ri])
        c = np.stack([s0 @ np.linalg.solve(P0, m0), np.zeros(d)])
        del k
        return cls.from_gaussian(a, b, c, np.stack([s0, s1]))

    @classmethod
    def smoothing(cls, params: Any, observations: Float[Array, "T k"]) -> "LinearGaussianProposal":
        r"""\(p(x_t \mid x_{t-1}, y_{t:T-1})\) of a linear-Gaussian model, one row per step (the
        observations are folded into \(c_t\); \(B = 0\)). Backward information filter: with
        \(p(y_{t+1:} \mid x_t) \propto \exp(-\tfrac12 x^\top J_t x + h_t^\top x)\),
        \(\tilde J_t = J_t + H^\top R^{-1} H\), \(\tilde h_t = h_t + H^\top R^{-1} y_t\),
        \(\Sigma_t = (Q^{-1} + \tilde J_t)^{-1}\) (\(P_0\) for \(Q\) at \(t = 0\)),
        \(J_{t-1} = A^\top (Q^{-1} - Q^{-1} \Sigma_t Q^{-1}) A\),
        \(h_{t-1} = A^\top Q^{-1} \Sigma_t \tilde h_t\); the proposal is
        \(\mathcal{N}(\Sigma_t (Q^{-1} A x_{t-1} + \tilde h_t), \Sigma_t)\)."""
        m0, P0, A, Q, H, R = (np.asarray(getattr(params, f), np.float64)
                              for f in ("m0", "P0", "A", "Q", "H", "R"))
        ys = np.asarray(observations, np.float64)
        if ys.ndim != 2 or ys.shape[1] != H.shape[0]:
            raise ValueError(f"observations must have shape [T, {H.shape[0]}], got {ys.shape}")
        T, d, k = ys.shape[0], A.shape[0], H.shape[0]
        qi, ht_ri = np.linalg.inv(Q), H.T @ np.linalg.inv(R)
        J, h = np.zeros((d, d)), np.zeros(d)
        a, c, cov = np.zeros((T, d, d)), np.zeros((T, d)), np.zeros((T, d, d))
        for t in range(T - 1, -1, -1):
            jt, ht = J + ht_ri @ H, h + ht_ri @ ys[t]
            if t == 0:
                p0i = np.linalg.inv(P0)
                cov[0] = np.linalg.inv(p0i + jt)
                c[0] = cov[0] @ (p0i @ m0 + ht)
            else:
                cov[t] = np.linalg.inv(qi + jt)
                a[t] = cov[t] @ qi @ A
                c[t] = cov[t] @ ht
                J = A.T @ (qi - qi @ cov[t] @ qi) @ A
                h = A.T @ qi @ cov[t] @ ht
        return cls.from_gaussian(a, np.zeros((T, d, k)), c, cov)

    def scale_tril(self, t: Int[Array, ""]) -> Float[Array, "d d"]:
        r"""\(L_r\), \(r = \min(t, R - 1)\)."""
        lower = jnp.diag(jnp.exp(_rows(self.log_diag, t)))
        if self.tril is None:
            return lower
        return lower + jnp.tril(_rows(self.tril, t), -1)

    def mean(self, t, x_prev, y):
        loc = _rows(self.B, t) @ y + _rows(self.c, t)
        if x_prev is not None:
            loc = loc + jnp.where(t == 0, 0.0, 1.0) * (x_prev @ _rows(self.A, t).T)
        return loc

    def __call__(self, t, x_prev, y):
        loc = self.mean(t, x_prev, y)
        if self.tril is None:
            return dist.Normal(loc, jnp.exp(_rows(self.log_diag, t))).to_event(1)
        return dist.MultivariateNormal(loc, scale_tril=self.scale_tril(t))


# ------------------------------------------------------------------------------------------------
# MLP proposal
# ------------------------------------------------------------------------------------------------


class MLPProposal(AbstractProposal):
    r"""\(q = \mathcal{N}(\mu, \mathrm{diag}\,\sigma^2)\), \((\mu, \log\sigma - \log s_0) =
    \mathrm{MLP}(x_{t-1}, y_t, \mathbf{1}[t=0])\), \(x_{-1} := 0\), \(s_0\) = ``init_scale``."""

    mlp: eqx.nn.MLP
    log_scale0: float = eqx.field(static=True, default=0.0)

    @classmethod
    def init(cls, key: PRNGKeyArray, state_dim: int, obs_dim: int, *, width: int = 32,
             depth: int = 2, init_scale: float = 1.0) -> "MLPProposal":
        r"""A ``tanh`` MLP of ``depth`` hidden layers of ``width``; the last layer starts at zero,
        so the initial proposal is \(\mathcal{N}(0, \text{init\_scale}^2 I)\)."""
        checks.prng_key("key", key)
        d = checks.positive_int("state_dim", state_dim)
        k = checks.positive_int("obs_dim", obs_dim)
        mlp = eqx.nn.MLP(d + k + 1, 2 * d, checks.positive_int("width", width),
                         checks.positive_int("depth", depth), activation=jax.nn.tanh, key=key)
        last = mlp.layers[-1]
        mlp = eqx.tree_at(lambda m: (m.layers[-1].weight, m.layers[-1].bias), mlp,
                          (jnp.zeros_like(last.weight), jnp.zeros_like(last.bias)))
        return cls(mlp, float(np.log(init_scale)))

    def __call__(self, t, x_prev, y):
        d = self.mlp.out_size // 2
        first = jnp.asarray(t == 0, y.dtype)[None]
        if x_prev is None:
            x_prev = jnp.zeros((d,), y.dtype)
        def one(x):
            return self.mlp(jnp.concatenate([x * (1.0 - first), y, first]))

        out = one(x_prev) if x_prev.ndim == 1 else jax.vmap(one)(x_prev)
        loc, log_scale = out[..., :d], out[..., d:] + self.log_scale0
        return dist.Normal(loc, jnp.exp(log_scale)).to_event(1)


# ------------------------------------------------------------------------------------------------
# the target: proposal -> guided filter
# ------------------------------------------------------------------------------------------------


def _joint_initial(fn, params):
    return fn(params[0])


def _joint_step(fn, params, t, x):
    return fn(params[0], t, x)


def _joint_proposal(params, t, x_prev, y):
    return params[1](t, x_prev, y)


class GuidedTarget(eqx.Module):
    r"""``target(proposal) -> GuidedFilter``: the guided filter of ``ssm`` on ``observations``
    with \(q_\phi\) = ``proposal`` (an :class:`AbstractProposal`); the model's parameters θ are
    held fixed. Pass it as the ``target`` of :func:`~samplers.variational.objectives.bound` /
    :func:`~samplers.variational.optimise.fit` with the proposal as ``params``."""

    ssm: StateSpaceModel
    observations: PyTree

    def __call__(self, proposal: AbstractProposal) -> GuidedFilter:
        checks.instance("proposal", proposal, AbstractProposal)
        s = self.ssm
        joint = StateSpaceModel(
            functools.partial(_joint_initial, s.initial),
            functools.partial(_joint_step, s.transition),
            functools.partial(_joint_step, s.observation),
            (s.params, proposal),
            vectorized=s.vectorized,
        )
        return joint.guided(self.observations, _joint_proposal)


def guided_target(ssm: StateSpaceModel, observations: PyTree) -> GuidedTarget:
    """The :class:`GuidedTarget` of ``ssm`` on ``observations`` (leading time axis)."""
    checks.instance("ssm", ssm, StateSpaceModel)
    ssm.guided(observations, _joint_proposal)  # validates the observations (shapes, finiteness)
    return GuidedTarget(ssm, observations)
