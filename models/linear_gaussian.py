r"""Linear-Gaussian state-space model and its exact Kalman filter and RTS smoother.

\[
x_0 \sim \mathcal{N}(m_0, P_0), \qquad x_t = A x_{t-1} + \mathcal{N}(0, Q), \qquad
y_t = H x_t + \mathcal{N}(0, R).
\]

The Kalman filter gives the exact log-likelihood \(\log p(y_{0:T-1})\) and the filtering moments; the
Rauch-Tung-Striebel smoother the smoothing moments (Särkkä 2013, *Bayesian Filtering and
Smoothing*, ch. 4 and 8). These are the exact references for every particle method on this model.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jaxtyping import Array, Float

from ppl.state_space import StateSpaceModel

__all__ = ["LGSSMParams", "lgssm", "kalman_filter", "rts_smoother", "KalmanResult"]


class LGSSMParams(NamedTuple):
    """Parameters of a linear-Gaussian state-space model (state dim d, observation dim k)."""

    m0: Float[Array, " d"]
    P0: Float[Array, "d d"]
    A: Float[Array, "d d"]
    Q: Float[Array, "d d"]
    H: Float[Array, "k d"]
    R: Float[Array, "k k"]

    @classmethod
    def scalar(cls, rho=0.9, sigma_x=1.0, sigma_y=0.5, sigma_0=None) -> "LGSSMParams":
        r"""Univariate AR(1) plus noise: \(x_t = \rho x_{t-1} + \sigma_x \varepsilon\),
        \(y_t = x_t + \sigma_y \eta\)."""
        rho = jnp.asarray(rho, jnp.float32)
        sx = jnp.asarray(sigma_x, jnp.float32)
        s0 = sx / jnp.sqrt(1 - rho**2) if sigma_0 is None else jnp.asarray(sigma_0, jnp.float32)
        return cls(
            m0=jnp.zeros(1),
            P0=(s0**2).reshape(1, 1),
            A=rho.reshape(1, 1),
            Q=(sx**2).reshape(1, 1),
            H=jnp.ones((1, 1)),
            R=(jnp.asarray(sigma_y, jnp.float32) ** 2).reshape(1, 1),
        )


def _initial(p: LGSSMParams):
    return dist.MultivariateNormal(p.m0, covariance_matrix=p.P0)


def _transition(p: LGSSMParams, t, x):
    return dist.MultivariateNormal(p.A @ x, covariance_matrix=p.Q)


def _observation(p: LGSSMParams, t, x):
    return dist.MultivariateNormal(p.H @ x, covariance_matrix=p.R)


def lgssm(params: LGSSMParams) -> StateSpaceModel:
    """The linear-Gaussian model as a :class:`~ppl.state_space.StateSpaceModel`."""
    return StateSpaceModel(_initial, _transition, _observation, params)


class KalmanResult(NamedTuple):
    """Filtering means/covariances [T, d, (d)] and the exact log-likelihood."""

    means: Float[Array, "T d"]
    covariances: Float[Array, "T d d"]
    log_likelihood: Float[Array, ""]
    predicted_means: Float[Array, "T d"]
    predicted_covariances: Float[Array, "T d d"]


@eqx.filter_jit
def kalman_filter(params: LGSSMParams, ys: Float[Array, "T k"]) -> KalmanResult:
    r"""Exact filtering \(p(x_t \mid y_{0:t})\) and \(\log p(y_{0:T-1})\)."""
    ys = jnp.asarray(ys)
    if ys.ndim != 2 or ys.shape[1] != params.H.shape[0]:
        raise ValueError(
            f"observations must have shape [T, {params.H.shape[0]}], got {ys.shape}"
        )

    def update(m_pred, P_pred, y):
        S = params.H @ P_pred @ params.H.T + params.R
        K = jnp.linalg.solve(S, params.H @ P_pred).T
        resid = y - params.H @ m_pred
        m = m_pred + K @ resid
        P = P_pred - K @ S @ K.T
        ll = dist.MultivariateNormal(params.H @ m_pred, covariance_matrix=S).log_prob(y)
        return m, 0.5 * (P + P.T), ll

    def step(carry, y):
        m, P = carry
        m_pred = params.A @ m
        P_pred = params.A @ P @ params.A.T + params.Q
        m, P, ll = update(m_pred, P_pred, y)
        return (m, P), (m, P, ll, m_pred, P_pred)

    m0, P0, ll0 = update(params.m0, params.P0, ys[0])
    _, (ms, Ps, lls, mps, Pps) = jax.lax.scan(step, (m0, P0), ys[1:])
    cat = lambda a, b: jnp.concatenate([a[None], b])  # noqa: E731
    return KalmanResult(
        means=cat(m0, ms),
        covariances=cat(P0, Ps),
        log_likelihood=ll0 + jnp.sum(lls),
        predicted_means=cat(params.m0, mps),
        predicted_covariances=cat(params.P0, Pps),
    )


@eqx.filter_jit
def rts_smoother(params: LGSSMParams, ys: Float[Array, "T k"]) -> tuple[Array, Array]:
    r"""Exact smoothing means and covariances of \(p(x_t \mid y_{0:T-1})\) (Rauch-Tung-Striebel)."""
    kf = kalman_filter(params, ys)

    def step(carry, inp):
        ms_next, Ps_next = carry
        m, P, mp_next, Pp_next = inp
        G = jnp.linalg.solve(Pp_next, params.A @ P).T
        ms = m + G @ (ms_next - mp_next)
        Ps = P + G @ (Ps_next - Pp_next) @ G.T
        return (ms, Ps), (ms, Ps)

    last = (kf.means[-1], kf.covariances[-1])
    inputs = (kf.means[:-1], kf.covariances[:-1], kf.predicted_means[1:], kf.predicted_covariances[1:])
    _, (ms, Ps) = jax.lax.scan(step, last, inputs, reverse=True)
    return (
        jnp.concatenate([ms, kf.means[-1:]]),
        jnp.concatenate([Ps, kf.covariances[-1:]]),
    )
