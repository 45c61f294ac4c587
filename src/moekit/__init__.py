"""moekit: Mixture-of-Experts toolkit for PyTorch."""
