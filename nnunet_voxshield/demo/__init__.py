"""Demo datasets built from anatomy that ships inside installed packages (no download): the embedded default of the
`demo` command and the benchmark's datasets.

May import every sub-package except `cli`.
"""
