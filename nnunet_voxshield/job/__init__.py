"""One resumable, distributed protection run: the preflight checks of the source, case preparation (one read per
case), the run's committed state keyed by its settings, atomic file writes, and the optimisation that drives
`method` on nnU-Net's surrogate.

May import: `config`, `errors`, `nnunet`, `method`. Never `release`, `evaluation`, `demo` or `cli`.
"""
