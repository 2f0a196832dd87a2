from setuptools import find_packages, setup

setup(
    name="mpnet",
    version="0.1.0",
    description="MPNet pretraining (masked and permuted LM, two-stream attention) with dense, FlexAttention and "
                "Triton attention backends",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # configs/ ships inside the package as mpnet.configs (read with importlib.resources), so a wheel install has
    # the run configs and the GLUE recipes: `--config mpnet-tiny` works from any directory.
    packages=find_packages(include=["mpnet", "mpnet.*"]) + ["mpnet_cli", "mpnet.configs", "mpnet.configs.glue"],
    package_dir={"mpnet_cli": "cli", "mpnet.configs": "configs"},
    include_package_data=True,
    package_data={"mpnet": ["resources/**/*"], "mpnet.configs": ["*.yaml"], "mpnet.configs.glue": ["*.yaml"]},
    install_requires=[
        "torch>=2.6",
        "transformers>=4.45",
        "safetensors",
        "sentencepiece",
        "tokenizers",
        "tensorboard",
        "numpy",
        "pyyaml",
        "tqdm",
        "scikit-learn",
        "scipy",
        "matplotlib",
        "tabulate",
    ],
    # "fairseq": what ve-fairseq declares besides torch and torchaudio; the fork itself goes in with --no-deps
    # (docs/fairseq.md: no torchaudio release loads with torch 2.13, and the text tasks never import it).
    # "datasets": reading folders that Hugging Face datasets saved (pretrain-mpnet --data, finetune-mpnet --data-dir).
    extras_require={"test": ["pytest", "setuptools", "sentence-transformers", "datasets"], "data": ["rdata"],
                    "datasets": ["datasets"],
                    "fairseq": ["hydra-core>=1.3.2", "omegaconf", "bitarray", "sacrebleu>=1.4.12", "cffi", "cython",
                                "regex", "packaging"]},
    entry_points={
        "console_scripts": [
            "pretrain-mpnet=mpnet_cli.pretrain:main",
            "preprocess-mpnet=mpnet_cli.preprocess:main",
            "finetune-mpnet=mpnet_cli.finetune:main",
            "compare-mpnet-backends=mpnet_cli.compare:main",
            "benchmark-mpnet=mpnet_cli.benchmark:main",
            "convert-mpnet=mpnet_cli.convert:main",
        ]
    },
)
