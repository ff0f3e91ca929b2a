from setuptools import find_packages, setup

setup(
    name="minibldm",
    version="0.1.0",
    description="Industrial defect generation with a blended latent diffusion model (AdaBLDM), "
                "in plain PyTorch",
    license="MIT",
    packages=find_packages(include=["minibldm", "minibldm.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "einops", "safetensors", "tokenizers", "pillow"],
    extras_require={"test": ["pytest", "diffusers", "transformers", "scikit-learn", "scipy"],
                    # generation-quality metrics (python -m minibldm.genquality); they need
                    # torchvision: install the release that matches your torch first
                    "eval": ["torch-fidelity>=0.3", "lpips>=0.1.4"]},
)
