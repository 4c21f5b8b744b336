"""megatron-irl: inverse-RL (IQ-Learn) fine-tuning of language models on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron-irl",
    version="0.1.0",
    description="Fine-tune language models by inverse soft-Q learning on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_irl", "megatron_irl.*"]),
    install_requires=[
        # A range that the local CPU wheel (2.13.0) satisfies; CPU installs pin it exactly.
        "torch>=2.4",
        # 0.16.1 is tested (CPU, Python 3.11); the API this package uses was checked against
        # 0.17.1, 0.18.2 and 0.19.2 (Python 3.12); a later release is untested.
        "megatron-core>=0.16.1,<0.20",
        "numpy",
        "pyyaml",
        "psutil",  # megatron-core's checkpoint saving needs it without declaring it
        "sentencepiece",
        "tokenizers",
        "jinja2>=3.1.6",  # chat templates, rendered as transformers renders them
        "tensorboard",
        "safetensors",
        "tqdm",
        # Evaluation: task metrics as the papers compute them, and the trade-off plots.
        "rouge-score",
        "sacrebleu",
        "matplotlib",
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        # transformers (+ protobuf for sentencepiece tokenizers): the conversion tests load the
        # exported models and tokenizers with it.
        "dev": ["pytest", "hypothesis", "transformers==5.24.0", "protobuf"],
    },
    entry_points={"console_scripts": ["megatron-irl=megatron_irl.commands:main"]},
)
