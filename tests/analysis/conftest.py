import sys
from pathlib import Path

# The language-model fixtures live one folder up, shared by the tests of every floor that trains.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lm_fixtures import *  # noqa: E402, F403
