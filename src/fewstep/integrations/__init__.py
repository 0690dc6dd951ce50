"""Bridges to other libraries: ``diffusers`` (imported on first use, it is optional) and ``kdiffusion``."""
