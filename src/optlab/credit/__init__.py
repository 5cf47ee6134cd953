"""Credit assignment scored against exact costates (issue #13). Every definition here is ours:
none of these methods has a public reference implementation.

A network is a discrete-time system ``s_k = F_k(s_{k-1}; theta_k)``, ``k = 1..L``, with loss
``L(s_L, y)``; the costate ``lambda_k = dL/ds_k`` is what backprop computes. A credit method
produces an estimate ``lambda_hat_k`` and updates every layer with the same normalized local
surrogate (:mod:`optlab.credit.core`). Modules:

| module | what it holds |
| --- | --- |
| :mod:`optlab.credit.core` | the credit-capable model interface (layer states), exact costates by autograd, the local surrogate, per-layer update cosines |
| :mod:`optlab.methods.credit_base` | the shared training step (:class:`CreditMethod`) of ``credit_bp``, ``dfa``, ``state_bridge``, ``credit_bridge`` (each in :mod:`optlab.methods`) |
| :mod:`optlab.credit.nets` | DFA feedback matrices, the state bridge and the value (credit) bridge, stacked over layers and run batched |
| :mod:`optlab.credit.lq` | closed forms of the linear-quadratic toy: the adjoint recursion, the finite-horizon Riccati solution |

The ``costate`` probe (:mod:`optlab.probes.costate`) scores a method's credit on the task's fixed
probe batch; the toy task is ``arch: lq`` with ``dataset: lq`` (:mod:`optlab.models.lq`,
:mod:`optlab.data.lq`, :mod:`optlab.tasks.lq`).
"""

from .core import check_credit_model, credit_update, exact_costates, normalize, surrogate
from .lq import adjoint_costates, riccati

__all__ = ["adjoint_costates", "check_credit_model", "credit_update", "exact_costates", "normalize", "riccati", "surrogate"]
