import sys
from pathlib import Path

# The language-model fixtures live one folder up, shared by tests/{models,data,train,analysis}.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lm_fixtures import *  # noqa: E402, F403
