"""Where the tests find the repository and the shared benchmark sets."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# ../shared/benchmarks beside the checkout (CI puts it there too)
SHARED_BENCHMARKS = REPO_ROOT.parent / "shared" / "benchmarks"
