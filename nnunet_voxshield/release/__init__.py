"""Writing and verifying the protected dataset: the `protect` command's flow (run the job, then write), output
naming, the per-case writer that keeps geometry and pixel type within the budget, the dataset export, image-quality
metrics, survival through nnU-Net's preprocessing, the report, the preview and the `check` command.

May import: `config`, `errors`, `nnunet`, `method`, `job`. Never `evaluation`, `demo` or `cli`.
"""
