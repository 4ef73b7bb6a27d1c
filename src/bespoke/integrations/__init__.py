"""Adapters to host libraries: diffusers schedulers and k-diffusion-style samplers."""
