"""The package version: read by ``dfqkern/__init__``, checkpoints, synthetic-set manifests and the build."""
__version__ = "0.1.0"
