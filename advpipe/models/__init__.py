"""Model registry, normalization wrapper, dual BN and checkpoints."""
