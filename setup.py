"""Builds fastprune._C: CPU kernels always, CUDA kernels when torch has CUDA and
nvcc is found (or FORCE_CUDA=1)."""
import glob
import os
import shutil

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def use_cuda():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc") is not None)


def extension():
    sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))]
    sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    cxx = ["-O3", "-fopenmp", "-DPy_LIMITED_API=0x03090000"]
    kwargs = dict(extra_link_args=["-fopenmp"], py_limited_api=True)
    if use_cuda():
        sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_cuda_archs())
        print(f"fastprune: building CPU + CUDA kernels (archs {os.environ['TORCH_CUDA_ARCH_LIST']})")
        return CUDAExtension(
            "fastprune._C", sources,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]}, **kwargs)
    print("fastprune: building CPU-only kernels (torch has no CUDA or nvcc was not found)")
    return CppExtension("fastprune._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)


def default_cuda_archs():
    """The visible GPUs' compute capabilities, else Hopper (9.0)."""
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
    return "9.0"


setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
