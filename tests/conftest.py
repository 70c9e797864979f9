import sys
from pathlib import Path

# tests import small shared helpers (e.g. tests/models/hf_cases.py) by module name
for sub in ("models",):
    sys.path.insert(0, str(Path(__file__).parent / sub))
