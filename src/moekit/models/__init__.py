"""Models built from moekit layers."""

from .lm import LanguageModel, LMConfig, LMOutput

__all__ = ["LMConfig", "LMOutput", "LanguageModel"]
