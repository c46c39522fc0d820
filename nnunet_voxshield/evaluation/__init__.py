"""Efficacy, measured with real nnU-Net: the victims and adaptive attackers (their trainer classes live in the
top-level `trainers/` folder), training runs over seeds, scoring on clean held-out cases with nnU-Net's own
evaluation, and the rendered report of the `evaluate` command.

May import: `config`, `errors`, `nnunet`, `method`, `job`, `release`. Never `demo` or `cli`.
"""
