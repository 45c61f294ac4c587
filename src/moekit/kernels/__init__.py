"""Optional GPU kernels; each module imports without its backend and says whether it can run."""
