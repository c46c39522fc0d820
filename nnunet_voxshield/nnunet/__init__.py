"""The bridge to nnU-Net: environment variables, dataset ids and stock commands; the source dataset as nnU-Net sees
it; the cropped grid, the slice geometry and the exact, differentiable reproduction of nnU-Net's resampling; the
surrogate trainer; the process group that `-num_gpus` and torchrun share with nnU-Net's DDP.

May import: `config`, `errors` and nnU-Net itself. Never `method`, `job`, `release`, `evaluation`, `demo` or `cli`.
"""
