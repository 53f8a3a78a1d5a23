import sys
from pathlib import Path

# the tests import model, common, ... from the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
