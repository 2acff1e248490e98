"""Packaging for megatron-hybrid.

`kernels/` and `checkpointing/` live at the top of the repository (they are the two big
subsystems) but install inside the `megatron_hybrid` namespace, so the distribution never
claims generic top-level names such as `kernels`.
"""

from setuptools import find_packages, setup

# Import name -> folder of the three package roots; every sub-package below them is found, so a
# new folder (with an __init__.py) never goes missing from a wheel.
ROOTS = {
    "megatron_hybrid": "megatron_hybrid",
    "megatron_hybrid.kernels": "kernels",
    "megatron_hybrid.checkpointing": "checkpointing",
}
PACKAGES = [
    f"{root}.{sub}" if sub else root
    for root, folder in ROOTS.items()
    for sub in ["", *find_packages(folder)]
]

# The Hugging Face nemotron_h converter reads Mamba's dt clamp as each transformers version applies
# it (checkpointing/hf_nemotron_h.py): known from 5.15; 5.25 is the newest verified. Raise the
# upper bound once a newer release is checked against tests/test_hf_nemotron_h.py.
TRANSFORMERS = "transformers>=5.15,<5.26"

# FP8 training (--fp8-format) swaps linear layers for torchao's float8 ones
# (kernels/float8/torchao.py). Verified with torchao 0.18 on torch 2.13; raise the upper bound
# once a newer release passes tests/test_fp8.py. The module swap and checkpoints are tested on
# CPU too, so the `test` extra installs it.
TORCHAO = "torchao>=0.18,<0.19"

# .ci/run lints with the ruff the `test` extra installs (a fresh machine has none). Pinned to one
# minor release: ruff's rules change between minor releases, and CI must not turn red on its own.
RUFF = "ruff>=0.17,<0.18"

setup(
    name="megatron-hybrid",
    version="0.1.0",
    description="Pretraining for hybrid Mamba2 / attention / MLP / MoE language models "
    "described by one layer-pattern string",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=ROOTS,
    install_requires=["torch>=2.6", "numpy", "safetensors", "tokenizers"],
    extras_require={
        "hf": [TRANSFORMERS],
        "tensorboard": ["tensorboard>=2.14"],
        "wandb": ["wandb>=0.17"],
        "fp8": [TORCHAO],
        # setuptools + wheel: tests/test_packaging.py builds a wheel without build isolation.
        "test": [
            "pytest>=8",
            "hypothesis>=6",
            TRANSFORMERS,
            "setuptools>=70",
            "wheel",
            RUFF,
            "tensorboard>=2.14",  # tests read the event files back
            TORCHAO,
            "triton>=3.4; platform_system == 'Linux' and platform_machine == 'x86_64'",
        ],
        "dev": ["pytest>=8", "hypothesis>=6", TRANSFORMERS, RUFF],
    },
    entry_points={
        "console_scripts": [
            "megatron-hybrid-train=megatron_hybrid.training.cli:main",
            "megatron-hybrid-preprocess=megatron_hybrid.data.preprocess:main",
            "megatron-hybrid-convert=megatron_hybrid.checkpointing.convert:main",
            "megatron-hybrid-generate=megatron_hybrid.training.generate:main",
        ]
    },
)
