"""Packaging for ccs_fast.

``kernels/`` and ``dataloader/`` live at the top of the repository (SPEC §1) but install as
``ccs_fast.kernels`` and ``ccs_fast.dataloader`` so nothing generic lands in site-packages.
``pip wheel --no-deps .`` (or ``python -m build``) makes the wheel; ``tests/integration/test_wheel.py``
builds it, installs it apart from the source tree and runs the README's drop-in example.

Extras: ``dev`` (the test suite's tools), ``dali`` (the GPU loader, CUDA 13 wheels),
``timm`` (timm backbones), ``viz`` (matplotlib: the demo's and ``eval``'s pictures).
"""
from pathlib import Path

from setuptools import setup

setup(
    name="ccs_fast",
    version="0.1.0",
    description="Cooperative Cross-Stream (CCS) two-stream action recognition trainer with fused Triton kernels and a DALI loader",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    keywords=["action recognition", "two-stream", "triton", "pytorch", "metric learning", "dali"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Intended Audience :: Developers",
        "Operating System :: POSIX :: Linux",
        "Environment :: GPU :: NVIDIA CUDA",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Multimedia :: Video",
    ],
    python_requires=">=3.10",
    packages=["ccs_fast", "ccs_fast.base", "ccs_fast.kernels", "ccs_fast.dataloader"],
    package_dir={
        "ccs_fast": "ccs_fast",
        "ccs_fast.kernels": "kernels",
        "ccs_fast.dataloader": "dataloader",
    },
    package_data={"ccs_fast": ["configs/*.yaml"]},
    install_requires=[
        # Tested pairs: torch 2.11 + triton 3.6 (the GPU machines'; `make compat`) and torch
        # 2.14 + triton 3.8 (`make test`). Triton ships with torch's Linux wheels; on CPU the
        # kernels run under TRITON_INTERPRET=1, where triton 3.6 needs numpy < 2.4 (its
        # interpreter calls int() on one-element arrays; fixed in triton 3.7).
        "torch>=2.11",
        "torchvision>=0.26",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy>=1.24",
        "opencv-contrib-python-headless>=4.8",  # cv2.optflow.DualTVL1OpticalFlow_create
        "av>=12",  # PyAV: writes the embedded webm/VP9 videos, reads .avi in `prepare`
        "pyyaml>=6",
        "tqdm>=4.60",
        "tensorboard>=2.14",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "pytest-timeout>=2",  # a hung DataLoader or DALI worker fails its test instead of the whole run
            "hypothesis>=6",
            "pytorch-metric-learning>=2.5",
            "timm>=1.0",  # tiny test backbones (timm:test_resnet)
            "matplotlib>=3.8",  # the picture tests (the [viz] extra)
        ],
        "dali": ["nvidia-dali-cuda130>=2.4"],
        "timm": ["timm>=1.0"],
        "viz": ["matplotlib>=3.8"],  # ccs_fast.viz pictures (training curves, confusion, attention, CAM)
    },
    entry_points={"console_scripts": ["ccs-fast=ccs_fast.cli:main"]},
)
