from setuptools import find_packages, setup

setup(
    name="mpnet",
    version="0.1.0",
    description="MPNet pretraining (masked and permuted LM, two-stream attention) with dense and FlexAttention backends",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mpnet", "mpnet.*"]) + ["mpnet_cli"],
    package_dir={"mpnet_cli": "cli"},
    include_package_data=True,
    package_data={"mpnet": ["resources/**/*"]},
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
    # "fairseq": what ve-fairseq needs besides torch; the fork itself goes in with --no-deps (docs/fairseq.md).
    extras_require={"test": ["pytest"], "data": ["rdata"],
                    "fairseq": ["hydra-core", "omegaconf", "bitarray", "sacrebleu"]},
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
