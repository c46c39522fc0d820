import sys
from pathlib import Path

# the benchmark scripts' helpers live beside them in benchmarks/, not in the package
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
