"""guidebench: reproduce, compare and extend the ImageNet benchmarks of diffusion guidance."""

__version__ = "0.1.0"
