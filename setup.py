"""Build script of mamlpp-fast.

The pure-Python package always installs. The native extension `mamlpp_fast._C` is added by the
CMake-driven build step (see CMakeLists.txt) when its sources are present.
"""
from setuptools import find_packages, setup

setup(
    name="mamlpp-fast",
    version="0.1.0",
    description="Fast, exact MAML++ meta-learning trainer",
    packages=find_packages(include=["mamlpp_fast", "mamlpp_fast.*"]),
    python_requires=">=3.9",
    install_requires=["torch", "numpy", "tqdm", "pillow"],
    entry_points={"console_scripts": ["mamlpp=mamlpp_fast.cli:main"]},
)
