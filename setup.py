from pathlib import Path

from setuptools import find_packages, setup

RECONSTRUCT = ["opencv-python-headless", "trimesh", "pycolmap", "av", "tqdm"]
VIEW = ["viser"]  # `fast3r view`: the browser viewer
TRAIN = ["tensorboard", "tqdm", "pycolmap"]  # `fast3r train`: TensorBoard logs (optional), progress bars, COLMAP scenes

setup(
    name="fast3r-kernels",
    version="0.1.0",
    description="Fast3R 3-D reconstruction on hand-written Triton kernels",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fast3r", "fast3r.*", "fast3r_kernels", "fast3r_kernels.*"]),
    install_requires=[
        # The oldest torch the suite has run on (the H100 machine's 2.11).
        "torch>=2.11",
        # Only a lower bound: on Linux each torch pins its own Triton (2.11 -> 3.6.0, 2.13 -> 3.7.1), and any
        # upper bound here would make some torch impossible to install beside this package. 3.6 is the oldest
        # Triton the kernels are tested on (fast3r_kernels/versions.py warns on import about untested ones).
        # Linux only: Triton publishes Linux wheels only, and torch declares it on Linux only; elsewhere the
        # requirement could not resolve (on Windows the `triton` module comes from the triton-windows wheel).
        'triton>=3.6; platform_system == "Linux"',
        "numpy",
        "einops",
        "safetensors",
        "pyyaml",
        "matplotlib",
        "nvidia-ml-py",
        "pillow",  # image decoding in fast3r.images
    ],
    extras_require={
        # `fast3r` reconstructing videos and image folders: decoding, poses, exports, progress bars.
        "reconstruct": RECONSTRUCT,
        # numpy<2.4: Triton 3.6's interpreter (TRITON_INTERPRET=1, how the CPU tests run the kernels) breaks
        # on numpy 2.4 (triton-lang/triton#9171; Triton 3.7 is fixed). CI tests on 3.6, the GPU machine's Triton.
        "view": VIEW,
        "train": TRAIN,
        # playwright: drives the system's Chromium in the viewer's browser test (it downloads no browser of its own).
        "dev": ["pytest", "pytest-benchmark", "ruff==0.17.6", "numpy<2.4", "playwright", *RECONSTRUCT, *VIEW, *TRAIN],
        "hub": ["huggingface_hub"],
    },
    entry_points={"console_scripts": ["fast3r = fast3r.cli:main"]},
)
