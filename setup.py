"""Packaging for megatron-hybrid.

`kernels/` and `checkpointing/` live at the top of the repository (they are the two big
subsystems) but install inside the `megatron_hybrid` namespace, so the distribution never
claims generic top-level names such as `kernels` (shared/DESIGN.md section 2).
"""

from setuptools import setup

PACKAGES = {
    "megatron_hybrid": "megatron_hybrid",
    "megatron_hybrid.layers": "megatron_hybrid/layers",
    "megatron_hybrid.training": "megatron_hybrid/training",
    "megatron_hybrid.data": "megatron_hybrid/data",
    "megatron_hybrid.kernels": "kernels",
    "megatron_hybrid.checkpointing": "checkpointing",
}

setup(
    name="megatron-hybrid",
    version="0.1.0",
    description="Pretraining for hybrid Mamba2 / attention / MLP / MoE language models "
    "described by one layer-pattern string",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    install_requires=["torch>=2.6", "numpy", "safetensors", "tokenizers"],
    extras_require={
        "hf": ["transformers>=5"],
        "test": ["pytest>=8", "hypothesis>=6", "transformers>=5"],
        "dev": ["pytest>=8", "hypothesis>=6", "transformers>=5", "ruff"],
    },
    entry_points={
        "console_scripts": [
            "megatron-hybrid-train=megatron_hybrid.training.cli:main",
            "megatron-hybrid-preprocess=megatron_hybrid.data.preprocess:main",
            "megatron-hybrid-convert=megatron_hybrid.checkpointing.convert:main",
        ]
    },
)
