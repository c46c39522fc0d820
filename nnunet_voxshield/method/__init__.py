"""The algorithm, in torch: the objective (segmentation loss, ZDiv, SPD), the budget and ROI projection, the
differentiable augmentation used for expectation over transformation, the bilevel loop and the baselines (uniform
noise, class-wise textures). It reads and writes no files of its own.

May import: `config`, `errors`, `nnunet` (the surrogate, resampling and process group it runs on). Never `job`,
`release`, `evaluation`, `demo` or `cli`.
"""
