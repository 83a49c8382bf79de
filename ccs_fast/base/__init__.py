"""The base every folder of ccs_fast imports: one-line errors (``errors``), atomic writes
(``atomic``), process and CPU plans (``distributed``) and stop signals (``signals``).

Nothing here imports from the rest of ccs_fast, so ``kernels``, ``dataloader``, the model
and the applications can all depend on it without an arrow pointing back up.
"""
