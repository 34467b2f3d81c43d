from setuptools import find_packages, setup

# flash-attn is no extra: it builds only without build isolation, against the installed torch
# (`pip install flash-attn --no-build-isolation`, docs/quickstart.md).
extras = {
    "deepspeed": ["deepspeed>=0.16"],
    "trl": ["trl>=1.16", "peft>=0.17"],
    # tests/test_engines.py runs ZeRO on CPU; tests/test_trl.py runs TRL's trainers
    "test": ["pytest>=8", "pytest-timeout", "deepspeed>=0.16", "trl>=1.16", "peft>=0.17"],
    "bench": ["matplotlib"],  # benchmarks/plot.py and plot_memory.py
    "dev": ["pytest>=8", "pytest-timeout", "ruff>=0.6", "matplotlib"],
}

setup(
    name="transformers_cp",
    version="0.1.0",
    description="Context parallelism (ring, zigzag, llama3, Ulysses, hybrid) for Hugging Face causal LMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    package_dir={"": "src"},
    packages=find_packages("src"),
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "transformers>=5.0", "accelerate>=1.0"],
    extras_require=extras,
    license="Apache-2.0",
)
