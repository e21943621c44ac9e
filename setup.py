import importlib.util
import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
RAY = ["ray>=2.40,<3"]  # tested with 2.60
LOAD = ["torch", "torchvision", "open_clip_torch>=2.24", "onnx>=1.16", "onnxscript>=0.1",
        # `mapclip ocr`: RapidOCR 3.10 ships PP-OCRv6 small models in its wheel (loaders/ocr.py runs its steps itself)
        "rapidocr>=3.10,<3.11"]


class BuildWithViewer(build_py):
    """The wheel carries OpenSeadragon, the map page's viewer: fetched pinned from the npm registry
    (datasette_mapclip/web/vendor.py, loaded by path: the package's dependencies may not be installed yet)."""

    def run(self):
        spec = importlib.util.spec_from_file_location("mapclip_vendor", os.path.join(HERE, "datasette_mapclip", "web", "vendor.py"))
        vendor = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(vendor)
        if not vendor.openseadragon_present():
            try:
                vendor.fetch_openseadragon()
            except (OSError, vendor.VendorError) as error:
                if not getattr(self, "editable_mode", False):
                    raise
                print(f"warning: OpenSeadragon not fetched ({error}); run python -m datasette_mapclip.web.vendor")
        super().run()


def read_readme():
    path = os.path.join(HERE, "README.md")
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


setup(
    name="datasette-mapclip",
    version="0.1.0",
    description="Search map collections by what the maps look like: CLIP embeddings in SQLite (sqlite-vec) served by Datasette",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # (No project URLs: the project has no public home yet.)
    classifiers=[
        "Framework :: Datasette",
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Programming Language :: Python :: 3",
        "Topic :: Database",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
    packages=["datasette_mapclip", "datasette_mapclip.model", "datasette_mapclip.search", "datasette_mapclip.store",
              "datasette_mapclip.web", "loaders", "loaders.sources", "fine_tune", "fine_tune.demo"],
    package_data={"datasette_mapclip": ["model/model_configs/*.json", "templates/*", "static/*",
                                        "static/vendor/openseadragon/*", "static/vendor/openseadragon/images/*"]},
    cmdclass={"build_py": BuildWithViewer},
    # The serving stack: the plugin, `mapclip search` and the Python search API encode queries with
    # the ONNX encoders a collection file carries; no torch.
    install_requires=[
        "datasette>=0.65",
        "sqlite-vec>=0.1.6",
        "onnxruntime>=1.17",
        "tokenizers>=0.15",
        "ftfy",  # open_clip's text cleaning, applied before the stored tokenizer
        "numpy",
        "faiss-cpu>=1.8",  # the int8 scan of the in-memory index (and its filter masks)
        "pillow>=10",
        "click",
        "tqdm",
        "httpx",
        # The security fixes (0.0.26-0.0.31); Datasette 0.65's CSRF layer never parses a multipart body
        # with it: the plugin checks those forms itself (web/uploads.py)
        "python-multipart>=0.0.31",
        "pysqlite3-binary; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        # loading, fine-tuning and exporting query encoders: open_clip on torch, and ONNX export
        "load": LOAD,
        # `--engine ray`: the loaders on a Ray cluster (core tasks and actors; Ray Data is not needed)
        "ray": [*LOAD, *RAY],
        "test": [*LOAD, "build", "pytest", "pytest-asyncio", "playwright", "axe-playwright-python", "ruff", "hypothesis", *RAY],
    },
    entry_points={
        "datasette": ["mapclip = datasette_mapclip"],
        "console_scripts": ["mapclip = datasette_mapclip.cli:main"],
        # Commands of the packages above the core join the `mapclip` root (datasette_mapclip/cli.py).
        "mapclip.commands": [
            "load = loaders.cli:load",
            "import-beto = loaders.cli:import_beto",
            "encoders = loaders.cli:encoders",
            "loc-metadata = loaders.cli:loc_metadata",
            "ocr = loaders.ocr_cli:ocr",
            "fine-tune = fine_tune.cli:fine_tune",
            "demo = fine_tune.demo.run:demo_command",
        ],
    },
)
