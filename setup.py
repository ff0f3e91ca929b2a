from pathlib import Path
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

COMMANDS = ("sample", "train", "evaluate", "genquality", "synth", "export", "convert")


class BuildWithBundledModel(build_py):
    """A plain (non-editable) install also gets the bundled tiny model: weights/tiny is copied
    into the built package as minibldm/bundled/tiny (minibldm/api.py:bundled_weights finds it)."""

    def run(self):
        super().run()
        source = Path(__file__).resolve().parent / "weights" / "tiny"
        if (source / "config.json").is_file():
            target = Path(self.build_lib) / "minibldm" / "bundled" / "tiny"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)


setup(
    name="minibldm",
    version="0.1.0",
    description="Industrial defect generation with a blended latent diffusion model (AdaBLDM), "
                "in plain PyTorch",
    license="MIT",
    packages=find_packages(include=["minibldm", "minibldm.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "einops", "safetensors", "tokenizers", "pillow"],
    extras_require={"test": ["pytest", "diffusers", "transformers", "scikit-learn", "scipy",
                             # python -m minibldm.export --onnx, and onnxruntime to check it
                             "onnx", "onnxscript", "onnxruntime"],
                    # generation-quality metrics (python -m minibldm.genquality); they need
                    # torchvision: install the release that matches your torch first
                    "eval": ["torch-fidelity>=0.3", "lpips>=0.1.4"],
                    # tests/test_sample_data.py's anomalib check; anomalib needs a torchvision
                    # built for your torch (here: torch==2.14.1 torchvision==0.29.1 in a venv)
                    "anomalib": ["anomalib>=2.0"]},
    # minibldm-sample ... : the same as python -m minibldm.sample ...
    entry_points={"console_scripts": [f"minibldm-{c}=minibldm.{c}:main" for c in COMMANDS[:-1]]
                  + ["minibldm-convert=minibldm.convert.checkpoint:main"]},
    cmdclass={"build_py": BuildWithBundledModel},
)
