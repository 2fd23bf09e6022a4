from setuptools import find_packages, setup

setup(
    name='qwenjax',
    version='0.1.0',
    description='Qwen2 and Qwen2-MoE language models in JAX/Flax: Hugging Face-exact, sharded, resumable training.',
    packages=find_packages(include=['qwenjax', 'qwenjax.*']),
    python_requires='>=3.10',
    install_requires=[
        'jax>=0.10',
        'flax>=0.12',
        'optax',
        'orbax-checkpoint',
        'grain',
        'sentencepiece',
        'ml-collections',
        'absl-py',
        'safetensors',
        'numpy',
        'ml-dtypes',
        'tensorboardX',
        'tokenizers',  # Hugging Face tokenizer.json files (Qwen's own tokenizer)
        'jinja2>=3.1.6',  # chat templates (qwenjax.chat); older releases have sandbox escapes
        'etils[epath]',  # workdirs that may be gs:// paths
        'scipy',  # scaling-law fits
        'matplotlib',  # scaling-law plots
    ],
    extras_require={
        # torch is pinned: an unpinned torch pulls a multi-GB CUDA build.
        # trl: the SFT and DPO references of tests/test_post_training.py (it needs Python >= 3.11); peft: the LoRA
        # adapters' reference (tests/test_lora.py); pytest-xdist: the suite on two processes (README).
        'test': ['pytest', 'pytest-xdist', 'transformers>=4.45', 'torch==2.13.0', 'nbclient', 'nbformat', 'ipykernel',
                 'trl==1.16.0; python_version >= "3.11"', 'peft==0.21.2'],
        'cuda': ['jax[cuda13]'],
        'tpu': ['jax[tpu]'],
    },
)
