"""Installs the `megatron` package and builds megatron/data/helpers.cpp with pybind11."""

import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))


def _ext_modules():
    src = os.path.join("megatron", "data", "helpers.cpp")
    if not os.path.exists(os.path.join(here, src)):
        return []
    from pybind11.setup_helpers import Pybind11Extension

    return [
        Pybind11Extension(
            "megatron.data.helpers",
            [src],
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    ]


def _requirements():
    with open(os.path.join(here, "requirements.txt")) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


setup(
    name="megatron-deepspeed",
    version="0.1.0",
    description="Megatron-DeepSpeed: GPT, BERT and T5 training with tensor, pipeline and "
    "data parallelism, and DeepSpeed ZeRO and Mixture-of-Experts",
    packages=find_packages(include=["megatron", "megatron.*", "tasks", "tasks.*"]),
    package_data={"megatron": ["data/helpers.cpp", "fused_kernels/*.cu", "fused_kernels/*.cpp",
                               "fused_kernels/*.h"]},
    ext_modules=_ext_modules(),
    install_requires=_requirements(),
    extras_require={"test": ["pytest", "pytest-timeout", "ruff"]},
    python_requires=">=3.9",
)
