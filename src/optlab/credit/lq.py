"""Closed forms of the linear-quadratic toy: the adjoint recursion and the Riccati solution.

- :func:`adjoint_costates`: for ``s_k = J_k s_{k-1}`` and a cost ``sum_k c_k(s_k)`` (stage costs
  with gradients ``g_k``, the terminal one included), the costates of the total cost are
  ``lambda_L = g_L``, ``lambda_k = g_k + J_{k+1}^T lambda_{k+1}`` (rows are examples, so
  ``J^T lambda`` is ``lambda @ J``).
- :func:`riccati`: the control form ``x_{k+1} = A x_k + B u_k``, cost
  ``sum_{k<N} (x_k^T Q x_k + u_k^T R u_k) / 2 + x_N^T Q_f x_N / 2``; the backward Riccati recursion
  gives the optimal gains ``u_k = K_k x_k`` and the value matrices ``P_k`` (cost-to-go
  ``x^T P_k x / 2``), so along the optimal closed loop the costate of the cost-to-go is
  ``dV_k/dx_k = P_k x_k``.
"""

from __future__ import annotations

import torch


def adjoint_costates(jacobians: list[torch.Tensor], stage_grads: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Costates ``lambda_1..lambda_L`` of ``sum_k c_k(s_k)`` for ``s_k = J_k s_{k-1}``.

    ``jacobians``: ``J_1..J_L``; ``stage_grads``: ``g_1..g_L`` (``(B, d)`` or None for no stage cost;
    ``g_L`` required)."""
    L = len(jacobians)
    lam = stage_grads[L - 1]
    assert lam is not None, "the terminal cost's gradient is required"
    out = [lam]
    for k in range(L - 1, 0, -1):  # lambda_k from lambda_{k+1}: J_{k+1} is jacobians[k]
        lam = lam @ jacobians[k]
        g = stage_grads[k - 1]
        if g is not None:
            lam = lam + g
        out.append(lam)
    return out[::-1]


def riccati(A: torch.Tensor, B: torch.Tensor, Q: torch.Tensor, R: torch.Tensor, Qf: torch.Tensor,
            horizon: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(gains ``K_0..K_{N-1}``, value matrices ``P_0..P_N``) of the finite-horizon LQR."""
    P = Qf
    Ps, Ks = [P], []
    for _ in range(horizon):
        S = R + B.T @ P @ B
        K = -torch.linalg.solve(S, B.T @ P @ A)
        Acl = A + B @ K
        P = Q + K.T @ R @ K + Acl.T @ P @ Acl
        P = (P + P.T) / 2
        Ks.append(K)
        Ps.append(P)
    return Ks[::-1], Ps[::-1]


def control_cost(x0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, Q: torch.Tensor, R: torch.Tensor, Qf: torch.Tensor,
                 gains: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(total cost summed over the rows of ``x0``, the states ``x_0..x_N``) under ``u_k = K_k x_k``."""
    xs, cost = [x0], torch.zeros((), dtype=x0.dtype)
    x = x0
    for K in gains:
        u = x @ K.T
        cost = cost + 0.5 * ((x @ Q) * x).sum() + 0.5 * ((u @ R) * u).sum()
        x = x @ (A + B @ K).T
        xs.append(x)
    return cost + 0.5 * ((x @ Qf) * x).sum(), xs
