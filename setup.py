from setuptools import setup

setup(
    name="datasette-mapclip",
    version="0.1.0",
    description="Search map collections by what the maps look like: CLIP embeddings in SQLite (sqlite-vec) served by Datasette",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["datasette_mapclip", "loaders", "loaders.sources", "fine_tune"],
    package_data={"datasette_mapclip": ["model_configs/*.json", "templates/*", "static/*"]},
    install_requires=[
        "datasette>=0.65",
        "sqlite-vec>=0.1.6",
        "torch",
        "torchvision",
        "open_clip_torch>=2.24",
        "numpy",
        "pillow>=10",
        "click",
        "tqdm",
        "httpx",
        "python-multipart>=0.0.13,<0.0.25",  # asgi-csrf 0.11 passes FileClass, removed in 0.0.25
        "pysqlite3-binary; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={"test": ["pytest", "pytest-asyncio", "playwright"]},
    entry_points={
        "datasette": ["mapclip = datasette_mapclip"],
        "console_scripts": ["mapclip = loaders.cli:main"],
    },
)
