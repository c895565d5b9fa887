from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="fast3r-kernels",
    version="0.1.0",
    description="Fast3R 3-D reconstruction on hand-written Triton kernels",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fast3r", "fast3r.*", "fast3r_kernels", "fast3r_kernels.*"]),
    install_requires=[
        "torch>=2.4",
        "triton>=3.2",
        "numpy",
        "einops",
        "safetensors",
        "pyyaml",
        "matplotlib",
        "nvidia-ml-py",
    ],
    extras_require={
        # numpy<2.4: triton 3.6's interpreter (TRITON_INTERPRET=1, used by the CPU tests)
        # breaks on numpy 2.4 (triton-lang/triton#9171, fixed after 3.6).
        "dev": ["pytest", "ruff==0.17.6", "numpy<2.4"],
        "hub": ["huggingface_hub"],
    },
)
